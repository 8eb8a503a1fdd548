"""unknown outcomes, per-user backoff, admin requests, lease roles, UTC text on SQLite

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

- memberships: ``unknown`` (a call's outcome is not known), ``failures`` and
  ``next_attempt_at`` (the per-user backoff); ``pending`` now includes
  ``unknown``. A generated column can't be altered in place, so it is dropped
  and added again on PostgreSQL, and the table is rebuilt on SQLite.
- sync_runs: ``unknown``, ``parked_after``, ``unknown_after``.
- leases: ``role``, ``instance``, ``health``, ``progress_at``.
- admin_requests: actions asked of a running daemon.
- SQLite: every timestamp is rewritten as ISO 8601 text with its offset, one
  fixed format (some were written without an offset, some with).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

PENDING = "resend OR unknown OR desired <> coalesce(acked, false)"
OLD_PENDING = "resend OR desired <> coalesce(acked, false)"

TIMESTAMPS = {
    "audiences": ("created_at", "refreshed_at", "next_run_at"),
    "memberships": ("changed_at", "acked_at", "parked_at"),
    "sync_runs": ("started_at", "finished_at"),
    "membership_changes": ("at",),
    "deliveries": ("at",),
    "leases": ("acquired_at", "renewed_at", "expires_at"),
}


def _memberships_columns(pending: str, *, new: bool) -> list[sa.Column[object]]:
    columns: list[sa.Column[object]] = [
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("desired", sa.Boolean(), nullable=False),
        sa.Column("acked", sa.Boolean(), nullable=True),
        sa.Column("resend", sa.Boolean(), server_default=sa.false(), nullable=False),
    ]
    if new:
        columns.append(sa.Column("unknown", sa.Boolean(), server_default=sa.false(), nullable=False))
    columns += [
        sa.Column("pending", sa.Boolean(), sa.Computed(pending, persisted=True), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
    ]
    if new:
        columns += [
            sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
            sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        ]
    columns += [
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True),
    ]
    return columns


def _rebuild_sqlite_memberships(pending: str, *, new: bool) -> None:
    copied = [
        "audience_id", "user_id", "desired", "acked", "resend", "changed_at", "acked_at",
        "attempts", "last_status", "last_error", "parked_at",
    ]  # fmt: skip
    op.drop_index("ix_memberships_pending", table_name="memberships")
    op.create_table(
        "memberships_rebuilt",
        *_memberships_columns(pending, new=new),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name="fk_memberships_audience_id_audiences"
        ),
        sa.PrimaryKeyConstraint("audience_id", "user_id", name="pk_memberships"),
    )
    names = ", ".join(copied)
    op.execute(f"INSERT INTO memberships_rebuilt ({names}) SELECT {names} FROM memberships")
    op.drop_table("memberships")
    op.rename_table("memberships_rebuilt", "memberships")
    _create_pending_index()


def _create_pending_index() -> None:
    op.create_index(
        "ix_memberships_pending",
        "memberships",
        ["user_id", "audience_id"],
        unique=False,
        sqlite_where=sa.text("pending = 1"),
        postgresql_where=sa.text("pending"),
    )


def _normalise_sqlite_timestamps() -> None:
    # Rows were written both as "2026-12-01 19:25:25.123456" and with "+00:00",
    # with or without microseconds; all were UTC. One format from now on.
    for table, columns in TIMESTAMPS.items():
        for column in columns:
            base = f"replace({column}, '+00:00', '')"
            op.execute(
                f"UPDATE {table} SET {column} = substr({base}, 1, 19) || '.' || "
                f"substr(substr({base}, 21) || '000000', 1, 6) || '+00:00' WHERE {column} IS NOT NULL"
            )


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        _rebuild_sqlite_memberships(PENDING, new=True)
    else:
        op.drop_index("ix_memberships_pending", table_name="memberships")
        op.drop_column("memberships", "pending")
        op.add_column(
            "memberships", sa.Column("unknown", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        op.add_column("memberships", sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
        op.add_column("memberships", sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        op.add_column(
            "memberships",
            sa.Column("pending", sa.Boolean(), sa.Computed(PENDING, persisted=True), nullable=True),
        )
        _create_pending_index()

    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unknown", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("parked_after", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("unknown_after", sa.Integer(), server_default="0", nullable=False))

    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), server_default="sync", nullable=False))
        batch_op.add_column(sa.Column("instance", sa.String(length=255), server_default="", nullable=False))
        batch_op.add_column(sa.Column("health", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True))

    op.create_table(
        "admin_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("audience_key", sa.String(length=255), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_by", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["sync_runs.id"], name="fk_admin_requests_run_id_sync_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_admin_requests"),
    )
    op.create_index("ix_admin_requests_state", "admin_requests", ["state"], unique=False)

    if sqlite:
        _normalise_sqlite_timestamps()


def downgrade() -> None:
    op.drop_index("ix_admin_requests_state", table_name="admin_requests")
    op.drop_table("admin_requests")
    with op.batch_alter_table("leases", schema=None) as batch_op:
        for column in ("progress_at", "health", "instance", "role"):
            batch_op.drop_column(column)
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        for column in ("unknown_after", "parked_after", "unknown"):
            batch_op.drop_column(column)
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite_memberships(OLD_PENDING, new=False)
    else:
        op.drop_index("ix_memberships_pending", table_name="memberships")
        for column in ("pending", "next_attempt_at", "failures", "unknown"):
            op.drop_column("memberships", column)
        op.add_column(
            "memberships",
            sa.Column("pending", sa.Boolean(), sa.Computed(OLD_PENDING, persisted=True), nullable=True),
        )
        _create_pending_index()
