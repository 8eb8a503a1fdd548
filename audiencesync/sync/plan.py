"""The dry run's plan: exactly the calls a sync would make now, computed without writing to the store.

Everything a dry run writes goes into TEMP tables on one connection: the
source's ids (the same stage a real refresh uses) and the plan itself. The
store's own tables are only read, so a dry run never takes SQLite's write
lock nor a row lock on PostgreSQL, and a sync running beside it never waits.

The plan mirrors what ``diff.apply_stage`` followed by a delivery pass would
do: a new member, a leaver Gleap may think is a member, a resend, and a row
whose earlier call's outcome is unknown are sent; parked rows and rows still
waiting out their backoff are not, unless the value changes.

The rows are read back into the calls themselves by ``plan_calls``.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BindParameter, Connection, bindparam, text

from audiencesync.store import stage as stage_mod
from audiencesync.store.diff import DiffCounts
from audiencesync.store.utc_time import UtcDateTime

_NOW: BindParameter[object] = bindparam("now", type_=UtcDateTime)

# Due now: pending, not parked, past its backoff (as store._due, in SQL text).
_DUE = "m.pending AND m.parked_at IS NULL AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= :now)"


def create_plan(conn: Connection) -> str:
    # One row per (key, user): what a PendingChange would hold (desired, and the value JSON
    # the call carries), so that payload.attributes makes the body a real call would send.
    # ``acked_data``: the value Gleap last acknowledged for the row; ``unknown``: its last call
    # had no verdict (then the user's call carries every winning field, as the delivery's does).
    # ``<plan>_fields``: every member's fields after the plan, for the merge (``rank``:
    # the audience's place in the config).
    name = f"plan_{uuid.uuid4().hex[:12]}"
    ids = stage_mod.ids_type(conn)
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE {name} (key {ids} NOT NULL, user_id {ids} NOT NULL, "
        "kind TEXT NOT NULL DEFAULT 'audience', value BOOLEAN, data TEXT, acked_data TEXT, "
        "unknown BOOLEAN NOT NULL DEFAULT false)"
    )
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE {name}_fields (rank INTEGER NOT NULL, key TEXT NOT NULL, "
        f"user_id {ids} NOT NULL, data TEXT NOT NULL)"
    )
    return name


def drop_plan(conn: Connection, name: str) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}_fields")


def preview_counts(
    conn: Connection, stage: str, audience_id: int | None, *, members: int, valued: bool = False
) -> DiffCounts:
    """What applying the (sealed) stage of ``members`` users would count: members, entered,
    left, changed, by reading only."""
    if audience_id is None:
        return DiffCounts(members=members, entered=members, left=0)
    changed = 0
    if valued:
        changed = conn.execute(
            text(
                f"SELECT count(*) FROM memberships m JOIN {stage} s "
                "ON s.user_id = m.user_id WHERE m.audience_id = :a AND m.desired = true "
                f"AND m.value {_differs(conn)} s.value"
            ),
            {"a": audience_id},
        ).scalar_one()
    params = {"a": audience_id}
    entered = conn.execute(
        text(
            f"SELECT count(*) FROM {stage} s WHERE NOT EXISTS (SELECT 1 FROM memberships m "
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
    return DiffCounts(members=members, entered=entered, left=left, changed=changed)


def _differs(conn: Connection) -> str:
    return "IS NOT" if conn.dialect.name == "sqlite" else "IS DISTINCT FROM"


def add_applied(
    conn: Connection,
    plan: str,
    *,
    key: str,
    audience_id: int | None,
    stage: str,
    full: bool,
    now: datetime,
    trait: bool = False,
    missing: str | None = None,
) -> int:
    """Plan the audience (or trait) as if the stage were applied; returns the number of changes planned."""
    if trait:
        return _add_applied_trait(
            conn, plan, key=key, audience_id=audience_id, stage=stage, full=full, now=now, missing=missing
        )
    params = {"k": key, "a": audience_id if audience_id is not None else -1, "full": full, "now": now}
    differs, same = (
        ("IS NOT", "IS") if conn.dialect.name == "sqlite" else ("IS DISTINCT FROM", "IS NOT DISTINCT FROM")
    )
    owed = f"m.resend OR m.unknown OR coalesce(m.acked, false) = false OR s.value {differs} m.acked_value"
    members = conn.execute(
        text(
            f"INSERT INTO {plan} (key, user_id, value, data, acked_data, unknown) "
            f"SELECT :k, s.user_id, true, s.value, m.acked_value, coalesce(m.unknown, false) FROM {stage} s "
            "LEFT JOIN memberships m ON m.audience_id = :a AND m.user_id = s.user_id "
            "WHERE m.user_id IS NULL "
            # entering, or staying with new fields: a new value, which clears parking and backoff
            f"OR (m.desired = false AND (:full OR {owed})) "
            f"OR (m.desired = true AND s.value {differs} m.value AND (:full OR {owed})) "
            # staying as it was: owed only if pending (or a full resend), and due
            f"OR (m.desired = true AND s.value {same} m.value AND (:full OR {owed}) "
            "AND m.parked_at IS NULL AND (:full OR m.next_attempt_at IS NULL OR m.next_attempt_at <= :now))"
        ).bindparams(_NOW),
        params,
    ).rowcount
    others = conn.execute(
        text(
            f"INSERT INTO {plan} (key, user_id, value, acked_data, unknown) "
            "SELECT :k, m.user_id, false, m.acked_value, m.unknown FROM memberships m "
            "WHERE m.audience_id = :a "
            f"AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_id = m.user_id) "
            # leaving: Gleap may think they are a member
            "AND ((m.desired = true AND (m.unknown OR m.acked = true)) "
            # ex-members still owed a false
            f"OR (m.desired = false AND {_DUE}))"
        ).bindparams(_NOW),
        {"k": key, "a": params["a"], "now": now},
    ).rowcount
    return int(members) + int(others)


def add_staged_fields(conn: Connection, plan: str, *, rank: int, key: str, stage: str) -> None:
    """The audience's members' fields as the stage gives them, for the merge."""
    conn.execute(
        text(
            f"INSERT INTO {plan}_fields (rank, key, user_id, data) SELECT :r, :k, s.user_id, s.value "
            f"FROM {stage} s WHERE s.value IS NOT NULL"
        ),
        {"r": rank, "k": key},
    )


def add_stored_fields(conn: Connection, plan: str, *, rank: int, key: str, audience_id: int | None) -> None:
    """The audience's members' fields as the store holds them (not refreshed in this plan)."""
    if audience_id is None:
        return
    conn.execute(
        text(
            f"INSERT INTO {plan}_fields (rank, key, user_id, data) SELECT :r, :k, m.user_id, m.value "
            "FROM memberships m WHERE m.audience_id = :a AND m.desired = true AND m.value IS NOT NULL"
        ),
        {"r": rank, "k": key, "a": audience_id},
    )


def _add_applied_trait(
    conn: Connection,
    plan: str,
    *,
    key: str,
    audience_id: int | None,
    stage: str,
    full: bool,
    now: datetime,
    missing: str | None,
) -> int:
    """``add_applied`` for a trait: a user is owed their value when it is new to the row
    (entered or changed: a new change, due now) and Gleap may not have it, or when the row
    stays as it is and is due; a user without a value now is owed ``missing``."""
    params = {"k": key, "a": audience_id if audience_id is not None else -1, "full": full, "now": now}
    differs = _differs(conn)
    unacked = (
        "(m.unknown OR m.resend OR :full OR coalesce(m.acked, false) = false "
        f"OR s.value {differs} m.acked_value)"
    )
    members = conn.execute(
        text(
            f"INSERT INTO {plan} (key, user_id, kind, value, data, unknown) "
            f"SELECT :k, s.user_id, 'trait', true, s.value, coalesce(m.unknown, false) FROM {stage} s "
            "LEFT JOIN memberships m ON m.audience_id = :a AND m.user_id = s.user_id "
            "WHERE m.user_id IS NULL "
            f"OR ((m.desired = false OR m.value {differs} s.value) AND {unacked}) "
            f"OR (m.desired = true AND NOT (m.value {differs} s.value) AND {unacked} "
            "AND m.parked_at IS NULL AND (:full OR m.next_attempt_at IS NULL OR m.next_attempt_at <= :now))"
        ).bindparams(_NOW),
        params,
    ).rowcount
    others = conn.execute(
        text(
            f"INSERT INTO {plan} (key, user_id, kind, value, data, unknown) "
            "SELECT :k, m.user_id, 'trait', false, :missing, m.unknown FROM memberships m "
            f"WHERE m.audience_id = :a AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.user_id = m.user_id) "
            "AND ((m.desired = true AND (m.unknown OR m.acked = true)) "
            f"OR (m.desired = false AND {_DUE}))"
        ).bindparams(_NOW),
        {"k": key, "a": params["a"], "now": now, "missing": missing},
    ).rowcount
    return int(members) + int(others)


def add_current(
    conn: Connection,
    plan: str,
    *,
    key: str,
    audience_id: int | None,
    now: datetime,
    trait: bool = False,
    missing: str | None = None,
) -> int:
    """Plan what is due for the audience as it stands (its refresh failed or was held)."""
    if audience_id is None:
        return 0
    return int(
        conn.execute(
            text(
                f"INSERT INTO {plan} (key, user_id, kind, value, data, acked_data, unknown) "
                "SELECT :k, m.user_id, :kind, m.desired, CASE WHEN m.desired THEN m.value ELSE :missing END, "
                f"m.acked_value, m.unknown FROM memberships m WHERE m.audience_id = :a AND {_DUE}"
            ).bindparams(_NOW),
            {
                "k": key,
                "a": audience_id,
                "now": now,
                "kind": "trait" if trait else "audience",
                "missing": missing if trait else None,
            },
        ).rowcount
    )


def add_retired(
    conn: Connection, plan: str, *, key: str, audience_id: int, retired: bool, now: datetime
) -> int:
    """Plan an old key's retirement (renames.py), with the kind and ``missing`` its row holds:
    from its retired row, what is due; from the row a rename is about to re-key, every user
    Gleap may hold the old key for."""
    params: dict[str, object] = {"k": key, "a": audience_id}
    # A re-keyed row's users get fresh retired rows: due at once, whatever their backoff.
    owed = "(m.acked = true OR m.unknown)"
    if retired:
        owed, params["now"] = _DUE, now
    query = text(
        f"INSERT INTO {plan} (key, user_id, kind, value, data, acked_data, unknown) "
        "SELECT :k, m.user_id, a.kind, false, CASE WHEN a.kind = 'trait' THEN a.missing END, "
        "m.acked_value, m.unknown FROM memberships m JOIN audiences a ON a.id = m.audience_id "
        f"WHERE m.audience_id = :a AND {owed}"
    )
    return int(conn.execute(query.bindparams(_NOW) if retired else query, params).rowcount)


def add_rekeyed(conn: Connection, plan: str, *, key: str, audience_id: int, trait: bool = False) -> int:
    """Plan the row a rename is about to re-key as it stands (its refresh failed or was held):
    every member is owed its value under the new key, which Gleap never had."""
    return int(
        conn.execute(
            text(
                f"INSERT INTO {plan} (key, user_id, kind, value, data) "
                "SELECT :k, m.user_id, :kind, true, m.value FROM memberships m "
                "WHERE m.audience_id = :a AND m.desired = true"
            ),
            {"k": key, "a": audience_id, "kind": "trait" if trait else "audience"},
        ).rowcount
    )
