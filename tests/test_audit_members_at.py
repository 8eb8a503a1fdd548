"""The members at an instant from each departure's entry time (migration 0015), on both stores:
the migration fills it in for a store written before it, with every answer unchanged; the sync
writes it; a prune blanks it with the entry it deletes. Edge cases: a user who leaves and comes
back again and again, instants exactly at a change and just before it, another audience's
changes, a new value in between, a departure whose entry was pruned."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import command

from audiencesync.lifecycle.prune import Pruner
from audiencesync.store import audit, database, store as store_mod
from audiencesync.store.schema import membership_changes
from audiencesync.store.utc_time import UtcDateTime
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_outcomes import Clock, cycle

BASE = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
T = [BASE + timedelta(hours=k) for k in range(8)]  # T[1]..T[7]
TICK = timedelta(microseconds=1)

# The members at an instant as the audit answered it before 0015: each departure after it
# looked up the entry before it (the query of docs/schema.md then, by audience id).
BEFORE_0015 = sa.text(
    "SELECT user_id, since FROM ("
    "  SELECT user_id, changed_at AS since FROM memberships"
    "  WHERE audience_id = :a AND desired = true AND changed_at <= :t"
    "  UNION ALL"
    "  SELECT user_id, since FROM ("
    "    SELECT c.user_id, ("
    "      SELECT e.at FROM membership_changes e"
    "      WHERE e.audience_id = c.audience_id AND e.user_id = c.user_id AND e.id < c.id"
    "        AND e.change = 'entered' ORDER BY e.id DESC LIMIT 1"
    "    ) AS since"
    "    FROM membership_changes c WHERE c.audience_id = :a AND c.at > :t AND c.change = 'left'"
    "  ) departures WHERE since IS NULL OR since <= :t"
    ") members ORDER BY user_id"
).bindparams(sa.bindparam("t", type_=UtcDateTime))


def instants() -> list[datetime]:
    """Before anything, exactly at each change, a microsecond before it, and between changes."""
    return [T[0]] + [at + d for at in T[1:] for d in (-TICK, timedelta(0), timedelta(minutes=30))]


Answers = dict[datetime, list[tuple[Any, ...]]]


def answers(conn: sa.Connection, audience_id: int, query: sa.TextClause | None = None) -> Answers:
    if query is None:
        return {at: [tuple(r) for r in audit.members(conn, audience_id, at)] for at in instants()}
    typed = query.columns(user_id=sa.String, since=UtcDateTime)
    return {at: [tuple(r) for r in conn.execute(typed, {"a": audience_id, "t": at})] for at in instants()}


def test_0015_gives_each_departure_its_entry_time_and_every_answer_stays(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0014_covering_change_indexes")
        conn.execute(
            sa.text(
                "INSERT INTO audiences (id, key, name, created_at) "
                "VALUES (1, 'a', 'A', :t), (2, 'b', 'B', :t)"
            ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
            {"t": T[1]},
        )
        for run in range(1, 8):
            conn.execute(
                sa.text(
                    "INSERT INTO sync_runs (id, cycle_id, audience_id, mode, status, started_at) "
                    f"VALUES ({run}, 'c{run}', 1, 'incremental', 'succeeded', :t)"
                ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
                {"t": T[run]},
            )
        # (audience, user, cycle, change), in the order the sync would have written them.
        # u1 comes back twice; u2 gets a new value, then leaves; u3 stays; u4's entry was pruned,
        # so its departure is its first change; u5 leaves and comes back within audience 1 while
        # in audience 2 it enters later (its departure there must not take audience 1's entry).
        changes = [
            (1, "u1", 1, "entered"),
            (1, "u2", 1, "entered"),
            (1, "u3", 1, "entered"),
            (1, "u5", 1, "entered"),
            (1, "u2", 2, "changed"),
            (1, "u5", 2, "left"),
            (1, "u1", 3, "left"),
            (1, "u5", 3, "entered"),
            (2, "u5", 3, "entered"),
            (1, "u2", 4, "left"),
            (1, "u4", 4, "left"),
            (1, "u1", 5, "entered"),
            (1, "u1", 6, "left"),
            (2, "u5", 6, "left"),
            (1, "u1", 7, "entered"),
        ]
        for audience, user, run, change in changes:
            conn.execute(
                sa.text(
                    "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
                    f"VALUES ({audience}, '{user}', {run}, '{change}', :t)"
                ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
                {"t": T[run]},
            )
        for user, run in (("u1", 7), ("u3", 1), ("u5", 3)):
            conn.execute(
                sa.text(
                    "INSERT INTO memberships (audience_id, user_id, desired, acked, changed_at) "
                    f"VALUES (1, '{user}', true, true, :t)"
                ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
                {"t": T[run]},
            )
        before = {a: answers(conn, a, BEFORE_0015) for a in (1, 2)}
    store_mod.upgrade(engine)

    c = membership_changes.c
    with engine.connect() as conn:
        entries = conn.execute(
            sa.select(c.audience_id, c.user_id, c.at, c.entered_at).where(c.change == "left").order_by(c.id)
        ).all()
    assert [tuple(r) for r in entries] == [
        (1, "u5", T[2], T[1]),
        (1, "u1", T[3], T[1]),
        (1, "u2", T[4], T[1]),  # its entry, not its new value
        (1, "u4", T[4], None),  # the entry was pruned
        (1, "u1", T[6], T[5]),
        (2, "u5", T[6], T[3]),  # audience 2's entry
    ]
    with audit.snapshot(engine) as conn:
        after = {a: answers(conn, a) for a in (1, 2)}
    assert after == before
    # A few answers spelled out, so that the comparison above can't pass on empty ones.
    assert after[1][T[3] - TICK] == [("u1", T[1]), ("u2", T[1]), ("u3", T[1]), ("u4", None)]
    assert after[1][T[3]] == [("u2", T[1]), ("u3", T[1]), ("u4", None), ("u5", T[3])]  # at a change
    assert after[1][T[6]] == [("u3", T[1]), ("u5", T[3])]
    assert after[1][T[7]] == [("u1", T[7]), ("u3", T[1]), ("u5", T[3])]
    assert after[2][T[5]] == [("u5", T[3])] and after[2][T[6]] == []

    with engine.begin() as conn:
        command.downgrade(database._alembic_config(conn), "0014_covering_change_indexes")
    with engine.connect() as conn:
        columns = {col["name"] for col in sa.inspect(conn).get_columns("membership_changes")}
        indexes = {str(i["name"]) for i in sa.inspect(conn).get_indexes("membership_changes")}
        assert conn.execute(sa.text("SELECT count(*) FROM membership_changes")).scalar_one() == len(changes)
    assert "entered_at" not in columns
    assert "ix_membership_changes_audience_id_at_change_user_id_id" in indexes
    engine.dispose()


# segment_a's members after each cycle: u1 leaves and comes back twice, u2 leaves for good in 4.
SOURCE = {
    1: ["u1", "u2", "u3"],
    2: ["u2", "u3"],
    3: ["u1", "u2", "u3"],
    4: ["u1", "u3", "u4"],
    5: ["u3", "u4"],
    6: ["u1", "u3", "u4"],
    7: ["u1", "u3", "u4"],
}


def expected_at(at: datetime) -> dict[str, datetime]:
    """Each member at ``at`` and when their membership then began, from the script."""
    members: dict[str, datetime] = {}
    for k, ids in SOURCE.items():
        if T[k] > at:
            break
        members = {u: members.get(u, T[k]) for u in ids}
    return members


def test_members_at_every_instant_of_comings_and_goings_from_real_cycles(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    config = make_config(gleap.base_url, sync='retry_backoff = "0s"\nmax_removal_fraction = 0.9')
    clock = Clock()
    for k, ids in SOURCE.items():
        clock.now = T[k]
        source.set(ids)
        cycle(config, clock)
    engine = store_mod.engine_for(config.store)
    c = membership_changes.c
    with engine.connect() as conn:
        departures = conn.execute(
            sa.select(c.user_id, c.at, c.entered_at).where(c.change == "left").order_by(c.id)
        ).all()
    # The sync writes each departure's entry time (memberships.changed_at before it left).
    assert [tuple(r) for r in departures] == [
        ("u1", T[2], T[1]),
        ("u2", T[4], T[1]),
        ("u1", T[5], T[3]),
    ]
    with audit.snapshot(engine) as conn:
        audience = audit.audience(conn, "segment_a", ["segment_a"])
        assert audience.id is not None
        got = answers(conn, audience.id)
    assert got == {at: sorted(expected_at(at).items()) for at in instants()}

    # A prune at half past 3 deletes the entries of cycles 1-3 that nothing holds: a departure
    # after it whose entry went forgets the entry's time (u1's of cycle 3, u2's of cycle 1),
    # so `since` is empty, as when the audit looked the entry up; a member now keeps
    # memberships.changed_at (u3). Who was a member stays exact.
    horizon = T[3] + timedelta(minutes=30)
    assert Pruner(engine, store_mod.utc_now, pause_seconds=0).prune(horizon, by="cli").finished
    with audit.snapshot(engine) as conn:
        pruned = {
            at: [tuple(r) for r in audit.members(conn, audience.id, at)] for at in instants() if at >= horizon
        }
    with engine.connect() as conn:
        departures = conn.execute(
            sa.select(c.user_id, c.at, c.entered_at).where(c.change == "left").order_by(c.id)
        ).all()
    engine.dispose()
    assert [tuple(r) for r in departures] == [("u2", T[4], None), ("u1", T[5], None)]
    blanked = {"u1": T[3], "u2": T[1]}
    assert pruned == {
        at: sorted((u, None if blanked.get(u) == since else since) for u, since in expected_at(at).items())
        for at in pruned
    }
    assert pruned[T[4] - TICK] == [("u1", None), ("u2", None), ("u3", T[1])]
