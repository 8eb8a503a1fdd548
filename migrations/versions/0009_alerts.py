"""Alert conditions: what is wrong now, so that each start and end is told once

Revision ID: 0009_alerts
Revises: 0008_counters
Create Date: 2026-12-05

- ``alert_conditions``: one row per open condition (an audience held, a source
  failing, changes parked, Gleap down, delivery stalled, a lost lease), keyed by
  its kind and subject (an audience key, "gleap", a host). A row is inserted when
  the condition starts and deleted when it ends; each of the two is what sends an
  alert, so `sync` run from cron, one process per cycle, alerts once, not each
  run. ``notified_at``: the last message about it (reminders count from it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_alerts"
down_revision = "0008_counters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_conditions",
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "subject", name="pk_alert_conditions"),
    )


def downgrade() -> None:
    op.drop_table("alert_conditions")
