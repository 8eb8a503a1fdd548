"""the call log (every request to Gleap), the analysts' views, prunes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

- ``calls`` and ``call_values`` replace ``deliveries``: one row per request
  sent to Gleap (retries included), with the keys and values it carried, its
  attempt number, status, outcome and time. Each old delivery row becomes a
  call (rows of one user, run, time and status become one call, attempt 1).
- ``prunes``: what each `audiencesync prune` deleted, and up to when.
- Indexes for the audit: membership changes by (audience, time), by (user,
  time), and by (audience, user, id) covering the time (it replaces the one by
  (audience, user)).
- The views ``audience_members``, ``membership_history``, ``call_log`` and
  ``run_history`` (docs/schema.md): one SQL text, the same columns on SQLite
  and PostgreSQL. They only read the tables, so a later migration may
  replace them as the tables change, keeping their columns.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

VIEWS = {
    "audience_members": """
SELECT a.key AS audience_key, m.user_id, m.changed_at AS since
FROM memberships m JOIN audiences a ON a.id = m.audience_id
WHERE m.desired = true
""",
    # Each change, and what became of it: acknowledged (a 2xx carried the value
    # after the change and before the next one), superseded (a later change
    # came first), or the membership's current state for the latest change.
    # Failed counts the failures of the current value only (memberships.failures):
    # last_error may be about an earlier value, or a re-queued change.
    # "Next" is by id, along ix_membership_changes_audience_id_user_id_id_at: ids follow
    # time, and min(at) would tempt SQLite to scan the audience's changes by time.
    "membership_history": """
SELECT a.key AS audience_key, h.user_id, h.change, h.at, h.run_id, h.acknowledged_at,
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
      AND v.value = (n.change = 'entered') AND c.outcome = 'acknowledged'
      AND c.at >= n.at AND (n.next_at IS NULL OR c.at < n.next_at)
  ) AS acknowledged_at
  FROM (
    SELECT x.id, x.audience_id, x.user_id, x.change, x.at, x.run_id, (
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
SELECT c.id AS call_id, v.run_id, a.key AS audience_key, c.user_id, v.value, c.attempt, c.at,
  c.elapsed_ms, c.status, c.outcome, c.error
FROM calls c
JOIN call_values v ON v.call_id = c.id
JOIN audiences a ON a.id = v.audience_id
""",
    # "left" is a reserved word in PostgreSQL: the counters are named so that
    # an analyst never has to quote them.
    "run_history": """
SELECT a.key AS audience_key, r.id AS run_id, r.cycle_id, r.mode, r.status, r.started_at,
  r.finished_at, r.source_rows, r.members, r.entered AS users_entered, r."left" AS users_left,
  r.skipped_rows, r.duplicate_rows, r.sent, r.failed, r.unknown, r.retries, r.rate_limited,
  r.pending_after, r.parked_after, r.unknown_after, r.error
FROM sync_runs r JOIN audiences a ON a.id = r.audience_id
""",
}

# How an old delivery's status reads as a call's outcome (gleap.retryable at 0004).
OUTCOME = (
    "CASE WHEN status BETWEEN 200 AND 299 THEN 'acknowledged' WHEN status = 429 THEN 'rate_limited' "
    "WHEN status = 0 OR status IN (408, 429) OR (status BETWEEN 500 AND 599 AND status <> 501) "
    "THEN 'unknown' ELSE 'rejected' END"
)


def create_views() -> None:
    for name, sql in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {sql.strip()}")


def drop_views() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("elapsed_ms", sa.Integer(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_calls"),
    )
    op.create_index("ix_calls_user_id_at", "calls", ["user_id", "at"])
    op.create_index("ix_calls_at", "calls", ["at"])
    op.create_table(
        "call_values",
        sa.Column("call_id", sa.Integer(), nullable=False),
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["call_id"], ["calls.id"], name="fk_call_values_call_id_calls"),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name="fk_call_values_audience_id_audiences"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["sync_runs.id"], name="fk_call_values_run_id_sync_runs"),
        sa.PrimaryKeyConstraint("call_id", "audience_id", name="pk_call_values"),
    )
    op.create_index("ix_call_values_run_id", "call_values", ["run_id"])
    op.create_table(
        "prunes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("by", sa.String(length=16), nullable=False),
        sa.Column("calls", sa.Integer(), server_default="0", nullable=False),
        sa.Column("changes", sa.Integer(), server_default="0", nullable=False),
        sa.Column("runs", sa.Integer(), server_default="0", nullable=False),
        sa.Column("requests", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_prunes"),
    )
    op.create_index("ix_membership_changes_audience_id_at", "membership_changes", ["audience_id", "at"])
    op.create_index("ix_membership_changes_user_id_at", "membership_changes", ["user_id", "at"])
    # A user's change before or after another, by id, read from the index alone: the
    # members at an instant look one up for every departure since (bench/audit_bench.py).
    op.drop_index("ix_membership_changes_audience_id_user_id", table_name="membership_changes")
    op.create_index(
        "ix_membership_changes_audience_id_user_id_id_at",
        "membership_changes",
        ["audience_id", "user_id", "id", "at"],
    )

    # The old log, one call per (user, time, status): the rows of one call (one
    # per audience, each with its audience's run) shared them. The text format of
    # SQLite timestamps is the same in both tables, so they copy as they are.
    op.execute(
        "INSERT INTO calls (user_id, attempt, at, status, outcome, error) "
        f"SELECT user_id, 1, at, status, {OUTCOME}, max(error) FROM deliveries "
        "GROUP BY user_id, at, status ORDER BY min(id)"
    )
    op.execute(
        "INSERT INTO call_values (call_id, audience_id, run_id, value) "
        "SELECT c.id, d.audience_id, d.run_id, min(CASE WHEN d.value THEN 1 ELSE 0 END) = 1 "
        "FROM deliveries d JOIN calls c ON c.user_id = d.user_id AND c.at = d.at "
        "AND c.status = d.status "
        "GROUP BY c.id, d.audience_id, d.run_id"
    )
    op.drop_index("ix_deliveries_audience_id_user_id", table_name="deliveries")
    op.drop_index("ix_deliveries_run_id", table_name="deliveries")
    op.drop_table("deliveries")
    create_views()


def downgrade() -> None:
    drop_views()
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("value", sa.Boolean(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name="fk_deliveries_audience_id_audiences"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["sync_runs.id"], name="fk_deliveries_run_id_sync_runs"),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
    )
    op.create_index("ix_deliveries_run_id", "deliveries", ["run_id"])
    op.create_index("ix_deliveries_audience_id_user_id", "deliveries", ["audience_id", "user_id"])
    # The old log kept one row per answer: the last request of each call.
    op.execute(
        "INSERT INTO deliveries (run_id, audience_id, user_id, value, status, error, at) "
        "SELECT v.run_id, v.audience_id, c.user_id, v.value, c.status, c.error, c.at "
        "FROM calls c JOIN call_values v ON v.call_id = c.id WHERE c.outcome <> 'not_sent' "
        "ORDER BY c.id"
    )
    op.drop_index("ix_membership_changes_audience_id_user_id_id_at", table_name="membership_changes")
    op.create_index(
        "ix_membership_changes_audience_id_user_id", "membership_changes", ["audience_id", "user_id"]
    )
    op.drop_index("ix_membership_changes_user_id_at", table_name="membership_changes")
    op.drop_index("ix_membership_changes_audience_id_at", table_name="membership_changes")
    op.drop_table("prunes")
    op.drop_index("ix_call_values_run_id", table_name="call_values")
    op.drop_table("call_values")
    op.drop_index("ix_calls_at", table_name="calls")
    op.drop_index("ix_calls_user_id_at", table_name="calls")
    op.drop_table("calls")
