"""Computing what changed: stage the source's ids, then anti-join them with the snapshot.

The diff runs in SQL so it scales to millions of members: the ids are bulk
loaded into an indexed temporary table (the driver's executemany on SQLite,
COPY on PostgreSQL; see shared/research/measurements.md), and entered/left
users are found with NOT EXISTS anti-joins against ``memberships``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, TextClause, bindparam, text

from audiencesync.schema import UtcDateTime


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


def new_stage_name() -> str:
    # Unique per refresh so that a stage left behind by an error on a pooled
    # connection can never be mistaken for the next audience's.
    return f"stage_{uuid.uuid4().hex[:12]}"


def create_stage(conn: Connection, name: str) -> None:
    # ``value``: the canonical JSON a user's row must carry (values.encode); NULL for ids only.
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"CREATE TEMP TABLE {name} (user_id TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID")
    else:
        # No key on PostgreSQL: COPY can't skip duplicates, so the diff uses DISTINCT.
        conn.exec_driver_sql(f"CREATE TEMP TABLE {name} (user_id TEXT NOT NULL, value TEXT)")


def drop_stage(conn: Connection, name: str) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")


def load_batch(conn: Connection, name: str, batch: list[str]) -> None:
    """Bulk-load one batch of ids into the stage through the driver (executemany, or COPY)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    if conn.dialect.name == "sqlite":
        cursor = driver.cursor()
        cursor.executemany(
            f"INSERT OR IGNORE INTO {name} (user_id) VALUES (?)", ((user_id,) for user_id in batch)
        )
        cursor.close()
    elif conn.dialect.name == "postgresql":
        with driver.cursor() as cursor, cursor.copy(f"COPY {name} (user_id) FROM STDIN") as copy:
            for user_id in batch:
                copy.write_row((user_id,))
    else:  # any other store: portable but slower executemany through SQLAlchemy
        conn.execute(text(f"INSERT INTO {name} (user_id) VALUES (:u)"), [{"u": user_id} for user_id in batch])


def load_values(conn: Connection, name: str, batch: list[tuple[str, str | None]]) -> None:
    """Bulk-load (user id, value JSON) pairs. A user given twice keeps the smallest value
    on both databases (``staged``), so the choice never depends on the source's row order."""
    driver = conn.connection.driver_connection
    assert driver is not None
    if conn.dialect.name == "sqlite":
        cursor = driver.cursor()
        cursor.executemany(
            f"INSERT INTO {name} (user_id, value) VALUES (?, ?) ON CONFLICT (user_id) DO UPDATE "
            "SET value = CASE WHEN value IS NULL OR excluded.value < value THEN excluded.value "
            "ELSE value END",
            batch,
        )
        cursor.close()
    elif conn.dialect.name == "postgresql":
        with driver.cursor() as cursor, cursor.copy(f"COPY {name} (user_id, value) FROM STDIN") as copy:
            for row in batch:
                copy.write_row(row)
    else:
        conn.execute(
            text(f"INSERT INTO {name} (user_id, value) VALUES (:u, :v)"),
            [{"u": user_id, "v": value} for user_id, value in batch],
        )


def staged(conn: Connection, name: str) -> str:
    """The stage with one row per user, as a FROM item (SQLite's key made it so already)."""
    if conn.dialect.name == "sqlite":
        return name
    return f"(SELECT user_id, min(value) AS value FROM {name} GROUP BY user_id)"


def _distinct(conn: Connection) -> str:
    return "IS NOT" if conn.dialect.name == "sqlite" else "IS DISTINCT FROM"


def analyze_stage(conn: Connection, name: str) -> None:
    """Statistics for the planner (PostgreSQL); without them it guesses a tiny stage."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"ANALYZE {name}")


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
    valued: bool = False,
) -> DiffCounts:
    """Make the snapshot equal the stage, recording every change. Runs in the caller's transaction.

    ``valued``: the stage carries values (a trait, an audience with contact fields);
    a member whose value differs is 'changed'. Without it the ids-only statements
    run, exactly as fast as before values existed.
    """
    if valued:
        return _apply_values(conn, name, audience_id=audience_id, run_id=run_id, now=now, full=full)
    params = {"a": audience_id, "r": run_id, "t": now}
    members = conn.execute(text(f"SELECT count(DISTINCT user_id) FROM {name}")).scalar_one()

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
            f"SELECT DISTINCT :a, s.user_id, :r, 'entered', :t FROM {name} s WHERE {not_member}"
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
                "attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL "
                f"WHERE audience_id = :a AND desired = true AND {not_in_stage('memberships')}"
            ),
            params,
        )
    if entered:
        conn.execute(
            _timed(
                "INSERT INTO memberships (audience_id, user_id, desired, resend, changed_at, attempts) "
                f"SELECT DISTINCT :a, s.user_id, true, false, :t, 0 FROM {name} s WHERE {not_member} "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, changed_at = excluded.changed_at, "
                "attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL"
            ),
            params,
        )
    _settle(conn, params, full=full)
    return DiffCounts(members=members, entered=entered, left=left)


def _apply_values(
    conn: Connection, name: str, *, audience_id: int, run_id: int, now: datetime, full: bool
) -> DiffCounts:
    """``apply_stage`` for a stage with values: entries and changes record the new value."""
    params = {"a": audience_id, "r": run_id, "t": now}
    stage = staged(conn, name)
    differs = _distinct(conn)
    members = conn.execute(text(f"SELECT count(DISTINCT user_id) FROM {name}")).scalar_one()
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
    fresh = "changed_at = :t, attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL"
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
            text(
                "UPDATE memberships SET value = s.value, attempts = 0, failures = 0, "
                f"next_attempt_at = NULL, parked_at = NULL FROM {stage} s "
                f"WHERE memberships.audience_id = :a AND memberships.desired = true "
                f"AND s.user_id = memberships.user_id AND memberships.value {differs} s.value"
            ),
            params,
        )
    if entered:
        conn.execute(
            _timed(
                "INSERT INTO memberships "
                "(audience_id, user_id, desired, value, resend, changed_at, attempts) "
                f"SELECT :a, s.user_id, true, s.value, false, :t, 0 FROM {stage} s WHERE {not_member} "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, value = excluded.value, changed_at = excluded.changed_at, "
                "attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL"
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
            text(
                "UPDATE memberships SET resend = true, failures = 0, next_attempt_at = NULL "
                "WHERE audience_id = :a AND desired = true"
            ),
            params,
        )
