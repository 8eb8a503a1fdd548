"""Per-audience counters kept by triggers; indexes for the oldest pending change, backoffs and users

Revision ID: 0008_counters
Revises: 0007_loose
Create Date: 2026-12-04

- ``audience_counts``: one row per audience (made by a trigger on ``audiences``)
  with its members, pending, parked, unknown and fields-pending counts, kept by
  triggers on ``memberships`` in the transaction of each write, so they never
  drift from the rows: `status`, /metrics and /healthz read them instead of
  counting the memberships. SQLite: row triggers. PostgreSQL: statement triggers
  with transition tables, so a refresh of a million rows pays one aggregate, not
  a million firings. Backfilled here from the rows.
- ``ix_memberships_oldest_pending`` (audience_id, changed_at) over deliverable
  rows: an audience's oldest pending change is its first entry.
- ``ix_memberships_backoff`` (audience_id, next_attempt_at) over deliverable
  rows waiting out a backoff: what is due is the pending count minus the rows
  still waiting, counted from an index that holds only those.
- ``ix_memberships_user_id``: lookups by user alone (forget, retry --user)
  read an index, not the table (the primary key leads with the audience).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_counters"
down_revision = "0007_loose"
branch_labels = None
depends_on = None

COUNTERS = ("members", "pending", "parked", "unknown", "fields_pending")

DELIVERABLE = "pending AND parked_at IS NULL"
BACKOFF = f"{DELIVERABLE} AND next_attempt_at IS NOT NULL"


def _conditions(row: str, distinct: str) -> dict[str, str]:
    """When a row counts in each counter (status.py's definitions), its columns read from ``row``."""
    r = row
    deliverable = f"{r}.pending AND {r}.parked_at IS NULL"
    return {
        "members": f"{r}.desired",
        "pending": deliverable,
        "parked": f"{r}.pending AND {r}.parked_at IS NOT NULL",
        "unknown": f"{r}.unknown",
        "fields_pending": (
            f"{deliverable} AND {r}.desired AND {r}.value IS NOT NULL "
            f"AND {r}.value {distinct} {r}.acked_value"
        ),
    }


def _sqlite_triggers() -> list[str]:
    def delta(sign: str, row: str) -> str:
        return ", ".join(f"{c} = {c} {sign} ({e})" for c, e in _conditions(row, "IS NOT").items())

    def both(c: str) -> str:
        new, old = _conditions("NEW", "IS NOT")[c], _conditions("OLD", "IS NOT")[c]
        return f"{c} = {c} + ({new}) - ({old})"

    # The columns pending and the counters derive from: an update of any other
    # (last_error, next_attempt_at...) fires nothing.
    watched = "desired, acked, value, acked_value, resend, unknown, parked_at, audience_id"
    return [
        "CREATE TRIGGER audience_counts_new_audience AFTER INSERT ON audiences BEGIN "
        "INSERT INTO audience_counts (audience_id) VALUES (NEW.id); END",
        "CREATE TRIGGER audience_counts_gone_audience AFTER DELETE ON audiences BEGIN "
        "DELETE FROM audience_counts WHERE audience_id = OLD.id; END",
        "CREATE TRIGGER audience_counts_insert AFTER INSERT ON memberships BEGIN "
        f"UPDATE audience_counts SET {delta('+', 'NEW')} WHERE audience_id = NEW.audience_id; END",
        "CREATE TRIGGER audience_counts_delete AFTER DELETE ON memberships BEGIN "
        f"UPDATE audience_counts SET {delta('-', 'OLD')} WHERE audience_id = OLD.audience_id; END",
        f"CREATE TRIGGER audience_counts_update AFTER UPDATE OF {watched} ON memberships "
        "WHEN OLD.audience_id = NEW.audience_id BEGIN "
        f"UPDATE audience_counts SET {', '.join(both(c) for c in COUNTERS)} "
        "WHERE audience_id = NEW.audience_id; END",
        f"CREATE TRIGGER audience_counts_move AFTER UPDATE OF {watched} ON memberships "
        "WHEN OLD.audience_id <> NEW.audience_id BEGIN "
        f"UPDATE audience_counts SET {delta('-', 'OLD')} WHERE audience_id = OLD.audience_id; "
        f"UPDATE audience_counts SET {delta('+', 'NEW')} WHERE audience_id = NEW.audience_id; END",
    ]


def _postgresql_delta(parts: list[tuple[str, str]]) -> str:
    """Per audience, the counters' change from transition tables: (table, +1 or -1) each."""
    selects = [
        "SELECT audience_id, "
        + ", ".join(
            f"{sign} * count(*) FILTER (WHERE {e}) AS {c}"
            for c, e in _conditions(table, "IS DISTINCT FROM").items()
        )
        + f" FROM {table} GROUP BY audience_id"
        for table, sign in parts
    ]
    sums = ", ".join(f"sum({c})::bigint AS {c}" for c in COUNTERS)
    return f"SELECT audience_id, {sums} FROM ({' UNION ALL '.join(selects)}) AS d GROUP BY audience_id"


def _postgresql_function(name: str, parts: list[tuple[str, str]]) -> str:
    # One UPDATE per audience, in audience order: a statement that touches several
    # audiences takes their counter rows' locks in one order, whoever runs it.
    sets = ", ".join(f"{c} = {c} + d.{c}" for c in COUNTERS)
    changed = " OR ".join(f"d.{c} <> 0" for c in COUNTERS)
    return (
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "DECLARE d record;\n"
        "BEGIN\n"
        f"  FOR d IN {_postgresql_delta(parts)} ORDER BY audience_id LOOP\n"
        f"    IF {changed} THEN\n"
        f"      UPDATE audience_counts SET {sets} WHERE audience_id = d.audience_id;\n"
        "    END IF;\n"
        "  END LOOP;\n"
        "  RETURN NULL;\n"
        "END $$"
    )


def _postgresql_triggers() -> list[str]:
    return [
        "CREATE FUNCTION audience_counts_new_audience() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN INSERT INTO audience_counts (audience_id) VALUES (NEW.id); RETURN NULL; END $$",
        "CREATE TRIGGER audience_counts_new_audience AFTER INSERT ON audiences "
        "FOR EACH ROW EXECUTE FUNCTION audience_counts_new_audience()",
        "CREATE FUNCTION audience_counts_gone_audience() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN DELETE FROM audience_counts WHERE audience_id = OLD.id; RETURN OLD; END $$",
        "CREATE TRIGGER audience_counts_gone_audience BEFORE DELETE ON audiences "
        "FOR EACH ROW EXECUTE FUNCTION audience_counts_gone_audience()",
        _postgresql_function("audience_counts_insert", [("new_rows", "1")]),
        _postgresql_function("audience_counts_delete", [("old_rows", "-1")]),
        _postgresql_function("audience_counts_update", [("new_rows", "1"), ("old_rows", "-1")]),
        "CREATE TRIGGER audience_counts_insert AFTER INSERT ON memberships REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION audience_counts_insert()",
        "CREATE TRIGGER audience_counts_delete AFTER DELETE ON memberships REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION audience_counts_delete()",
        "CREATE TRIGGER audience_counts_update AFTER UPDATE ON memberships "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION audience_counts_update()",
    ]


def _backfill(distinct: str) -> str:
    """Every audience's counters, counted from its rows."""
    sums = ", ".join(
        f"sum(CASE WHEN {e} THEN 1 ELSE 0 END) AS {c}" for c, e in _conditions("m", distinct).items()
    )
    coalesced = ", ".join(f"coalesce(c.{c}, 0)" for c in COUNTERS)
    return (
        f"INSERT INTO audience_counts (audience_id, {', '.join(COUNTERS)}) "
        f"SELECT a.id, {coalesced} FROM audiences a LEFT JOIN "
        f"(SELECT m.audience_id, {sums} FROM memberships m GROUP BY m.audience_id) c ON c.audience_id = a.id"
    )


def upgrade() -> None:
    op.create_table(
        "audience_counts",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        *(sa.Column(c, sa.BigInteger(), server_default="0", nullable=False) for c in COUNTERS),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name="fk_audience_counts_audience_id_audiences"
        ),
        sa.PrimaryKeyConstraint("audience_id", name="pk_audience_counts"),
    )
    sqlite = op.get_bind().dialect.name == "sqlite"
    deliverable = DELIVERABLE.replace("pending AND", "pending = 1 AND") if sqlite else DELIVERABLE
    backoff = BACKOFF.replace("pending AND", "pending = 1 AND") if sqlite else BACKOFF
    op.execute(_backfill("IS NOT" if sqlite else "IS DISTINCT FROM"))
    for statement in _sqlite_triggers() if sqlite else _postgresql_triggers():
        op.execute(statement)
    op.create_index(
        "ix_memberships_oldest_pending",
        "memberships",
        ["audience_id", "changed_at"],
        sqlite_where=sa.text(deliverable),
        postgresql_where=sa.text(deliverable),
    )
    op.create_index(
        "ix_memberships_backoff",
        "memberships",
        ["audience_id", "next_attempt_at"],
        sqlite_where=sa.text(backoff),
        postgresql_where=sa.text(backoff),
    )
    op.create_index("ix_memberships_user_id", "memberships", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_memberships_user_id", table_name="memberships")
    op.drop_index("ix_memberships_backoff", table_name="memberships")
    op.drop_index("ix_memberships_oldest_pending", table_name="memberships")
    sqlite = op.get_bind().dialect.name == "sqlite"
    for name, table in (
        ("audience_counts_new_audience", "audiences"),
        ("audience_counts_gone_audience", "audiences"),
        ("audience_counts_insert", "memberships"),
        ("audience_counts_delete", "memberships"),
        ("audience_counts_update", "memberships"),
        ("audience_counts_move", "memberships"),
    ):
        if sqlite:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    op.drop_table("audience_counts")
