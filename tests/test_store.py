"""The store on a real database: migrations, the SQL diff, pending changes, acknowledgements."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from audiencesync.delivery.call_turns import plan_calls
from audiencesync.errors import StoreError
from audiencesync.store import stage as stage_mod, store as store_mod
from audiencesync.store.schema import membership_changes, metadata
from audiencesync.store.store import Outcome, PendingChange, Store
from tests.conftest import SQLITE_ONLY


def refresh(
    store: Store, key: str, ids: list[str], *, full: bool = False, batch: int = 2
) -> tuple[int, int, int]:
    audience = store.ensure_audience(key, key)
    run_id = store.start_run("cycle", audience, "incremental")
    batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    counts = store.refresh(audience, run_id, iter(batches), full=full).counts
    return counts.members, counts.entered, counts.left


def pending(store: Store, key: str) -> dict[str, bool]:
    audience = store.ensure_audience(key, key)
    calls = plan_calls(store, [audience.id], keys={audience.id: key})
    return {c.user_id: c.desired for _, call in calls for c in call.changes}


def ack_all(store: Store, key: str, status: int = 200) -> None:
    audience = store.ensure_audience(key, key)
    run_id = store.start_run("cycle", audience, "incremental")
    calls = list(plan_calls(store, [audience.id], keys={audience.id: key}))
    store.record([Outcome(tuple(call.changes), status) for _, call in calls], {audience.id: run_id})


def test_fresh_database_upgrades_to_head_and_matches_the_models(store: Store) -> None:
    current, head = store_mod.schema_revisions(store.engine)
    assert current == head
    with store.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []
    assert store_mod.upgrade(store.engine) is False  # idempotent


def test_store_from_a_newer_version_is_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'fffffffffff'"))
    with pytest.raises(StoreError, match="newer audiencesync"):
        store_mod.upgrade(store.engine)


def test_first_refresh_makes_every_member_pending_true(store: Store) -> None:
    assert refresh(store, "a", ["u1", "u2", "u3"]) == (3, 3, 0)
    assert pending(store, "a") == {"u1": True, "u2": True, "u3": True}


def test_duplicates_count_once(store: Store) -> None:
    assert refresh(store, "a", ["u1", "u1", "u2", "u2", "u2"]) == (2, 2, 0)


def test_duplicates_in_an_incremental_refresh_count_once(store: Store) -> None:
    # On PostgreSQL the ids-only stage has no key: the diff's one join must dedupe itself.
    refresh(store, "a", ["u1", "u2", "u3"])
    ack_all(store, "a")
    # u2 stays (given twice), u4 enters (three times), u1 and u3 leave.
    assert refresh(store, "a", ["u2", "u4", "u2", "u4", "u4"]) == (2, 1, 2)
    assert pending(store, "a") == {"u1": False, "u3": False, "u4": True}
    with store.engine.connect() as conn:
        changes = conn.execute(
            sa.select(membership_changes.c.user_id, membership_changes.c.change).where(
                membership_changes.c.change != "entered", membership_changes.c.user_id != "u4"
            )
        ).all()
        members = conn.execute(sa.text("SELECT members FROM audience_counts")).scalar_one()
    assert sorted(changes) == [("u1", "left"), ("u3", "left")]
    assert members == 2
    # A leaver who comes back, given twice, enters once.
    assert refresh(store, "a", ["u1", "u2", "u4", "u1"]) == (3, 1, 0)


def test_unchanged_source_after_acks_leaves_nothing_pending(store: Store) -> None:
    refresh(store, "a", ["u1", "u2"])
    ack_all(store, "a")
    assert pending(store, "a") == {}
    assert refresh(store, "a", ["u2", "u1"]) == (2, 0, 0)
    assert pending(store, "a") == {}


def test_churn_pends_only_the_changes(store: Store) -> None:
    refresh(store, "a", ["u1", "u2", "u3"])
    ack_all(store, "a")
    assert refresh(store, "a", ["u2", "u3", "u4"]) == (3, 1, 1)
    assert pending(store, "a") == {"u1": False, "u4": True}
    with store.engine.connect() as conn:
        changes = conn.execute(
            sa.select(membership_changes.c.user_id, membership_changes.c.change).order_by(
                membership_changes.c.id
            )
        ).all()
    assert [tuple(c) for c in changes][-2:] == [("u1", "left"), ("u4", "entered")]


def test_leaver_acknowledged_false_is_dropped_from_the_snapshot(store: Store) -> None:
    refresh(store, "a", ["u1", "u2"])
    ack_all(store, "a")
    refresh(store, "a", ["u2"])
    ack_all(store, "a")
    assert store.memberships_of("a") == {"u2": (True, True)}


def test_flip_before_delivery_sends_the_latest_value_or_nothing(store: Store) -> None:
    refresh(store, "a", ["u1", "u2"])
    ack_all(store, "a")
    # u2 leaves and comes back before anything was delivered: Gleap already has true.
    refresh(store, "a", ["u1"])
    refresh(store, "a", ["u1", "u2"])
    assert pending(store, "a") == {}
    # u3 enters and leaves before delivery: Gleap never had u3, so nothing is sent.
    refresh(store, "a", ["u1", "u2", "u3"])
    refresh(store, "a", ["u1", "u2"])
    assert pending(store, "a") == {}
    # u1 leaves, comes back, leaves again: only the latest value (false) goes out.
    refresh(store, "a", ["u2"])
    refresh(store, "a", ["u1", "u2"])
    refresh(store, "a", ["u2"])
    assert pending(store, "a") == {"u1": False}


def test_ack_of_a_stale_value_keeps_the_change_pending(store: Store) -> None:
    refresh(store, "a", ["u1"])
    audience = store.ensure_audience("a", "a")
    run_id = store.start_run("cycle", audience, "incremental")
    in_flight = PendingChange(audience.id, "u1", True)
    refresh(store, "a", [])  # u1 left while the true was on its way
    store.record([Outcome((in_flight,), 200)], {audience.id: run_id})
    assert pending(store, "a") == {"u1": False}


def test_failed_delivery_stays_pending_with_the_error(store: Store) -> None:
    refresh(store, "a", ["u1", "u2"])
    audience = store.ensure_audience("a", "a")
    run_id = store.start_run("cycle", audience, "incremental")
    store.record(
        [
            Outcome((PendingChange(audience.id, "u1", True),), 400, "HTTP 400: bad id", permanent=True),
            Outcome((PendingChange(audience.id, "u2", True),), 200),
        ],
        {audience.id: run_id},
    )
    # Still owed, but not before its backoff (60 s by default) has passed.
    assert pending(store, "a") == {} and store.pending_count([audience.id]) == 1
    later = Store(store.engine, clock=lambda: store_mod.utc_now() + timedelta(seconds=61))
    assert pending(later, "a") == {"u1": True}
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT attempts, failures, last_status, last_error FROM memberships WHERE user_id='u1'")
        ).one()
    assert tuple(row) == (1, 1, 400, "HTTP 400: bad id")
    finished = store.finish_run(run_id, "succeeded")
    assert (finished["status"], finished["sent"], finished["failed"], finished["pending_after"]) == (
        "partial",
        1,
        1,
        1,
    )


def test_full_refresh_resends_current_members_only(store: Store) -> None:
    refresh(store, "a", ["u1", "u2"])
    ack_all(store, "a")
    refresh(store, "a", ["u2", "u3"], full=True)
    assert pending(store, "a") == {"u1": False, "u2": True, "u3": True}


def test_calls_carry_all_of_a_users_audiences_once_and_audiences_take_turns(store: Store) -> None:
    users = [f"u{i:03d}" for i in range(50)]
    refresh(store, "big", users)
    refresh(store, "small", ["u049", "x1", "x2"])
    ids = [store.ensure_audience(k, k).id for k in ("big", "small")]
    order: list[str] = []
    # Nothing is answered: every row stays due for the whole pass, and the pass keeps no set of users.
    for user_id, call in plan_calls(
        store, ids, page_size=7, keys=dict(zip(ids, ("big", "small"), strict=True))
    ):
        changes = call.changes
        assert all(c.user_id == user_id for c in changes)
        order.append(user_id)
        if user_id == "u049":
            assert {c.audience_id for c in changes} == set(ids)  # one call, both audiences
    assert sorted(order) == sorted({*users, "x1", "x2"})  # everyone exactly once
    # The small audience's users don't wait for the big audience's 50: they come in the first turns.
    assert order.index("x2") < 10


def test_failing_source_mid_read_leaves_the_snapshot_untouched(store: Store) -> None:
    refresh(store, "a", ["u1", "u2"])
    audience = store.ensure_audience("a", "a")
    run_id = store.start_run("cycle", audience, "incremental")

    def broken() -> object:
        yield ["u1"]
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        store.refresh(audience, run_id, broken(), full=False)  # type: ignore[arg-type]
    assert store.memberships_of("a") == {"u1": (True, None), "u2": (True, None)}


def test_a_stage_left_on_a_pooled_connection_is_dropped_before_the_next(store: Store) -> None:
    """A stage has the same name every refresh (so its statements are the same texts): one
    that an error left on a pooled connection must not be mixed into the next refresh."""
    refresh(store, "a", ["u1", "u2"])
    with store.engine.connect() as conn:  # the pool's connection, as a failed drop would leave it
        with conn.begin():
            stage_mod.create_stage(conn, stage_mod.new_stage_name())
            stage_mod.load_batch(conn, stage_mod.new_stage_name(), ["stale1", "stale2"])
        conn.exec_driver_sql(f"CREATE TEMP TABLE {stage_mod.new_stage_name()}_changes (user_id TEXT)")
        conn.commit()
    refresh(store, "a", ["u2", "u3"])
    assert store.memberships_of("a") == {"u2": (True, None), "u3": (True, None)}  # no stale1, stale2


@pytest.mark.parametrize("hashagg", ["on", "off"])
def test_the_plans_seal_is_distinct_sorted_and_leaves_the_planner_as_it_was(
    store: Store, hashagg: str
) -> None:
    # On PostgreSQL the dry run's seal sorts without a hash aggregate for its one statement;
    # the plan's statements after it get the setting the transaction had.
    name = stage_mod.new_stage_name()
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL enable_hashagg = {hashagg}")
        stage_mod.create_stage(conn, name)
        stage_mod.load_batch(conn, name, ["u3", "u1", "u3", "u2", "u1"])
        assert stage_mod.seal_for_plan(conn, name, valued=False) == 3
        ids = [r[0] for r in conn.exec_driver_sql(f"SELECT user_id FROM {name} ORDER BY user_id")]
        assert ids == ["u1", "u2", "u3"]
        if store.engine.dialect.name == "postgresql":
            assert conn.exec_driver_sql("SHOW enable_hashagg").scalar() == hashagg


def test_a_store_table_named_like_the_stage_is_never_dropped(store: Store) -> None:
    """The stage is dropped by its temporary schema's name: a table of the store's own with
    the same name (made by someone else) is left alone."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {stage_mod.new_stage_name()} (note TEXT)")
        conn.exec_driver_sql(f"INSERT INTO {stage_mod.new_stage_name()} VALUES ('kept')")
    try:
        refresh(store, "a", ["u1", "u2"])
        refresh(store, "a", ["u2"])
        with store.engine.connect() as conn:
            kept = conn.exec_driver_sql(f"SELECT note FROM {stage_mod.new_stage_name()}").scalars().all()
            assert kept == ["kept"]
        assert store.memberships_of("a") == {"u2": (True, None)}
    finally:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {stage_mod.new_stage_name()}")


# SQLite's query plan.
@SQLITE_ONLY
def test_pending_page_query_walks_the_primary_key_in_order(store: Store) -> None:
    query = store_mod.pending_page_query(1, [1, 2], "u1", 100)
    sql = query.compile(store.engine, compile_kwargs={"literal_binds": True})
    with store.engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
    assert not any("SCAN" in str(row) and "memberships" in str(row) for row in plan), plan


def test_a_large_stage_load_reaches_the_stage_whole_in_small_copy_messages(store: Store) -> None:
    """libpq grows a connection's output buffer to the largest COPY message and keeps it for the
    connection's life; the load goes in pieces of at most COPY_PIECE bytes, cut as bytes, so a
    piece may end inside a character (the ids here are 2-byte "é"s, 3 of them split) and values
    with them, and COPY still reads every row as it was."""
    ids = [f"u{i:05d}-" + "é" * (i % 7) for i in range(6000)]
    rows = [(user_id, '{"plan": "ré"}' if i % 2 else None) for i, user_id in enumerate(ids)]
    name = stage_mod.new_stage_name()
    with store.engine.begin() as conn:
        stage_mod.create_stage(conn, name)
        stage_mod.load_batch(conn, name, ids)
        loaded = sorted(r[0] for r in conn.exec_driver_sql(f"SELECT user_id FROM {name}"))
        stage_mod.drop_stage(conn, name)
        stage_mod.create_stage(conn, name)
        stage_mod.load_values(conn, name, rows)
        valued = sorted(tuple(r) for r in conn.exec_driver_sql(f"SELECT user_id, value FROM {name}"))
        stage_mod.drop_stage(conn, name)
    assert loaded == sorted(ids)
    assert valued == sorted(rows, key=lambda r: r[0])


def test_copy_pieces_are_small_and_whole_together() -> None:
    class Copy:  # the seam: what psycopg's Copy is given, and its connection's encoding
        def __init__(self) -> None:
            self.connection = SimpleNamespace(info=SimpleNamespace(encoding="utf-8"))
            self.pieces: list[bytes] = []

        def write(self, data: memoryview) -> None:
            self.pieces.append(bytes(data))

    block = "".join(f"u{i}-é\n" for i in range(5000))
    copy = Copy()
    stage_mod._write_pieces(copy, block)
    assert len(copy.pieces) > 1 and max(map(len, copy.pieces)) <= stage_mod.COPY_PIECE
    assert b"".join(copy.pieces) == block.encode()
