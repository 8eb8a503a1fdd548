"""The dry run's plan: exactly the calls a sync would make now, computed without writing to the store.

Everything a dry run writes goes into TEMP tables on one connection: the
source's ids (the same stage a real refresh uses) and the plan itself. The
store's own tables are only read, so a dry run never takes SQLite's write
lock nor a row lock on PostgreSQL, and a sync running beside it never waits.

The plan mirrors what ``diff.apply_stage`` followed by a delivery pass would
do: a new member, a leaver Gleap may think is a member, a resend, and a row
whose earlier call's outcome is unknown are sent; parked rows and rows still
waiting out their backoff are not, unless the value changes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from itertools import groupby

from sqlalchemy import BindParameter, Connection, String, bindparam, text

from audiencesync.diff import DiffCounts
from audiencesync.schema import UtcDateTime

_NOW: BindParameter[object] = bindparam("now", type_=UtcDateTime)

# Due now: pending, not parked, past its backoff (as store._due, in SQL text).
_DUE = "m.pending AND m.parked_at IS NULL AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= :now)"


def create_plan(conn: Connection) -> str:
    name = f"plan_{uuid.uuid4().hex[:12]}"
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE {name} (key TEXT NOT NULL, user_id TEXT NOT NULL, value BOOLEAN)"
    )
    return name


def drop_plan(conn: Connection, name: str) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")


def preview_counts(conn: Connection, stage: str, audience_id: int | None) -> DiffCounts:
    """What applying the stage would count (members, entered, left), by reading only."""
    members = conn.execute(text(f"SELECT count(DISTINCT user_id) FROM {stage}")).scalar_one()
    if audience_id is None:
        return DiffCounts(members=members, entered=members, left=0)
    params = {"a": audience_id}
    entered = conn.execute(
        text(
            f"SELECT count(DISTINCT s.user_id) FROM {stage} s WHERE NOT EXISTS (SELECT 1 FROM memberships m "
            "WHERE m.audience_id = :a AND m.user_id = s.user_id AND m.desired = true)"
        ),
        params,
    ).scalar_one()
    left = conn.execute(
        text(
            "SELECT count(*) FROM memberships m WHERE m.audience_id = :a AND m.desired = true "
            f"AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_id = m.user_id)"
        ),
        params,
    ).scalar_one()
    return DiffCounts(members=members, entered=entered, left=left)


def add_applied(
    conn: Connection, plan: str, *, key: str, audience_id: int | None, stage: str, full: bool, now: datetime
) -> int:
    """Plan the audience as if the stage were applied; returns the number of changes planned."""
    params = {"k": key, "a": audience_id if audience_id is not None else -1, "full": full, "now": now}
    members = conn.execute(
        text(
            f"INSERT INTO {plan} (key, user_id, value) "
            f"SELECT :k, s.user_id, true FROM (SELECT DISTINCT user_id FROM {stage}) s "
            "LEFT JOIN memberships m ON m.audience_id = :a AND m.user_id = s.user_id "
            "WHERE m.user_id IS NULL "
            # entering: a new value, which clears parking and backoff
            "OR (m.desired = false AND (m.unknown OR coalesce(m.acked, false) = false)) "
            # staying: owed only if pending (or a full resend), and due
            "OR (m.desired = true AND (:full OR m.resend OR m.unknown OR coalesce(m.acked, false) = false) "
            "AND m.parked_at IS NULL AND (:full OR m.next_attempt_at IS NULL OR m.next_attempt_at <= :now))"
        ).bindparams(_NOW),
        params,
    ).rowcount
    others = conn.execute(
        text(
            f"INSERT INTO {plan} (key, user_id, value) SELECT :k, m.user_id, false FROM memberships m "
            f"WHERE m.audience_id = :a AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_id = m.user_id) "
            # leaving: Gleap may think they are a member
            "AND ((m.desired = true AND (m.unknown OR m.acked = true)) "
            # ex-members still owed a false
            f"OR (m.desired = false AND {_DUE}))"
        ).bindparams(_NOW),
        {"k": key, "a": params["a"], "now": now},
    ).rowcount
    return int(members) + int(others)


def add_current(conn: Connection, plan: str, *, key: str, audience_id: int | None, now: datetime) -> int:
    """Plan what is due for the audience as it stands (its refresh failed or was held)."""
    if audience_id is None:
        return 0
    return int(
        conn.execute(
            text(
                f"INSERT INTO {plan} (key, user_id, value) SELECT :k, m.user_id, m.desired "
                f"FROM memberships m WHERE m.audience_id = :a AND {_DUE}"
            ).bindparams(_NOW),
            {"k": key, "a": audience_id, "now": now},
        ).rowcount
    )


def planned_calls(conn: Connection, plan: str, max_keys: int) -> Iterator[tuple[str, dict[str, bool]]]:
    """(user id, attributes) per call: a user's planned values together, at most ``max_keys`` a call."""
    rows = conn.execute(
        text(f"SELECT user_id, key, value FROM {plan} ORDER BY user_id, key"),
        execution_options={"stream_results": True, "yield_per": 10_000},
    )
    for user_id, group in groupby(rows, key=lambda row: row[0]):
        values = [(row[1], bool(row[2])) for row in group]
        for start in range(0, len(values), max_keys):
            yield user_id, dict(values[start : start + max_keys])


# --- the events a sync would post, after its identify calls -----------------------------------


def create_event_plan(conn: Connection) -> str:
    name = f"plan_events_{uuid.uuid4().hex[:12]}"
    at_type = "TEXT" if conn.dialect.name == "sqlite" else "TIMESTAMPTZ"
    # rank: 0 for an event already in the outbox (seq: its id), 1 for one the refresh would
    # make (seq: the audience's place in the cycle; sub: exits first, as the refresh logs them).
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE {name} (rank INTEGER NOT NULL, seq INTEGER NOT NULL, sub INTEGER NOT NULL, "
        f"user_id TEXT NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL, audience_name TEXT NOT NULL, "
        f"at {at_type} NOT NULL)"
    )
    return name


def add_owed_events(conn: Connection, plan: str, *, key: str, audience_id: int | None, now: datetime) -> int:
    """The audience's events the outbox owes and would send now (not parked, past their backoff)."""
    if audience_id is None:
        return 0
    return int(
        conn.execute(
            text(
                f"INSERT INTO {plan} (rank, seq, sub, user_id, key, name, audience_name, at) "
                "SELECT 0, e.id, 0, e.user_id, :k, e.name, e.audience_name, e.at FROM events e "
                "WHERE e.audience_id = :a AND e.acked_at IS NULL AND e.parked_at IS NULL "
                "AND (e.next_attempt_at IS NULL OR e.next_attempt_at <= :now)"
            ).bindparams(_NOW),
            {"k": key, "a": audience_id, "now": now},
        ).rowcount
    )


def add_new_events(
    conn: Connection,
    plan: str,
    *,
    key: str,
    audience_id: int | None,
    audience_name: str,
    place: int,
    stage: str,
    names: tuple[str, str],
    now: datetime,
) -> int:
    """The events applying the stage would make: an entry or an exit each, seen ``now``."""
    params = {"k": key, "a": audience_id if audience_id is not None else -1, "p": place, "now": now}
    params |= {"an": audience_name, "en": names[0], "ex": names[1]}
    insert = f"INSERT INTO {plan} (rank, seq, sub, user_id, key, name, audience_name, at) "
    left = conn.execute(
        text(
            insert + "SELECT 1, :p, 0, m.user_id, :k, :ex, :an, :now FROM memberships m "
            "WHERE m.audience_id = :a AND m.desired = true "
            f"AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_id = m.user_id)"
        ).bindparams(_NOW),
        params,
    ).rowcount
    entered = conn.execute(
        text(
            insert + f"SELECT DISTINCT 1, :p, 1, s.user_id, :k, :en, :an, :now FROM {stage} s "
            "WHERE NOT EXISTS (SELECT 1 FROM memberships m WHERE m.audience_id = :a "
            "AND m.user_id = s.user_id AND m.desired = true)"
        ).bindparams(_NOW),
        params,
    ).rowcount
    return int(left) + int(entered)


def planned_events(conn: Connection, plan: str) -> Iterator[tuple[str, str, str, str, datetime]]:
    """(user id, audience key, audience name, event name, time) in the order they would be sent."""
    rows = conn.execute(
        text(
            f"SELECT user_id, key, audience_name, name, at FROM {plan} ORDER BY rank, seq, sub, user_id"
        ).columns(user_id=String, key=String, audience_name=String, name=String, at=UtcDateTime),
        execution_options={"stream_results": True, "yield_per": 10_000},
    )
    for row in rows:
        yield row.user_id, row.key, row.audience_name, row.name, row.at


def add_events(
    conn: Connection,
    plan: str,
    *,
    key: str,
    audience_id: int | None,
    audience_name: str,
    place: int,
    stage: str | None,
    names: tuple[str, str] | None,
    now: datetime,
) -> int:
    """What the audience's events would be: those owed, and with ``stage`` (the refresh is
    applied) and ``names`` (its events are on) those the refresh would make."""
    count = add_owed_events(conn, plan, key=key, audience_id=audience_id, now=now)
    if stage is not None and names is not None:
        count += add_new_events(
            conn,
            plan,
            key=key,
            audience_id=audience_id,
            audience_name=audience_name,
            place=place,
            stage=stage,
            names=names,
            now=now,
        )
    return count
