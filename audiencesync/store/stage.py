"""A refresh's stage: the TEMP table its source's ids (and values) are loaded into, and sealed.

Apart from ``diff.py`` (which applies a sealed stage to the snapshot) because loading is its
own concern: the name every refresh reuses, the bulk load (the driver's executemany on
SQLite, COPY on PostgreSQL; see shared/research/measurements.md), the sealing into one
keyed row per user, and the planner settings the anti-joins need. The dry run loads the
same stage (``sync.dry_run``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

STAGE = "audiencesync_stage"


def new_stage_name() -> str:
    """The name of a refresh's stage: the same every time (a TEMP table is its connection's own).

    With one name, a refresh's statements are the same texts each time, so the drivers' caches
    of prepared statements (the sqlite3 module keeps 128 per connection, psycopg counts texts to
    prepare) and SQLAlchemy's compiled cache keep reusing them. A new name per refresh filled
    them with statements never used again (~13 KB each, ~8 MB over a SQLite pool): a daemon's
    RSS grew for its first hours (issue 22). A stage that an error left behind on a pooled
    connection is dropped before the next is made (``create_stage``).
    """
    return STAGE


def ids_type(conn: Connection) -> str:
    """The column type of user ids in the TEMP tables: ordered byte by byte on both databases.

    That is code point order, as Python compares strings (the dry run's merge of
    sorted streams relies on it) and as SQLite's BINARY does; PostgreSQL's "C"
    sorts and indexes several times faster than a linguistic collation.
    """
    return 'TEXT COLLATE "C"' if conn.dialect.name == "postgresql" else "TEXT"


def create_stage(conn: Connection, name: str) -> None:
    drop_stage(conn, name)  # one that an error left on this pooled connection
    # ``value``: the canonical JSON a user's row must carry (values.encode); NULL for ids only.
    # No key while loading: appending to a heap is several times faster than inserting
    # shuffled ids into a B-tree (measured on SQLite: 4 s against 17 s per 1M ids, with the
    # keyed copy made after), and COPY can't skip duplicates. ``seal_stage`` adds the key.
    conn.exec_driver_sql(f"CREATE TEMP TABLE {name} (user_id {ids_type(conn)} NOT NULL, value TEXT)")


def drop_stage(conn: Connection, name: str) -> None:
    # Qualified by the connection's temporary schema: a store table of the same name is never
    # the one dropped.
    temp = "pg_temp" if conn.dialect.name == "postgresql" else "temp"
    for table in (name, f"{name}_keyed", f"{name}_changes"):  # seal_stage's, _apply_joined's
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {temp}.{table}")


def load_batch(conn: Connection, name: str, batch: list[str]) -> None:
    """Bulk-load one batch of ids into the stage through the driver (executemany, or COPY)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    if conn.dialect.name == "sqlite":
        cursor = driver.cursor()
        cursor.executemany(f"INSERT INTO {name} (user_id) VALUES (?)", ((user_id,) for user_id in batch))
        cursor.close()
    elif conn.dialect.name == "postgresql":
        with driver.cursor() as cursor, cursor.copy(f"COPY {name} (user_id) FROM STDIN") as copy:
            _copy_ids(copy, batch)
    else:  # any other store: portable but slower executemany through SQLAlchemy
        conn.execute(text(f"INSERT INTO {name} (user_id) VALUES (:u)"), [{"u": user_id} for user_id in batch])


def load_values(conn: Connection, name: str, batch: list[tuple[str, str | None]]) -> None:
    """Bulk-load (user id, value JSON) pairs. A user given twice keeps the smallest value
    (``seal_stage``), so the choice never depends on the source's row order."""
    driver = conn.connection.driver_connection
    assert driver is not None
    if conn.dialect.name == "sqlite":
        cursor = driver.cursor()
        cursor.executemany(f"INSERT INTO {name} (user_id, value) VALUES (?, ?)", batch)
        cursor.close()
    elif conn.dialect.name == "postgresql":
        with driver.cursor() as cursor, cursor.copy(f"COPY {name} (user_id, value) FROM STDIN") as copy:
            _copy_rows(copy, batch)
    else:
        conn.execute(
            text(f"INSERT INTO {name} (user_id, value) VALUES (:u, :v)"),
            [{"u": user_id, "v": value} for user_id, value in batch],
        )


# What COPY's text format would have to escape. Ids never hold it (the source read skips
# control characters) and canonical JSON rarely does (a backslash in a string).
_COPY_ESCAPES = re.compile(r"[\x00-\x1f\\]")
_COPY_NULL = "\\N"


def _copy_rows(copy: Any, rows: Sequence[tuple[str, str | None]]) -> None:
    """Rows into COPY as one block of text, or row by row when a cell needs escaping.

    One block is about 3x faster than psycopg's write_row per row.
    """
    if _COPY_ESCAPES.search("".join(cell for row in rows for cell in row if cell is not None)) is None:
        _write_pieces(copy, "".join(f"{u}\t{_COPY_NULL if v is None else v}\n" for u, v in rows))
    else:
        for row in rows:
            copy.write_row(row)


# The most one COPY message carries. libpq grows a connection's output buffer (16 KB at first) to
# the largest message it is given and keeps it for the connection's life: a 73 KB block (a soak
# audience's 2,500 rows) left each pooled connection 112 KB larger for good, a 10,000-id batch
# more. In pieces of 8 KB the buffer never grows; it costs well under 1% of a refresh.
COPY_PIECE = 8192


def _write_pieces(copy: Any, block: str) -> None:
    """``block`` into COPY in messages of at most ``COPY_PIECE`` bytes, cut as bytes in the
    connection's encoding (COPY reads a byte stream: a character may be cut in two)."""
    data = memoryview(block.encode(copy.connection.info.encoding))
    for start in range(0, len(data), COPY_PIECE):
        copy.write(data[start : start + COPY_PIECE])


def _copy_ids(copy: Any, batch: list[str]) -> None:
    if _COPY_ESCAPES.search("".join(batch)) is None:
        _write_pieces(copy, "\n".join(batch) + "\n" if batch else "")
    else:
        for user_id in batch:
            copy.write_row((user_id,))


def seal_for_apply(conn: Connection, name: str, *, valued: bool) -> int | None:
    """``seal_stage``, unless ``apply_stage`` can diff the stage as it was loaded; then None.

    On PostgreSQL a stage of ids only gets its statistics and no key: ``_apply_joined``
    diffs it in one hash join, which reads no index and handles an id given twice itself
    (measured at 1M ids: the unique index took 1.7 s of a 6.5 s refresh). SQLite's
    anti-joins need the key, and a stage with values needs its grouping (the smallest value).
    """
    if conn.dialect.name == "postgresql" and not valued:
        conn.exec_driver_sql(f"ANALYZE {name}")
        return None
    return seal_stage(conn, name)


def seal_for_plan(conn: Connection, name: str, *, valued: bool, rows: int | None = None) -> int:
    """``seal_stage`` for the dry run's plan (``sync.plan``); returns the stage's number of users.

    On PostgreSQL a stage of ids alone is rewritten as its distinct ids, sorted, with no key:
    one sort, where the unique index took one and the plan's ordered read (``store.plan_rows``)
    a second one of its million rows. The plan is filled in the stage's order, so that read
    finds its rows already in order and its sort merely checks them (measured at 1M ids, in
    the backend's CPU time: 0.4 s against 1.9-2.8 s; the rewrite costs 0.7-1 s more than the
    index). Nothing relies on that order but the speed: every read that needs an order asks
    for it. The plan's statements join the stage by hashing it (``steer_planner``), and never
    read it through a key.
    """
    if conn.dialect.name != "postgresql" or valued:
        return seal_stage(conn, name, rows=rows)
    steer_planner(conn)
    sorted_name = f"{name}_keyed"
    # One sort that drops the repeats as it goes, not a hash table of every id sorted after:
    # at 1M ids 1.24-1.31 s against 1.70-1.75 s. The planner costs both alike, so it is told.
    # The setting as it was comes back for the statements after (the plan's may hash).
    hashagg = conn.exec_driver_sql("SELECT current_setting('enable_hashagg')").scalar()
    conn.exec_driver_sql("SET LOCAL enable_hashagg = off")
    members = conn.exec_driver_sql(
        f"CREATE TEMP TABLE {sorted_name} AS "
        f"SELECT DISTINCT user_id, NULL::text AS value FROM {name} ORDER BY user_id"
    ).rowcount
    conn.exec_driver_sql("SELECT set_config('enable_hashagg', %(value)s, true)", {"value": hashagg})
    _replace(conn, name, sorted_name)
    conn.exec_driver_sql(f"ANALYZE {name}")
    return int(members)


def seal_stage(conn: Connection, name: str, *, rows: int | None = None) -> int:
    """Make the loaded stage one keyed row per user, with statistics; returns its number of users.

    ``rows``: the rows loaded, when the caller counted them: a stage whose ids all prove
    distinct holds that many users, and is not counted again (a scan of it: 0.4 s at 1M).

    A stage whose ids are all distinct just gets a unique index (PostgreSQL);
    otherwise its rows are grouped once into a table with a primary key (a user
    given twice keeps the smallest value). Every statement after this reads a
    deduplicated, indexed stage, rather than each one grouping again. On
    PostgreSQL, without statistics the planner would guess a tiny stage.
    """
    keyed_name = f"{name}_keyed"
    if conn.dialect.name == "postgresql":
        steer_planner(conn)
        # Sorting a million ids for an index takes 2.3 s in the default 64 MB, 0.6 s in this.
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
        try:
            # Most sources give each id once: then a unique index is all the stage needs.
            with conn.begin_nested():
                conn.exec_driver_sql(f"CREATE UNIQUE INDEX {name}_user_id ON {name} (user_id)")
            distinct = True
        except IntegrityError:
            distinct = False
            conn.exec_driver_sql(
                f"CREATE TEMP TABLE {keyed_name} AS "
                f"SELECT user_id, min(value) AS value FROM {name} GROUP BY user_id"
            )
            conn.exec_driver_sql(f"ALTER TABLE {keyed_name} ADD PRIMARY KEY (user_id)")
            _replace(conn, name, keyed_name)
        conn.exec_driver_sql(f"ANALYZE {name}")
        if distinct and rows is not None:
            return rows
        return int(conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one())
    # The grouping comes out sorted, so the keyed table is filled by appends, and the
    # diff's inserts into memberships come in key order too.
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE {keyed_name} (user_id TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID"
    )
    members = conn.exec_driver_sql(
        f"INSERT INTO {keyed_name} SELECT user_id, min(value) FROM {name} GROUP BY user_id"
    ).rowcount
    _replace(conn, name, keyed_name)
    return int(members)


def _replace(conn: Connection, name: str, rebuilt: str) -> None:
    """The stage ``name`` becomes the table ``rebuilt`` (its keyed or sorted copy)."""
    conn.exec_driver_sql(f"DROP TABLE {name}")
    conn.exec_driver_sql(f"ALTER TABLE {rebuilt} RENAME TO {name}")


def steer_planner(conn: Connection) -> None:
    """Make PostgreSQL's anti-joins hash joins for the rest of this transaction.

    The planner picks nested loops whenever its statistics say the audience is
    tiny, as they do after a bulk refresh that autovacuum has not caught up with:
    measured, a 1M-id unindexed stage against 3,000 memberships thought to be 1 ran
    for minutes, against well under a second hashed. A hash join is never that
    wrong, and the extra work_mem keeps a million-id hash table in memory.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
