"""Indexes for the web status page: an audience's parked changes and parked events

Revision ID: 0010_web
Revises: 0009_alerts
Create Date: 2026-12-05

The audience page lists its parked failures, a page at a time. Without these it
read every row of the audience (memberships) or every event ever made (events)
to find the few parked ones; each index holds only the parked rows, so it stays
as small as what it lists and costs the writes of other rows nothing.

- ``ix_memberships_parked`` (audience_id, user_id) over parked changes.
- ``ix_events_parked`` (audience_id, id) over parked events.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_web"
down_revision = "0009_alerts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    parked = "pending = 1 AND parked_at IS NOT NULL" if sqlite else "pending AND parked_at IS NOT NULL"
    op.create_index(
        "ix_memberships_parked",
        "memberships",
        ["audience_id", "user_id"],
        sqlite_where=sa.text(parked),
        postgresql_where=sa.text(parked),
    )
    events_parked = "parked_at IS NOT NULL AND acked_at IS NULL"
    op.create_index(
        "ix_events_parked",
        "events",
        ["audience_id", "id"],
        sqlite_where=sa.text(events_parked),
        postgresql_where=sa.text(events_parked),
    )


def downgrade() -> None:
    op.drop_index("ix_events_parked", table_name="events")
    op.drop_index("ix_memberships_parked", table_name="memberships")
