"""Audience Entered / Exited events: the outbox of track events, and their run counters

Revision ID: 0006_events
Revises: 0005
Create Date: 2026-12-02

- ``events``: one row per Audience Entered / Exited event owed to (or told to)
  Gleap's ``POST /admin/track``, created in the refresh's transaction from its
  ``entered``/``left`` membership changes, with its delivery state.
- ``sync_runs.events_sent`` and ``events_failed``: what each run delivered;
  ``prunes.events``: the acknowledged events each prune deleted.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_events"
down_revision = "0006_forget"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("change", sa.String(length=8), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("audience_name", sa.String(length=255), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unknown", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("sends", sa.Integer(), server_default="0", nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["audience_id"], ["audiences.id"], name="fk_events_audience_id_audiences"),
        sa.ForeignKeyConstraint(["run_id"], ["sync_runs.id"], name="fk_events_run_id_sync_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_user_id_id", "events", ["user_id", "id"])
    unsent = sa.text("acked_at IS NULL AND parked_at IS NULL")
    op.create_index("ix_events_unsent", "events", ["id"], sqlite_where=unsent, postgresql_where=unsent)
    op.create_index("ix_events_run_id", "events", ["run_id"])
    op.create_index("ix_events_acked_at", "events", ["acked_at"])
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("events_sent", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("events_failed", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("prunes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("events", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    # Not batch mode: on SQLite it would copy sync_runs and drop the original, which the
    # foreign keys of its changes and calls forbid. Both databases drop a column in place.
    op.execute("ALTER TABLE sync_runs DROP COLUMN events_failed")
    op.execute("ALTER TABLE sync_runs DROP COLUMN events_sent")
    op.execute("ALTER TABLE prunes DROP COLUMN events")
    op.drop_index("ix_events_acked_at", table_name="events")
    op.drop_index("ix_events_run_id", table_name="events")
    op.drop_index("ix_events_unsent", table_name="events")
    op.drop_index("ix_events_user_id_id", table_name="events")
    op.drop_table("events")
