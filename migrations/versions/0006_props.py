"""properties with values: traits beside audiences, a desired and an acknowledged value per row

Revision ID: 0006_props
Revises: 0005
Create Date: 2026-12-02

- audiences: ``kind`` ('audience' or 'trait'); every existing row is an audience.
  ``missing``: the JSON a trait sends for a user who has no value (NULL: null).
- memberships: ``value`` (the canonical JSON the row must carry: a trait's
  value, an audience member's contact fields) and ``acked_value`` (the value
  Gleap acknowledged). ``pending`` also holds while a member's value differs
  from the acknowledged one. Existing rows carry no value on either side, so
  nothing acknowledged becomes pending and nothing pending stops being so.
  A generated column can't be altered: it is dropped and added again on
  PostgreSQL, and the table is rebuilt on SQLite.
- membership_changes: ``value``; ``change`` may now be 'changed' too.
- sync_runs: ``changed`` (members whose value changed).
- call_values: ``data``, the JSON of the value a call carried for the row.
- The views ``membership_history`` (with ``value``; a change is acknowledged by
  a call that carried its value), ``call_log`` (with ``data``) and
  ``run_history`` (with ``users_changed``) are recreated; ``audience_members``
  lists audience members only, and ``audience_kind`` is added to each view
  that names an audience.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0006_props"
down_revision = "0006_events"
branch_labels = None
depends_on = None

OLD_PENDING = "resend OR unknown OR desired <> coalesce(acked, false)"
PENDING = {
    "postgresql": OLD_PENDING + " OR (desired AND value IS DISTINCT FROM acked_value)",
    "sqlite": OLD_PENDING + " OR (desired AND value IS NOT acked_value)",
}


def _views_of_0005() -> dict[str, str]:
    """The views as 0005 made them, for the downgrade: one text, never copied."""
    spec = importlib.util.spec_from_file_location(
        "_audiencesync_0005", Path(__file__).with_name("0005_call_log_views_prunes.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    views: dict[str, str] = module.VIEWS
    return views


VIEWS = {
    "audience_members": """
SELECT a.key AS audience_key, m.user_id, m.changed_at AS since
FROM memberships m JOIN audiences a ON a.id = m.audience_id
WHERE m.desired = true AND a.kind = 'audience'
""",
    # As in 0005, and: 'changed' rows (a new value for a member) are changes too;
    # a change is acknowledged by a call that carried its membership and, when it
    # has one, its value.
    "membership_history": """
SELECT a.key AS audience_key, a.kind AS audience_kind, h.user_id, h.change, h.value, h.at, h.run_id,
  h.acknowledged_at,
  CASE
    WHEN h.acknowledged_at IS NOT NULL THEN 'acknowledged'
    WHEN h.next_at IS NOT NULL THEN 'superseded'
    WHEN m.parked_at IS NOT NULL THEN 'parked'
    WHEN m.pending AND m.unknown THEN 'unknown'
    WHEN m.pending AND m.failures > 0 THEN 'failed'
    WHEN m.pending THEN 'pending'
    ELSE 'settled'
  END AS delivery_state,
  CASE WHEN h.next_at IS NULL THEN m.last_status END AS last_status,
  CASE WHEN h.next_at IS NULL THEN m.last_error END AS last_error
FROM (
  SELECT n.*, (
    SELECT min(c.at) FROM calls c JOIN call_values v ON v.call_id = c.id
    WHERE c.user_id = n.user_id AND v.audience_id = n.audience_id
      AND v.value = (n.change <> 'left') AND c.outcome = 'acknowledged'
      AND (n.change = 'left' OR n.value IS NULL OR v.data = n.value)
      AND c.at >= n.at AND (n.next_at IS NULL OR c.at < n.next_at)
  ) AS acknowledged_at
  FROM (
    SELECT x.id, x.audience_id, x.user_id, x.change, x.value, x.at, x.run_id, (
      SELECT y.at FROM membership_changes y
      WHERE y.audience_id = x.audience_id AND y.user_id = x.user_id AND y.id > x.id
      ORDER BY y.id LIMIT 1
    ) AS next_at
    FROM membership_changes x
  ) n
) h
JOIN audiences a ON a.id = h.audience_id
LEFT JOIN memberships m ON m.audience_id = h.audience_id AND m.user_id = h.user_id
""",
    "call_log": """
SELECT c.id AS call_id, v.run_id, a.key AS audience_key, a.kind AS audience_kind, c.user_id, v.value,
  v.data, c.attempt, c.at, c.elapsed_ms, c.status, c.outcome, c.error
FROM calls c
JOIN call_values v ON v.call_id = c.id
JOIN audiences a ON a.id = v.audience_id
""",
    "run_history": """
SELECT a.key AS audience_key, a.kind AS audience_kind, r.id AS run_id, r.cycle_id, r.mode, r.status,
  r.started_at, r.finished_at, r.source_rows, r.members, r.entered AS users_entered,
  r."left" AS users_left, r.changed AS users_changed, r.skipped_rows, r.duplicate_rows, r.sent,
  r.failed, r.unknown, r.retries, r.rate_limited, r.pending_after, r.parked_after, r.unknown_after,
  r.error
FROM sync_runs r JOIN audiences a ON a.id = r.audience_id
""",
}


def _drop_views() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def _create_views(views: dict[str, str]) -> None:
    for name, sql in views.items():
        op.execute(f"CREATE VIEW {name} AS {sql.strip()}")


def _memberships_columns(pending: str, *, new: bool) -> list[sa.Column[object]]:
    columns: list[sa.Column[object]] = [
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("desired", sa.Boolean(), nullable=False),
        sa.Column("acked", sa.Boolean(), nullable=True),
    ]
    if new:
        columns += [
            sa.Column("value", sa.Text(), nullable=True),
            sa.Column("acked_value", sa.Text(), nullable=True),
        ]
    columns += [
        sa.Column("resend", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("unknown", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("pending", sa.Boolean(), sa.Computed(pending, persisted=True), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True),
    ]
    return columns


def _create_pending_index() -> None:
    op.create_index(
        "ix_memberships_pending",
        "memberships",
        ["user_id", "audience_id"],
        unique=False,
        sqlite_where=sa.text("pending = 1"),
        postgresql_where=sa.text("pending"),
    )


def _rebuild_sqlite_memberships(pending: str, *, new: bool) -> None:
    copied = [
        "audience_id", "user_id", "desired", "acked", "resend", "unknown", "changed_at", "acked_at",
        "attempts", "failures", "next_attempt_at", "last_status", "last_error", "parked_at",
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


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    _drop_views()
    op.add_column(
        "audiences", sa.Column("kind", sa.String(length=16), server_default="audience", nullable=False)
    )
    op.add_column("audiences", sa.Column("missing", sa.Text(), nullable=True))
    if dialect == "sqlite":
        _rebuild_sqlite_memberships(PENDING["sqlite"], new=True)
    else:
        op.drop_index("ix_memberships_pending", table_name="memberships")
        op.drop_column("memberships", "pending")
        op.add_column("memberships", sa.Column("value", sa.Text(), nullable=True))
        op.add_column("memberships", sa.Column("acked_value", sa.Text(), nullable=True))
        op.add_column(
            "memberships",
            sa.Column(
                "pending", sa.Boolean(), sa.Computed(PENDING["postgresql"], persisted=True), nullable=True
            ),
        )
        _create_pending_index()
    # ADD COLUMN needs no table rebuild on either database.
    op.add_column("membership_changes", sa.Column("value", sa.Text(), nullable=True))
    op.add_column("call_values", sa.Column("data", sa.Text(), nullable=True))
    op.add_column("sync_runs", sa.Column("changed", sa.Integer(), server_default="0", nullable=False))
    _create_views(VIEWS)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    _drop_views()
    # What 0005 can't hold goes: traits and their history, 'changed' rows.
    traits = "SELECT id FROM audiences WHERE kind = 'trait'"
    trait_runs = f"SELECT id FROM sync_runs WHERE audience_id IN ({traits})"
    op.execute(f"DELETE FROM call_values WHERE audience_id IN ({traits})")
    op.execute(f"DELETE FROM membership_changes WHERE audience_id IN ({traits}) OR change = 'changed'")
    op.execute(f"UPDATE admin_requests SET run_id = NULL WHERE run_id IN ({trait_runs})")
    op.execute(f"DELETE FROM sync_runs WHERE audience_id IN ({traits})")
    op.execute(f"DELETE FROM memberships WHERE audience_id IN ({traits})")
    op.execute("DELETE FROM audiences WHERE kind = 'trait'")
    # Plain ALTER TABLE DROP COLUMN (SQLite 3.35+): a batch rebuild of a table others
    # refer to would trip SQLite's foreign keys.
    for table, column in (("sync_runs", "changed"), ("call_values", "data"), ("membership_changes", "value")):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    if dialect == "sqlite":
        _rebuild_sqlite_memberships(OLD_PENDING, new=False)
    else:
        op.drop_index("ix_memberships_pending", table_name="memberships")
        for column in ("pending", "acked_value", "value"):
            op.drop_column("memberships", column)
        op.add_column(
            "memberships",
            sa.Column("pending", sa.Boolean(), sa.Computed(OLD_PENDING, persisted=True), nullable=True),
        )
        _create_pending_index()
    op.execute("ALTER TABLE audiences DROP COLUMN missing")
    op.execute("ALTER TABLE audiences DROP COLUMN kind")
    _create_views(_views_of_0005())
