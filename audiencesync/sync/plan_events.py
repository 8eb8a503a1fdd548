"""The dry run's events: the Audience Entered/Exited events a sync would post, after its identify calls.

Beside ``plan.py`` (the identify calls' plan) because the events are an
outbox of their own: those already owed and those a refresh would make go
into one TEMP table, read back in the order delivery would post them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime

from sqlalchemy import BindParameter, Connection, String, bindparam, text

from audiencesync.store import stage as stage_mod
from audiencesync.store.utc_time import UtcDateTime

_NOW: BindParameter[object] = bindparam("now", type_=UtcDateTime)

# An owed event of the user in the audience that can't go now (parked, or backing off): the
# later events of that user and audience wait for it (events.held_back), and are not sent.
_BLOCKED = (
    "EXISTS (SELECT 1 FROM events p WHERE p.audience_id = :a AND p.user_id = {user} {earlier}"
    "AND p.acked_at IS NULL AND (p.parked_at IS NOT NULL OR p.next_attempt_at > :now))"
)


def create_event_plan(conn: Connection) -> str:
    name = f"plan_events_{uuid.uuid4().hex[:12]}"
    at_type = "TEXT" if conn.dialect.name == "sqlite" else "TIMESTAMPTZ"
    # rank: 0 for an event already in the outbox (seq: its id), 1 for one the refresh would
    # make (seq: the audience's place in the cycle; sub: exits first, as the refresh logs them).
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE {name} (rank INTEGER NOT NULL, seq INTEGER NOT NULL, sub INTEGER NOT NULL, "
        f"user_id {stage_mod.ids_type(conn)} NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL, "
        "audience_name TEXT NOT NULL, "
        f"at {at_type} NOT NULL)"
    )
    return name


def add_owed_events(conn: Connection, plan: str, *, key: str, audience_id: int | None, now: datetime) -> int:
    """The audience's events the outbox owes and would send now (not parked, past their backoff,
    and no earlier event of the user in the audience held)."""
    if audience_id is None:
        return 0
    return int(
        conn.execute(
            text(
                f"INSERT INTO {plan} (rank, seq, sub, user_id, key, name, audience_name, at) "
                "SELECT 0, e.id, 0, e.user_id, :k, e.name, e.audience_name, e.at FROM events e "
                "WHERE e.audience_id = :a AND e.acked_at IS NULL AND e.parked_at IS NULL "
                "AND (e.next_attempt_at IS NULL OR e.next_attempt_at <= :now) "
                "AND NOT " + _BLOCKED.format(user="e.user_id", earlier="AND p.id < e.id ")
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
    """The events applying the stage would make: an entry or an exit each, seen ``now``; but
    not those of a user whose events in the audience are held (they would wait, or be parked)."""
    params = {"k": key, "a": audience_id if audience_id is not None else -1, "p": place, "now": now}
    params |= {"an": audience_name, "en": names[0], "ex": names[1]}
    # Usually no event of the audience is held: then a big first sync's plan probes nothing.
    held = conn.execute(
        text(
            "SELECT 1 FROM events p WHERE p.audience_id = :a AND p.acked_at IS NULL "
            "AND (p.parked_at IS NOT NULL OR p.next_attempt_at > :now) LIMIT 1"
        ).bindparams(_NOW),
        params,
    ).first()
    insert = f"INSERT INTO {plan} (rank, seq, sub, user_id, key, name, audience_name, at) "
    left = conn.execute(
        text(
            insert + "SELECT 1, :p, 0, m.user_id, :k, :ex, :an, :now FROM memberships m "
            "WHERE m.audience_id = :a AND m.desired = true "
            f"AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_id = m.user_id)"
            + (" AND NOT " + _BLOCKED.format(user="m.user_id", earlier="") if held else "")
        ).bindparams(_NOW),
        params,
    ).rowcount
    entered = conn.execute(
        text(
            insert + f"SELECT 1, :p, 1, s.user_id, :k, :en, :an, :now FROM {stage} s "
            "WHERE NOT EXISTS (SELECT 1 FROM memberships m WHERE m.audience_id = :a "
            "AND m.user_id = s.user_id AND m.desired = true)"
            + (" AND NOT " + _BLOCKED.format(user="s.user_id", earlier="") if held else "")
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
