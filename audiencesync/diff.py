"""Computing what changed: stage the source's ids, then anti-join them with the snapshot.

The diff runs in SQL so it scales to millions of members: the ids are bulk
loaded into an indexed temporary table (the driver's executemany on SQLite,
COPY on PostgreSQL; see shared/research/measurements.md), and entered/left
users are found with NOT EXISTS anti-joins against ``memberships``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text

from audiencesync import failpoints


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


def load_stage(conn: Connection, name: str, batches: Iterable[list[str]]) -> None:
    """Bulk-load ids into the stage through the driver, one batch in memory at a time."""
    driver = conn.connection.driver_connection
    assert driver is not None
    if conn.dialect.name == "sqlite":
        cursor = driver.cursor()
        sql = f"INSERT OR IGNORE INTO {name} (user_id) VALUES (?)"
        for batch in batches:
            cursor.executemany(sql, ((user_id,) for user_id in batch))
            failpoints.reach("stage-batch")
        cursor.close()
    elif conn.dialect.name == "postgresql":
        with driver.cursor() as cursor, cursor.copy(f"COPY {name} (user_id) FROM STDIN") as copy:
            for batch in batches:
                for user_id in batch:
                    copy.write_row((user_id,))
                failpoints.reach("stage-batch")
        conn.exec_driver_sql(f"ANALYZE {name}")
    else:  # any other store: portable but slower executemany through SQLAlchemy
        insert = text(f"INSERT INTO {name} (user_id) VALUES (:u)")
        for batch in batches:
            conn.execute(insert, [{"u": user_id} for user_id in batch])


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
        text(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
            "SELECT m.audience_id, m.user_id, :r, 'left', :t FROM memberships m "
            f"WHERE m.audience_id = :a AND m.desired = true AND {not_in_stage('m')}"
        ),
        params,
    ).rowcount
    entered = conn.execute(
        text(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
            f"SELECT DISTINCT :a, s.user_id, :r, 'entered', :t FROM {name} s WHERE {not_member}"
        ),
        params,
    ).rowcount
    if left:
        # A leaver's pending resend is void: only the new value (false) matters.
        conn.execute(
            text(
                # A new value is a new change: earlier failures and parking don't carry over.
                "UPDATE memberships SET desired = false, resend = false, changed_at = :t, "
                "attempts = 0, parked_at = NULL "
                f"WHERE audience_id = :a AND desired = true AND {not_in_stage('memberships')}"
            ),
            params,
        )
    if entered:
        conn.execute(
            text(
                "INSERT INTO memberships (audience_id, user_id, desired, resend, changed_at, attempts) "
                f"SELECT DISTINCT :a, s.user_id, true, false, :t, 0 FROM {name} s WHERE {not_member} "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, changed_at = excluded.changed_at, "
                "attempts = 0, parked_at = NULL"
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
        conn.execute(
            text("UPDATE memberships SET resend = true WHERE audience_id = :a AND desired = true"),
            params,
        )
    return DiffCounts(members=members, entered=entered, left=left)
