"""What Gleap acknowledged per user and contact field; each audience's place in the config

Revision ID: 0012_contact_fields
Revises: 0011_events_parked_together
Create Date: 2026-12-06

- ``contact_fields`` (user_id, field) -> value: the canonical JSON of the value the last
  call Gleap answered 2xx carried for that field. Until now only each audience row's own
  fields were known to be acknowledged (``memberships.acked_value``), not what the user's
  call carried (the value of the first audience in the config that gives the field), so a
  change of the winning value that no row's own fields showed (a retired, removed or
  reordered audience) was never sent.
- ``audience_counts.fields_pending`` also counts a member owed a resend (``resend``: a
  reconciled winner, ``sync --full``): its fields go out again. The counters' triggers on
  ``memberships`` are made again with that condition (0008's builders), and the counter
  recounted from the rows.
- ``audiences.field_rank``: the audience's place in the config when the winning values were
  last reconciled (``field_winners.py``); NULL for now, so the first delivery pass after this
  upgrade compares every member with fields against what this backfill says Gleap holds.

Backfill: a user's field is taken as held when every acknowledged row of theirs that gave
it (``acked``, no unknown outcome) agrees on its value. Where they disagree (the call
carried the winner, which no row records), or a row's outcome is unknown, nothing is
backfilled: the field counts as owed, and the next sync sends the winning value once.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0012_contact_fields"
down_revision = "0011_events_parked_together"
branch_labels = None
depends_on = None

BATCH = 5_000


def _canonical(value: Any) -> str:
    # values.encode, frozen here: a migration must not change when the package does.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def upgrade() -> None:
    op.add_column("audiences", sa.Column("field_rank", sa.Integer(), nullable=True))
    op.create_table(
        "contact_fields",
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("field", sa.String(255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "field", name="pk_contact_fields"),
    )
    _backfill(op.get_bind())
    _recreate_membership_counters(resend=True)


def _backfill(conn: sa.Connection) -> None:
    """Keyset batches of users with fields on an audience row, grouped in Python: portable, and
    the values compared in the exact text the application writes."""
    after = ""
    rows_sql = sa.text(
        "SELECT m.user_id, m.acked, m.unknown, m.acked_value, "
        "coalesce(m.acked_at, m.changed_at) AS acked_at FROM memberships m "
        "JOIN audiences a ON a.id = m.audience_id WHERE a.kind = 'audience' "
        "AND (m.acked_value IS NOT NULL OR m.value IS NOT NULL) AND m.user_id IN ("
        "SELECT DISTINCT user_id FROM memberships WHERE user_id > :after "
        "AND (acked_value IS NOT NULL OR value IS NOT NULL) ORDER BY user_id LIMIT :n) "
        "ORDER BY m.user_id"
    )
    insert = sa.text("INSERT INTO contact_fields (user_id, field, value, acked_at) VALUES (:u, :f, :v, :t)")
    while True:
        rows = conn.execute(rows_sql, {"after": after, "n": BATCH}).all()
        if not rows:
            return
        by_user: dict[str, list[Any]] = {}
        for row in rows:
            by_user.setdefault(row.user_id, []).append(row)
        out: list[dict[str, Any]] = []
        for user_id, theirs in by_user.items():
            if any(r.unknown for r in theirs):
                continue  # Gleap may hold anything a call with no verdict carried
            seen: dict[str, str | None] = {}  # field -> its value, None when rows disagree
            when: dict[str, Any] = {}
            for r in theirs:
                if not r.acked or r.acked_value is None:
                    continue
                acked = json.loads(r.acked_value)
                if not isinstance(acked, dict):
                    continue
                for name, value in acked.items():
                    text = _canonical(value)
                    seen[name] = text if seen.get(name, text) == text else None
                    when[name] = max(when.get(name, r.acked_at), r.acked_at)
            out += [
                {"u": user_id, "f": name, "v": text, "t": when[name]}
                for name, text in seen.items()
                if text is not None
            ]
        if out:
            # The times go back as they were read: on SQLite the application's text format.
            conn.execute(insert, out)
        after = rows[-1].user_id


# --- the fields_pending counter: a member flagged to resend is owed its fields too -----------------


def _counters_0008() -> Any:
    """Migration 0008's trigger builders, loaded from its file (one text, never copied)."""
    spec = importlib.util.spec_from_file_location(
        "_audiencesync_0008", Path(__file__).with_name("0008_counters.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fields_owed(resend: bool) -> Callable[[str, str], dict[str, str]]:
    """0008's membership counters, with fields_pending counting a member owed a resend (a
    reconciled winner, ``sync --full``) when ``resend``."""
    base = _counters_0008()._membership_conditions

    def conditions(r: str, distinct: str) -> dict[str, str]:
        out: dict[str, str] = base(r, distinct)
        if resend:
            out["fields_pending"] = (
                f"{r}.pending AND {r}.parked_at IS NULL AND {r}.desired AND {r}.value IS NOT NULL "
                f"AND ({r}.value {distinct} {r}.acked_value OR {r}.resend)"
            )
        return out

    return conditions


def _recreate_membership_counters(resend: bool) -> None:
    """Drop the counters' triggers on memberships and make them again with the new condition,
    then recount fields_pending from the rows, all in the migration's transaction."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    module = _counters_0008()
    _, watched = module.TABLES["memberships"]
    conditions = _fields_owed(resend)
    module.TABLES = {"memberships": (conditions, watched)}
    for name in ("insert", "delete", "update", "move"):
        if sqlite:
            op.execute(f"DROP TRIGGER IF EXISTS memberships_counts_{name}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS memberships_counts_{name} ON memberships")
            op.execute(f"DROP FUNCTION IF EXISTS memberships_counts_{name}()")
    made = module._sqlite_triggers() if sqlite else module._postgresql_triggers()
    for statement in made:
        if "memberships_counts_" in statement.split("(")[0]:
            op.execute(statement)
    distinct = "IS NOT" if sqlite else "IS DISTINCT FROM"
    owed = conditions("t", distinct)["fields_pending"]
    op.execute(
        "UPDATE audience_counts SET fields_pending = (SELECT count(*) FROM memberships t "
        f"WHERE t.audience_id = audience_counts.audience_id AND {owed})"
    )


def downgrade() -> None:
    _recreate_membership_counters(resend=False)
    op.drop_table("contact_fields")
    # Plain ALTER TABLE DROP COLUMN (SQLite 3.35+), as 0006's downgrade: a batch rebuild of
    # audiences, which other tables refer to, would trip SQLite's foreign keys.
    op.execute("ALTER TABLE audiences DROP COLUMN field_rank")
