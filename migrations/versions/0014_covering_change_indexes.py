"""The members at an instant read membership_changes from its indexes alone

Revision ID: 0014_covering_change_indexes
Revises: 0013_pending_since
Create Date: 2026-12-06

``audit members --at`` reads each departure after the instant (audience, time, kind, user, id)
and, for each, the entry before it (audience, user, id: the last ``entered``). Both indexes it
reads lacked ``change`` (the first, ``user_id`` too), so every departure cost reads of the
table's rows: PostgreSQL spent 4.4 of the query's 5.7 s there, after cycle 1 of
bench/audit_bench.py (EXPLAIN ANALYZE, 1M members). Each index is made again with the columns
those reads need after its own, so every query that used it still can (the membership_history
view's next change by id, the audit's diff by time), and the sync still writes two index
entries per change:

- ``ix_membership_changes_audience_id_at`` becomes
  ``ix_membership_changes_audience_id_at_change_user_id_id`` (the departures after an instant);
- ``ix_membership_changes_audience_id_user_id_id_at`` becomes
  ``ix_membership_changes_audience_id_user_id_id_at_change`` (the entry before each).
"""

from __future__ import annotations

from alembic import op

revision = "0014_covering_change_indexes"
down_revision = "0013_pending_since"
branch_labels = None
depends_on = None

# (old name, old columns, new name, new columns)
INDEXES = (
    (
        "ix_membership_changes_audience_id_at",
        ["audience_id", "at"],
        "ix_membership_changes_audience_id_at_change_user_id_id",
        ["audience_id", "at", "change", "user_id", "id"],
    ),
    (
        "ix_membership_changes_audience_id_user_id_id_at",
        ["audience_id", "user_id", "id", "at"],
        "ix_membership_changes_audience_id_user_id_id_at_change",
        ["audience_id", "user_id", "id", "at", "change"],
    ),
)


def upgrade() -> None:
    for old, _, new, columns in INDEXES:
        op.drop_index(old, table_name="membership_changes")
        op.create_index(new, "membership_changes", columns)


def downgrade() -> None:
    for old, columns, new, _ in INDEXES:
        op.drop_index(new, table_name="membership_changes")
        op.create_index(old, "membership_changes", columns)
