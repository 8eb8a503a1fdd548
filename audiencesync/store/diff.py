"""Computing what changed: stage the source's ids, then anti-join them with the snapshot.

The diff runs in SQL so it scales to millions of members: the ids are bulk
loaded into an indexed temporary table (the driver's executemany on SQLite,
COPY on PostgreSQL; see shared/research/measurements.md), and entered/left
users are found with NOT EXISTS anti-joins against ``memberships``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, TextClause, bindparam, text
from sqlalchemy.exc import IntegrityError

from audiencesync.store.pending_since import SINCE, since_sql
from audiencesync.store.schema import UtcDateTime


@dataclass(frozen=True)
class DiffCounts:
    members: int
    entered: int
    left: int
    changed: int = 0  # members who stayed with a new value

    @property
    def previous(self) -> int:
        """Members before this change."""
        return self.members - self.entered + self.left


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
        copy.write("".join(f"{u}\t{_COPY_NULL if v is None else v}\n" for u, v in rows))
    else:
        for row in rows:
            copy.write_row(row)


def _copy_ids(copy: Any, batch: list[str]) -> None:
    if _COPY_ESCAPES.search("".join(batch)) is None:
        copy.write("\n".join(batch) + "\n" if batch else "")
    else:
        for user_id in batch:
            copy.write_row((user_id,))


def _distinct(conn: Connection) -> str:
    return "IS NOT" if conn.dialect.name == "sqlite" else "IS DISTINCT FROM"


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


def seal_stage(conn: Connection, name: str) -> int:
    """Make the loaded stage one keyed row per user, with statistics; returns its number of users.

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
        except IntegrityError:
            conn.exec_driver_sql(
                f"CREATE TEMP TABLE {keyed_name} AS "
                f"SELECT user_id, min(value) AS value FROM {name} GROUP BY user_id"
            )
            conn.exec_driver_sql(f"ALTER TABLE {keyed_name} ADD PRIMARY KEY (user_id)")
            conn.exec_driver_sql(f"DROP TABLE {name}")
            conn.exec_driver_sql(f"ALTER TABLE {keyed_name} RENAME TO {name}")
        conn.exec_driver_sql(f"ANALYZE {name}")
        return int(conn.execute(text(f"SELECT count(*) FROM {name}")).scalar_one())
    # The grouping comes out sorted, so the keyed table is filled by appends, and the
    # diff's inserts into memberships come in key order too.
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE {keyed_name} (user_id TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID"
    )
    members = conn.exec_driver_sql(
        f"INSERT INTO {keyed_name} SELECT user_id, min(value) FROM {name} GROUP BY user_id"
    ).rowcount
    conn.exec_driver_sql(f"DROP TABLE {name}")
    conn.exec_driver_sql(f"ALTER TABLE {keyed_name} RENAME TO {name}")
    return int(members)


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


# An entry onto an existing row (a leaver whose false is still owed) keeps the time it has owed.
ENTRY_SINCE = since_sql("excluded.pending_since")


def _timed(sql: str) -> TextClause:
    # Typed, so that SQLite stores the same text format as every other write.
    return text(sql).bindparams(bindparam("t", type_=UtcDateTime))


def apply_stage(
    conn: Connection,
    name: str,
    *,
    audience_id: int,
    run_id: int,
    now: datetime,
    full: bool,
    members: int | None,
    valued: bool = False,
) -> DiffCounts:
    """Make the snapshot equal the stage, recording every change. Runs in the caller's transaction.

    ``members``: the users in the sealed stage (``seal_stage``); None for a stage
    sealed without a key (PostgreSQL, ids only), diffed by ``_apply_joined``.
    ``valued``: the stage carries values (a trait, an audience with contact fields);
    a member whose value differs is 'changed'. Without it the ids-only statements
    run, exactly as fast as before values existed.
    """
    steer_planner(conn)
    if members is None:
        return _apply_joined(conn, name, audience_id=audience_id, run_id=run_id, now=now, full=full)
    if valued:
        return _apply_values(
            conn, name, audience_id=audience_id, run_id=run_id, now=now, full=full, members=members
        )
    params = {"a": audience_id, "r": run_id, "t": now}

    def not_in_stage(alias: str) -> str:
        return f"NOT EXISTS (SELECT 1 FROM {name} s WHERE s.user_id = {alias}.user_id)"

    not_member = (
        "NOT EXISTS (SELECT 1 FROM memberships m WHERE m.audience_id = :a "
        "AND m.user_id = s.user_id AND m.desired = true)"
    )
    left = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
            "SELECT m.audience_id, m.user_id, :r, 'left', :t FROM memberships m "
            f"WHERE m.audience_id = :a AND m.desired = true AND {not_in_stage('m')}"
        ),
        params,
    ).rowcount
    entered = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
            f"SELECT :a, s.user_id, :r, 'entered', :t FROM {name} s WHERE {not_member}"
        ),
        params,
    ).rowcount
    if left:
        # A leaver's pending resend is void: only the new value (false) matters.
        conn.execute(
            _timed(
                # A new value is a new change: earlier failures, backoff and parking don't
                # carry over. The unknown mark does: Gleap may still hold anything.
                "UPDATE memberships SET desired = false, resend = false, changed_at = :t, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {SINCE} "
                f"WHERE audience_id = :a AND desired = true AND {not_in_stage('memberships')}"
            ),
            params,
        )
    if entered:
        conn.execute(
            _timed(
                "INSERT INTO memberships "
                "(audience_id, user_id, desired, resend, changed_at, pending_since, attempts) "
                f"SELECT :a, s.user_id, true, false, :t, :t, 0 FROM {name} s WHERE {not_member} "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, changed_at = excluded.changed_at, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {ENTRY_SINCE}"
            ),
            params,
        )
    _settle(conn, params, full=full)
    return DiffCounts(members=members, entered=entered, left=left)


def _apply_joined(
    conn: Connection, name: str, *, audience_id: int, run_id: int, now: datetime, full: bool
) -> DiffCounts:
    """``apply_stage`` on PostgreSQL for a stage of ids with no key (``seal_stage(keyed=False)``).

    One hash full join of the stage with the snapshot finds the entries and the exits
    together, where the portable statements make four anti-joins of a million rows (two to
    log the changes, two to apply them): measured at 1M members and 1% churn, 4 of the 6.5 s
    of a refresh. The difference (the churn: thousands of rows, not millions) goes into a
    keyed table; every statement after that starts from it. An id the source gave twice is
    one row of it (DISTINCT). The number of members is the counter the triggers keep.
    """
    params = {"a": audience_id, "r": run_id, "t": now}
    changes = f"{name}_changes"
    # The default collation, as memberships.user_id has: compared under the stage's "C", its
    # ids could not be looked up in memberships' indexes (measured: a hash join over 1M rows).
    conn.exec_driver_sql(f"CREATE TEMP TABLE {changes} (user_id TEXT PRIMARY KEY, entered BOOLEAN NOT NULL)")
    conn.execute(
        text(
            f"INSERT INTO {changes} (user_id, entered) "
            "SELECT DISTINCT coalesce(s.user_id, m.user_id), m.user_id IS NULL "
            "FROM (SELECT user_id FROM memberships WHERE audience_id = :a AND desired = true) m "
            f"FULL JOIN {name} s ON s.user_id = m.user_id "
            "WHERE m.user_id IS NULL OR s.user_id IS NULL"
        ),
        params,
    )
    conn.exec_driver_sql(f"ANALYZE {changes}")
    # From here on each statement reads the small difference and finds its rows of
    # memberships through the primary key: nested loops are the right plan. Even were
    # the planner to start from a million memberships, each would probe a keyed table.
    conn.exec_driver_sql("SET LOCAL enable_nestloop = on")
    logged = (
        "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
        f"SELECT :a, c.user_id, :r, '{{change}}', :t FROM {changes} c WHERE {{which}} ORDER BY c.user_id"
    )
    left = conn.execute(_timed(logged.format(change="left", which="NOT c.entered")), params).rowcount
    entered = conn.execute(_timed(logged.format(change="entered", which="c.entered")), params).rowcount
    if left:
        conn.execute(
            _timed(
                "UPDATE memberships SET desired = false, resend = false, changed_at = :t, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {SINCE} "
                f"FROM {changes} c WHERE memberships.audience_id = :a AND memberships.user_id = c.user_id "
                "AND NOT c.entered AND memberships.desired = true"
            ),
            params,
        )
    if entered:
        conn.execute(
            _timed(
                "INSERT INTO memberships "
                "(audience_id, user_id, desired, resend, changed_at, pending_since, attempts) "
                f"SELECT :a, c.user_id, true, false, :t, :t, 0 FROM {changes} c WHERE c.entered "
                "ORDER BY c.user_id "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, changed_at = excluded.changed_at, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {ENTRY_SINCE}"
            ),
            params,
        )
    steer_planner(conn)  # back to hash joins for what else the transaction runs
    _settle(conn, params, full=full)
    members = conn.execute(
        text("SELECT members FROM audience_counts WHERE audience_id = :a"), params
    ).scalar_one()
    return DiffCounts(members=int(members), entered=entered, left=left)


def _apply_values(
    conn: Connection, name: str, *, audience_id: int, run_id: int, now: datetime, full: bool, members: int
) -> DiffCounts:
    """``apply_stage`` for a stage with values: entries and changes record the new value."""
    params = {"a": audience_id, "r": run_id, "t": now}
    stage = name
    differs = _distinct(conn)
    not_in_stage = "NOT EXISTS (SELECT 1 FROM {n} s WHERE s.user_id = {a}.user_id)"
    not_member = (
        "NOT EXISTS (SELECT 1 FROM memberships m WHERE m.audience_id = :a "
        "AND m.user_id = s.user_id AND m.desired = true)"
    )
    left = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
            "SELECT m.audience_id, m.user_id, :r, 'left', :t FROM memberships m "
            f"WHERE m.audience_id = :a AND m.desired = true AND {not_in_stage.format(n=name, a='m')}"
        ),
        params,
    ).rowcount
    changed_rows = (
        f"FROM memberships m JOIN {stage} s ON s.user_id = m.user_id "
        f"WHERE m.audience_id = :a AND m.desired = true AND m.value {differs} s.value"
    )
    changed = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at, value) "
            f"SELECT m.audience_id, m.user_id, :r, 'changed', :t, s.value {changed_rows}"
        ),
        params,
    ).rowcount
    entered = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at, value) "
            f"SELECT :a, s.user_id, :r, 'entered', :t, s.value FROM {stage} s WHERE {not_member}"
        ),
        params,
    ).rowcount
    fresh = f"changed_at = :t, attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {SINCE}"
    if left:
        conn.execute(
            _timed(
                f"UPDATE memberships SET desired = false, value = NULL, resend = false, {fresh} "
                f"WHERE audience_id = :a AND desired = true "
                f"AND {not_in_stage.format(n=name, a='memberships')}"
            ),
            params,
        )
    if changed:
        # A new value is a new change, as an entry is: failures and parking don't carry over.
        # changed_at stays the entry's time: the audit rebuilds members at an instant from it.
        conn.execute(
            _timed(
                "UPDATE memberships SET value = s.value, attempts = 0, failures = 0, "
                f"next_attempt_at = NULL, parked_at = NULL, {SINCE} FROM {stage} s "
                f"WHERE memberships.audience_id = :a AND memberships.desired = true "
                f"AND s.user_id = memberships.user_id AND memberships.value {differs} s.value"
            ),
            params,
        )
    if entered:
        conn.execute(
            _timed(
                "INSERT INTO memberships "
                "(audience_id, user_id, desired, value, resend, changed_at, pending_since, attempts) "
                f"SELECT :a, s.user_id, true, s.value, false, :t, :t, 0 FROM {stage} s WHERE {not_member} "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, value = excluded.value, changed_at = excluded.changed_at, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {ENTRY_SINCE}"
            ),
            params,
        )
    _settle(conn, params, full=full)
    return DiffCounts(members=members, entered=entered, left=left, changed=changed)


def _settle(conn: Connection, params: dict[str, object], *, full: bool) -> None:
    """After either diff: drop the rows that hold nothing, and with ``full`` owe every member again."""
    # Rows that are neither members nor owed to Gleap hold nothing worth keeping:
    # the change log keeps their history.
    conn.execute(
        text("DELETE FROM memberships WHERE audience_id = :a AND desired = false AND pending = false"),
        params,
    )
    if full:
        # The admin asked for everything now: backoffs end too (parked changes stay parked).
        conn.execute(
            _timed(
                "UPDATE memberships SET resend = true, failures = 0, next_attempt_at = NULL, "
                f"{since_sql(stays_parked=True)} "
                "WHERE audience_id = :a AND desired = true"
            ),
            params,
        )
