"""The dry run's plain calls, read straight from its plan: most of a first sync's million calls.

A plain call is a user's audiences' booleans alone: every planned row of theirs is an
audience's (not a trait's), with no value (no contact fields), and they number at most
Gleap's per-call cap of custom keys. Such a call is exactly the user's rows, so the listing
(``sync.plan_listing``) needs no more than the rows themselves, in user order, and no call
object is built for them. Every other planned user (``python_users``) is left to
``sync.plan_calls``, which builds their calls as the delivery does (fields, values, the
35-key split).

The rows are read through the driver's own cursor, a block at a time: through SQLAlchemy's
result each row costs about as much again as the whole listing's work.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from sqlalchemy import Connection, text

from audiencesync.store import stage as stage_mod

# Rows fetched at a time: enough that the per-fetch cost vanishes, few enough to stay small.
BLOCK_ROWS = 10_000


def python_users(conn: Connection, plan: str, max_keys: int, most_keys: int | None = None) -> str:
    """A TEMP table (returned) of the planned users whose calls are not plain: a trait's row, a
    row with a value, members' fields in ``<plan>_fields`` (which ride their calls), or more rows
    than ``max_keys`` (split into several calls). It may also hold users with fields and no call.

    ``most_keys``: at most how many distinct keys the plan holds, when the caller knows (it
    gave them); otherwise they are counted, a scan of the whole plan (0.5 s at 1M rows)."""
    name = f"{plan}_py"
    conn.exec_driver_sql(f"CREATE TEMP TABLE {name} (user_id {stage_mod.ids_type(conn)} PRIMARY KEY)")
    parts = [f"SELECT user_id FROM {plan} WHERE kind <> 'audience' OR data IS NOT NULL"]
    if conn.execute(text(f"SELECT 1 FROM {plan}_fields LIMIT 1")).first() is not None:
        parts.append(f"SELECT user_id FROM {plan}_fields")
    # A user has a row per key: only a plan of more keys than the cap can hold a user over it
    # (the grouping costs a sort of the plan, which a plan of few keys is spared).
    keys = most_keys
    if keys is None or keys > max_keys:  # a bound over the cap may still hold fewer: count them
        keys = conn.execute(text(f"SELECT count(*) FROM (SELECT DISTINCT key FROM {plan}) k")).scalar_one()
    if keys > max_keys:
        parts.append(f"SELECT user_id FROM {plan} GROUP BY user_id HAVING count(*) > {int(max_keys)}")
    conn.exec_driver_sql(f"INSERT INTO {name} (user_id) " + " UNION ".join(parts))
    return name


def has_users(conn: Connection, table: str) -> bool:
    return conn.execute(text(f"SELECT 1 FROM {table} LIMIT 1")).first() is not None


def plain_rows(conn: Connection, plan: str, python: str | None) -> Generator[list[tuple[str, str, Any]]]:
    """The plain users' rows, (user id, key, value), in blocks, ordered by user id (code points,
    as Python compares strings) then key: the plan's rows of every user not in the table
    ``python`` (None: every user is plain). The value is the driver's boolean (1/0 on SQLite;
    NULL is false, as the delivery reads it)."""
    where = f" WHERE NOT EXISTS (SELECT 1 FROM {python} p WHERE p.user_id = r.user_id)" if python else ""
    query = f"SELECT r.user_id, r.key, r.value FROM {plan} r{where} ORDER BY r.user_id, r.key"
    dialect = conn.dialect.name
    if dialect not in ("sqlite", "postgresql"):  # any other store: portable, slower
        result = conn.execute(text(query), execution_options={"stream_results": True})
        for part in result.partitions(BLOCK_ROWS):
            yield [(row[0], row[1], row[2]) for row in part]
        return
    driver: Any = conn.connection.driver_connection
    # PostgreSQL: a server-side (named) cursor, so that the million rows are never all in memory.
    cursor = driver.cursor(name=f"{plan}_rows") if dialect == "postgresql" else driver.cursor()
    try:
        cursor.execute(query)
        while block := cursor.fetchmany(BLOCK_ROWS):
            yield block
    finally:
        cursor.close()


def drop(conn: Connection, table: str) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
