"""sync_runs counts contact fields: field warnings and conflicts; run_history shows them and the events

Revision ID: 0007_loose
Revises: 0006_props
Create Date: 2026-12-02

- sync_runs: ``field_warnings`` (contact fields the run's read skipped for a
  value of the wrong type) and ``field_conflicts`` (fields its delivery sent
  with the value of an audience listed before it). Existing runs count 0.
- The view ``run_history`` is recreated with them, and with ``events_sent``
  and ``events_failed`` (0006_events' counters, which 0006_props' view left
  out): one SQL text, the same columns on SQLite and PostgreSQL.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0007_loose"
down_revision = "0006_props"
branch_labels = None
depends_on = None

COLUMNS = ("field_warnings", "field_conflicts")

RUN_HISTORY = """
SELECT a.key AS audience_key, a.kind AS audience_kind, r.id AS run_id, r.cycle_id, r.mode, r.status,
  r.started_at, r.finished_at, r.source_rows, r.members, r.entered AS users_entered,
  r."left" AS users_left, r.changed AS users_changed, r.skipped_rows, r.duplicate_rows, r.sent,
  r.failed, r.unknown, r.retries, r.rate_limited, r.pending_after, r.parked_after, r.unknown_after,
  r.events_sent, r.events_failed, r.field_warnings, r.field_conflicts, r.error
FROM sync_runs r JOIN audiences a ON a.id = r.audience_id
"""


def _run_history_of_0006() -> str:
    """run_history as 0006_props made it, for the downgrade: one text, never copied."""
    spec = importlib.util.spec_from_file_location(
        "_audiencesync_0006_props", Path(__file__).with_name("0006_props.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    view: str = module.VIEWS["run_history"]
    return view


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_history")
    # ADD COLUMN needs no table rebuild on either database.
    for column in COLUMNS:
        op.add_column("sync_runs", sa.Column(column, sa.Integer(), server_default="0", nullable=False))
    op.execute(f"CREATE VIEW run_history AS {RUN_HISTORY.strip()}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS run_history")
    # Plain ALTER TABLE DROP COLUMN (SQLite 3.35+), as 0006_props does.
    for column in reversed(COLUMNS):
        op.execute(f"ALTER TABLE sync_runs DROP COLUMN {column}")
    op.execute(f"CREATE VIEW run_history AS {_run_history_of_0006().strip()}")
