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

    @property
    def previous(self) -> int:
        """Members before this change."""
        return self.members - self.entered + self.left


def new_stage_name() -> str:
    # Unique per refresh so that a stage left behind by an error on a pooled
    # connection can never be mistaken for the next audience's.
    return f"stage_{uuid.uuid4().hex[:12]}"


def create_stage(conn: Connection, name: str) -> None:
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql(f"CREATE TEMP TABLE {name} (user_id TEXT PRIMARY KEY) WITHOUT ROWID")
    else:
        # No key on PostgreSQL: COPY can't skip duplicates, so the diff uses DISTINCT.
        conn.exec_driver_sql(f"CREATE TEMP TABLE {name} (user_id TEXT NOT NULL)")


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
) -> DiffCounts:
    """Make the snapshot equal the stage, recording every change. Runs in the caller's transaction."""
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
    return DiffCounts(members=members, entered=entered, left=left)
