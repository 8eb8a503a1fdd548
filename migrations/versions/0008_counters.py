"""Per-audience counters kept by triggers; indexes for the oldest pending change, backoffs and users

Revision ID: 0008_counters
Revises: 0007_loose
Create Date: 2026-12-04

- ``audience_counts``: one row per audience (made by a trigger on ``audiences``)
  with its members, pending, parked, unknown and fields-pending counts, and its
  events pending and parked, kept by triggers on ``memberships`` and ``events``
  in the transaction of each write, so they never drift from the rows: `status`,
  /metrics and /healthz read them instead of counting the rows. SQLite: row
  triggers. PostgreSQL: statement triggers with transition tables, so a refresh
  of a million rows pays one aggregate, not a million firings. Backfilled here
  from the rows.
- ``ix_memberships_oldest_pending`` (audience_id, changed_at) over deliverable
  rows: an audience's oldest pending change is its first entry.
- ``ix_memberships_backoff`` (audience_id, next_attempt_at) over deliverable
  rows waiting out a backoff: what is due is the pending count minus the rows
  still waiting, counted from an index that holds only those.
- ``ix_memberships_user_id``: lookups by user alone (forget, retry --user)
  read an index, not the table (the primary key leads with the audience).
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0008_counters"
down_revision = "0007_loose"
branch_labels = None
depends_on = None

DELIVERABLE = "pending AND parked_at IS NULL"
BACKOFF = f"{DELIVERABLE} AND next_attempt_at IS NOT NULL"

# When a row counts in each counter, its columns read from ``r`` (NEW, OLD, a transition
# table); ``distinct`` is the database's null-safe inequality. The definitions of status.py
# and events.py.
Conditions = Callable[[str, str], dict[str, str]]


def _membership_conditions(r: str, distinct: str) -> dict[str, str]:
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


def _event_conditions(r: str, distinct: str) -> dict[str, str]:
    return {
        "events_pending": f"{r}.acked_at IS NULL AND {r}.parked_at IS NULL",
        "events_parked": f"{r}.parked_at IS NOT NULL",
    }


# table -> its counters' conditions, and (SQLite) the columns they derive from: an update of
# any other column (last_error, next_attempt_at...) fires nothing.
TABLES: dict[str, tuple[Conditions, str]] = {
    "memberships": (
        _membership_conditions,
        "desired, acked, value, acked_value, resend, unknown, parked_at, audience_id",
    ),
    "events": (_event_conditions, "acked_at, parked_at, audience_id"),
}
COUNTERS = [c for conditions, _ in TABLES.values() for c in conditions("r", "")]


def _sqlite_triggers() -> list[str]:
    out = [
        "CREATE TRIGGER audience_counts_new_audience AFTER INSERT ON audiences BEGIN "
        "INSERT INTO audience_counts (audience_id) VALUES (NEW.id); END",
        "CREATE TRIGGER audience_counts_gone_audience AFTER DELETE ON audiences BEGIN "
        "DELETE FROM audience_counts WHERE audience_id = OLD.id; END",
    ]
    for table, (conditions, watched) in TABLES.items():

        def delta(sign: str, row: str, conditions: Conditions = conditions) -> str:
            return ", ".join(f"{c} = {c} {sign} ({e})" for c, e in conditions(row, "IS NOT").items())

        new, old = conditions("NEW", "IS NOT"), conditions("OLD", "IS NOT")
        both = ", ".join(f"{c} = {c} + ({new[c]}) - ({old[c]})" for c in new)
        out += [
            f"CREATE TRIGGER {table}_counts_insert AFTER INSERT ON {table} BEGIN "
            f"UPDATE audience_counts SET {delta('+', 'NEW')} WHERE audience_id = NEW.audience_id; END",
            f"CREATE TRIGGER {table}_counts_delete AFTER DELETE ON {table} BEGIN "
            f"UPDATE audience_counts SET {delta('-', 'OLD')} WHERE audience_id = OLD.audience_id; END",
            f"CREATE TRIGGER {table}_counts_update AFTER UPDATE OF {watched} ON {table} "
            "WHEN OLD.audience_id = NEW.audience_id BEGIN "
            f"UPDATE audience_counts SET {both} WHERE audience_id = NEW.audience_id; END",
            f"CREATE TRIGGER {table}_counts_move AFTER UPDATE OF {watched} ON {table} "
            "WHEN OLD.audience_id <> NEW.audience_id BEGIN "
            f"UPDATE audience_counts SET {delta('-', 'OLD')} WHERE audience_id = OLD.audience_id; "
            f"UPDATE audience_counts SET {delta('+', 'NEW')} WHERE audience_id = NEW.audience_id; END",
        ]
    return out


def _postgresql_function(name: str, conditions: Conditions, parts: list[tuple[str, str]]) -> str:
    """A statement trigger's function: per audience, the counters' change, from transition tables
    (table, +1 or -1). One UPDATE per audience, in audience order: a statement that touches several
    audiences takes their counter rows' locks in one order, whoever runs it."""
    counters = list(conditions("r", ""))
    selects = [
        "SELECT audience_id, "
        + ", ".join(
            f"{sign} * count(*) FILTER (WHERE {e}) AS {c}"
            for c, e in conditions(table, "IS DISTINCT FROM").items()
        )
        + f" FROM {table} GROUP BY audience_id"
        for table, sign in parts
    ]
    sums = ", ".join(f"sum({c})::bigint AS {c}" for c in counters)
    delta = f"SELECT audience_id, {sums} FROM ({' UNION ALL '.join(selects)}) AS d GROUP BY audience_id"
    sets = ", ".join(f"{c} = {c} + d.{c}" for c in counters)
    changed = " OR ".join(f"d.{c} <> 0" for c in counters)
    return (
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "DECLARE d record;\n"
        "BEGIN\n"
        f"  FOR d IN {delta} ORDER BY audience_id LOOP\n"
        f"    IF {changed} THEN\n"
        f"      UPDATE audience_counts SET {sets} WHERE audience_id = d.audience_id;\n"
        "    END IF;\n"
        "  END LOOP;\n"
        "  RETURN NULL;\n"
        "END $$"
    )


def _postgresql_triggers() -> list[str]:
    out = [
        "CREATE FUNCTION audience_counts_new_audience() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN INSERT INTO audience_counts (audience_id) VALUES (NEW.id); RETURN NULL; END $$",
        "CREATE TRIGGER audience_counts_new_audience AFTER INSERT ON audiences "
        "FOR EACH ROW EXECUTE FUNCTION audience_counts_new_audience()",
        "CREATE FUNCTION audience_counts_gone_audience() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN DELETE FROM audience_counts WHERE audience_id = OLD.id; RETURN OLD; END $$",
        "CREATE TRIGGER audience_counts_gone_audience BEFORE DELETE ON audiences "
        "FOR EACH ROW EXECUTE FUNCTION audience_counts_gone_audience()",
    ]
    for table, (conditions, _) in TABLES.items():
        out += [
            _postgresql_function(f"{table}_counts_insert", conditions, [("new_rows", "1")]),
            _postgresql_function(f"{table}_counts_delete", conditions, [("old_rows", "-1")]),
            _postgresql_function(
                f"{table}_counts_update", conditions, [("new_rows", "1"), ("old_rows", "-1")]
            ),
            f"CREATE TRIGGER {table}_counts_insert AFTER INSERT ON {table} "
            f"REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {table}_counts_insert()",
            f"CREATE TRIGGER {table}_counts_delete AFTER DELETE ON {table} "
            f"REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {table}_counts_delete()",
            f"CREATE TRIGGER {table}_counts_update AFTER UPDATE ON {table} "
            "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_counts_update()",
        ]
    return out


def _backfill(distinct: str) -> str:
    """Every audience's counters, counted from its rows."""
    counted = []
    for table, (conditions, _) in TABLES.items():
        sums = ", ".join(
            f"sum(CASE WHEN {e} THEN 1 ELSE 0 END) AS {c}" for c, e in conditions("t", distinct).items()
        )
        counted.append(
            f"LEFT JOIN (SELECT t.audience_id, {sums} FROM {table} t GROUP BY t.audience_id) n_{table} "
            f"ON n_{table}.audience_id = a.id"
        )
    joins = " ".join(counted)
    columns = ", ".join(f"coalesce({c}, 0)" for c in COUNTERS)
    return (
        f"INSERT INTO audience_counts (audience_id, {', '.join(COUNTERS)}) "
        f"SELECT a.id, {columns} FROM audiences a {joins}"
    )


def _trigger_names() -> list[tuple[str, str]]:
    names = [("audience_counts_new_audience", "audiences"), ("audience_counts_gone_audience", "audiences")]
    for table in TABLES:
        names += [(f"{table}_counts_{op_}", table) for op_ in ("insert", "delete", "update", "move")]
    return names


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
    for name, table in _trigger_names():
        if sqlite:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    op.drop_table("audience_counts")
