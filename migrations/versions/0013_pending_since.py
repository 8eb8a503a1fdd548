"""When each membership's pending change was made: the oldest pending age counts from it

Revision ID: 0013_pending_since
Revises: 0012_contact_fields
Create Date: 2026-12-06

- ``memberships.pending_since``: the time the row's pending change was made (an entry, an
  exit, a new value of a trait or of contact fields, a resend owed). Until now the oldest
  pending age (`status`, /metrics) counted from ``changed_at``, the time the user entered or
  left, so a minute-old email change of a member of a year read a year. ``changed_at`` keeps
  its meaning: the audit rebuilds the members at an instant from it.
- ``ix_memberships_oldest_pending`` is made again on (audience_id, pending_since), over the
  same rows (pending, not parked): the oldest is still the first entry of an audience's range.

Backfill: the rows pending now get their ``changed_at``, the only time the store has (for a
value change or a resend it is earlier than the change: too old, never too young). The rows
not pending stay NULL; the next write that makes them pending sets it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_pending_since"
down_revision = "0012_contact_fields"
branch_labels = None
depends_on = None

DELIVERABLE = "pending AND parked_at IS NULL"


def _deliverable() -> str:
    sqlite = op.get_bind().dialect.name == "sqlite"
    return DELIVERABLE.replace("pending AND", "pending = 1 AND") if sqlite else DELIVERABLE


def upgrade() -> None:
    op.add_column("memberships", sa.Column("pending_since", sa.DateTime(timezone=True), nullable=True))
    # The counters' triggers fire on updates of memberships; this one changes no counted
    # column, so they add nothing, and every row keeps its counts.
    op.execute("UPDATE memberships SET pending_since = changed_at WHERE pending")
    op.drop_index("ix_memberships_oldest_pending", table_name="memberships")
    op.create_index(
        "ix_memberships_oldest_pending",
        "memberships",
        ["audience_id", "pending_since"],
        sqlite_where=sa.text(_deliverable()),
        postgresql_where=sa.text(_deliverable()),
    )


def downgrade() -> None:
    op.drop_index("ix_memberships_oldest_pending", table_name="memberships")
    op.create_index(
        "ix_memberships_oldest_pending",
        "memberships",
        ["audience_id", "changed_at"],
        sqlite_where=sa.text(_deliverable()),
        postgresql_where=sa.text(_deliverable()),
    )
    op.drop_column("memberships", "pending_since")
