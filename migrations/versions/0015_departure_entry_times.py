"""Each departure keeps the time of the entry it closes, so the members at an instant are one range

Revision ID: 0015_departure_entry_times
Revises: 0014_covering_change_indexes
Create Date: 2026-12-07

``audit members --at T`` is the members now whose membership began by T, and every user whose
first change after T is a departure. Until now that second half looked up, for each departure
after T, the entry before it (a subquery per departure on SQLite, a DISTINCT ON join on
PostgreSQL): after cycle 1 of bench/audit_bench.py (1M members, 290,000 departures since) the
query took 1.29x (SQLite) and 1.47x (PostgreSQL) the plain export of the members now. With the
entry's time on the departure's row the
half is one range of one index: the departures after T whose entry is no later than T
(``entered_at <= T < at``), read from the index alone.

- ``membership_changes.entered_at``: on a ``left`` row, the ``at`` of the ``entered`` it closes;
  NULL on ``entered`` and ``changed`` rows, and on a departure whose entry is no longer stored
  (deleted by a prune, which from now on blanks it when it deletes the entry, so that the
  audit's ``since`` stays empty exactly when the entry is gone, as before).
- ``ix_membership_changes_audience_id_at_change_user_id_id`` (0014) is made again with
  ``entered_at`` after its columns, as ``ix_membership_changes_by_time`` (the convention's name
  would pass PostgreSQL's 63 characters): the departures after an instant and their entries'
  times from the index alone; the audit's diff by time still reads it as before.

Backfill: each departure gets the time of the last ``entered`` before it by id (the user's
entries and departures alternate), which is the very row the audit looked up until now; none
when there is none (a pruned entry): every answer is what it was.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_departure_entry_times"
down_revision = "0014_covering_change_indexes"
branch_labels = None
depends_on = None

OLD_NAME = "ix_membership_changes_audience_id_at_change_user_id_id"
OLD_COLUMNS = ["audience_id", "at", "change", "user_id", "id"]
NEW_NAME = "ix_membership_changes_by_time"
NEW_COLUMNS = [*OLD_COLUMNS, "entered_at"]

# The last entry before each departure, through 0014's (audience, user, id) index. The same
# statement on both databases: on PostgreSQL an UPDATE ... FROM a DISTINCT ON join was no
# faster on the bench's 300,000 departures.
BACKFILL = """
UPDATE membership_changes SET entered_at = (
    SELECT e.at FROM membership_changes e
    WHERE e.audience_id = membership_changes.audience_id
      AND e.user_id = membership_changes.user_id
      AND e.id < membership_changes.id
      AND e.change = 'entered'
    ORDER BY e.id DESC
    LIMIT 1
)
WHERE change = 'left'
"""


def upgrade() -> None:
    op.add_column("membership_changes", sa.Column("entered_at", sa.DateTime(timezone=True), nullable=True))
    # Before the new index: one write of each departure's row, not of the index too.
    op.execute(BACKFILL)
    op.drop_index(OLD_NAME, table_name="membership_changes")
    op.create_index(NEW_NAME, "membership_changes", NEW_COLUMNS)


def downgrade() -> None:
    op.drop_index(NEW_NAME, table_name="membership_changes")
    op.create_index(OLD_NAME, "membership_changes", OLD_COLUMNS)
    op.drop_column("membership_changes", "entered_at")
