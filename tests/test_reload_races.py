"""What a daemon's reload, or a lease it lost and took back, may race: the delivery pass.

(Issue #19, A.1 and B.) A rename applied by a reload (SIGHUP) while identify calls are in
flight; a daemon that loses its lease and takes it back; a rename beside the daemon's
writes on SQLite; a holder stalled past its lease. Real daemons where signals matter,
in-process ones where a seam is needed; the loopback stand-in for Gleap, on both stores.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.delivery.pass_gate import PassGate
from audiencesync.errors import LeaseLostError
from audiencesync.lifecycle.renames import Renames
from audiencesync.store import store as store_mod
from audiencesync.store.carried_keys import as_carried
from audiencesync.store.lease import WriterLease
from audiencesync.store.schema import audiences
from audiencesync.store.store import Outcome, PendingChange, Store
from audiencesync.sync.cycle import Syncer
from tests.conftest import SQLITE_ONLY, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, Daemon, daemons, wait_for
from tests.test_renames import NEW, OLD, cycle, rename_and_deliver, rows

__all__ = ["daemons"]  # the daemon tests' fixture, used here too


def keys_held(gleap: GleapStandIn, *keys: str) -> dict[str, tuple[Any, ...]]:
    return {user: tuple(contact.get(k) for k in keys) for user, contact in gleap.contacts.items()}


def test_a_rename_by_a_reload_while_calls_are_in_flight_sends_the_new_key(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    """A.1: the answers to `seg_old: true` calls that land after the reload renamed the row must not
    acknowledge `seg_new`: Gleap ends with seg_old false and seg_new true for every member."""
    users = ["u1", "u2", "u3", "u4"]  # max_concurrency is 4: every first call is in flight at once
    source.set(users)
    # Held calls must not time out: they are answered when the test releases them.
    config = make_config(
        gleap.base_url, audiences=OLD, token=None, sync=SYNC, extra=SCHEDULE, timeout_seconds=120
    )
    gleap.hold()
    daemon = daemons(config)
    assert gleap.wait_held(len(users)), "the first sync's calls never went out"

    make_config(gleap.base_url, audiences=NEW, token=None, sync=SYNC, extra=SCHEDULE, timeout_seconds=120)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in daemon.output, what="the reload")
    gleap.release()

    # Both the buggy and the fixed daemon get here: the old key retired, the new one acknowledged.
    def settled() -> bool:
        renamed = rows(config, "seg_new")
        return rows(config, "seg_old") == {} and renamed == dict.fromkeys(users, (True, True))

    wait_for(settled, timeout=60, what="the rename delivered and the old key retired")
    assert keys_held(gleap, "seg_old", "seg_new") == dict.fromkeys(users, (False, True))
    assert daemon.stop() == 0


def test_answers_landing_after_a_rename_are_recorded_under_the_key_their_call_carried(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """A.1, the recording alone: even with nothing to make the rename wait for the pass, an answer
    to `seg_old: true` acknowledges seg_old (its retired row, still owed false), never seg_new."""
    users = ["u1", "u2", "u3", "u4"]
    source.set(users)
    config = make_config(gleap.base_url, audiences=OLD, timeout_seconds=120)
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01)
    try:
        (audience,) = config.properties
        run = syncer.refresh(audience, str(uuid.uuid4()))
        deliverer = syncer.deliverer()
        ids = {run.audience.id: "seg_old"}
        gleap.hold()
        passing = threading.Thread(
            target=lambda: asyncio.run(deliverer.drain(list(ids), ids, lambda _id: run.run_id)), daemon=True
        )
        passing.start()
        assert gleap.wait_held(len(users)), "the pass's calls never went out"
        Renames(engine).apply("seg_new", ["seg_old"])  # while every call is in flight
        gleap.release()
        passing.join(timeout=60)
        assert not passing.is_alive()
        syncer.finish(run)
    finally:
        syncer.sources.dispose()
        engine.dispose()

    new_config = make_config(gleap.base_url, audiences=NEW, timeout_seconds=120)
    assert rows(new_config, "seg_new") == dict.fromkeys(users, (True, None))  # still owed
    assert rows(new_config, "seg_old") == dict.fromkeys(users, (False, True))  # Gleap holds true
    gleap.reset_log()
    rename_and_deliver(new_config)
    assert keys_held(gleap, "seg_old", "seg_new") == dict.fromkeys(users, (False, True))
    assert rows(new_config, "seg_old") == {}


# SQLite's deferred transactions.
@SQLITE_ONLY
def test_a_rename_beside_another_write_waits_for_the_lock_on_sqlite(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    """B: a rename's transaction takes SQLite's write lock up front. Deferred, it failed at once
    with "database is locked" when another connection (the daemon's delivery) committed a write
    between its first read and its first write, and the refresh behind it was skipped."""
    source.set(["u1", "u2"])
    cycle(make_config(gleap.base_url, audiences=OLD))
    config = make_config(gleap.base_url, audiences=NEW)
    other: list[str] = []

    def another_write_meanwhile(conn: sa.Connection) -> None:
        """The rename has begun (the fence is its first read): another connection writes now if it
        can. Under BEGIN IMMEDIATE it can't (the rename holds the lock), which is the point."""
        conn.execute(sa.select(sa.func.count()).select_from(audiences))  # as the lease's check reads
        writer = sqlite3.connect(store_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")  # as set_next_run, say
            writer.execute("UPDATE audiences SET next_run_at = '2030-01-01 00:00:00.000000+00:00'")
            writer.execute("COMMIT")
            other.append("wrote")
        except sqlite3.OperationalError as exc:
            other.append(str(exc))
        finally:
            writer.close()

    engine = store_mod.engine_for(config.store)
    try:
        report = Renames(engine, fence=another_write_meanwhile).apply("seg_new", ["seg_old"])
    finally:
        engine.dispose()
    assert report.renamed_from == "seg_old"
    assert other == ["database is locked"]  # it waited for the rename instead
    rename_and_deliver(config)
    assert keys_held(gleap, "seg_old", "seg_new") == {"u1": (False, True), "u2": (False, True)}


def test_a_thread_left_from_an_earlier_active_period_fails_the_fence(store_url: str) -> None:
    """B: a daemon that takes the lease again does so under a fresh holder token, and a thread of
    its earlier active period (bound to it, as the delivery thread is) can no longer write."""
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    lease = WriterLease(engine, store_mod.utc_now, ttl_seconds=30, role="daemon")
    store = Store(engine, fence=lease.check)
    bound, go = threading.Event(), threading.Event()
    wrote: list[object] = []

    def left_over() -> None:
        lease.bind()  # as the delivery thread does when its period starts
        bound.set()
        go.wait(30)
        try:
            store.ensure_audience("late", "Late")
            wrote.append("wrote")
        except LeaseLostError as exc:
            wrote.append(exc)

    try:
        assert lease.try_acquire() is None
        first = lease.holder
        # The period ends without releasing the lease (as when a refresh still runs) and leaves a thread.
        with lease.kept(release=lambda: False):
            thread = threading.Thread(target=left_over, daemon=True)
            thread.start()
            assert bound.wait(30)
        assert lease.try_acquire() is None  # the next period: its own claim, taken again at once
        assert lease.holder != first
        with lease.kept():
            go.set()
            thread.join(timeout=30)
            assert len(wrote) == 1 and isinstance(wrote[0], LeaseLostError)
            assert not lease.lost.is_set()  # the current period goes on...
            store.ensure_audience("now", "Now")  # ...and writes
    finally:
        go.set()
        engine.dispose()


def test_a_holder_stalled_past_its_lease_sends_no_more_calls_and_records_no_answer(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """B: a holder that stalls past its lease while calls are in flight: its successor takes over;
    the stalled holder's late answers are not recorded (the fence), and it starts no further call
    (the daemon's check before each request, lease.require). The calls in flight when it stalled
    can still land after the successor's: the residual risk docs/guarantees.md names."""
    users = [f"u{i:02d}" for i in range(12)]
    source.set(users)
    config = make_config(gleap.base_url, timeout_seconds=120)  # max_concurrency = 4
    engine = store_mod.engine_for(config.store)
    clock = [store_mod.utc_now()]
    lease = WriterLease(engine, lambda: clock[0], ttl_seconds=30)
    assert lease.try_acquire() is None
    syncer = Syncer(config, Store(engine, clock=lambda: clock[0], fence=lease.check), backoff_initial=0.01)
    failed: list[BaseException] = []
    try:
        (audience,) = config.properties
        run = syncer.refresh(audience, str(uuid.uuid4()))
        deliverer = syncer.deliverer()

        def deliver() -> None:
            term = lease.bind()
            deliverer.before_send = functools.partial(lease.require, term)
            try:
                asyncio.run(
                    deliverer.drain([run.audience.id], {run.audience.id: "segment_a"}, lambda _: run.run_id)
                )
            except BaseException as exc:
                failed.append(exc)

        gleap.hold()
        passing = threading.Thread(target=deliver, daemon=True)
        passing.start()
        assert gleap.wait_held(4), "the pass's calls never went out"
        clock[0] += timedelta(seconds=31)  # the holder stalls past its lease...
        successor = WriterLease(engine, lambda: clock[0], ttl_seconds=30)
        assert successor.try_acquire() is None  # ...and another process takes over
        gleap.release()
        passing.join(timeout=60)
        assert not passing.is_alive()
    finally:
        gleap.release()
        syncer.sources.dispose()
        engine.dispose()
    assert len(failed) == 1 and isinstance(failed[0], LeaseLostError)
    assert len(gleap.identify_calls) == 4  # only those in flight when it stalled
    acked = {u: a for u, (_, a) in rows(config, "segment_a").items() if a is not None}
    assert acked == {}  # and none of their answers recorded: they stay owed, marked unknown


def test_the_pass_gate_lets_a_rename_in_between_two_passes_only() -> None:
    """pass_gate: a rename waits for the pass under way (and asks it to end early), goes before the
    next pass, and the delivery thread may rename between its own passes without waiting."""
    wake = threading.Event()
    gate = PassGate(wake)
    in_pass, end_pass, renamed = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def delivery() -> None:
        with gate.passing():
            with gate.exclusive():  # its own rename, between two of its calls: no wait
                order.append("own rename")
            in_pass.set()
            assert end_pass.wait(30)
            order.append("pass 1 ends")
        assert renamed.wait(30)
        with gate.passing():
            order.append("pass 2")

    def rename() -> None:
        with gate.exclusive():
            order.append("rename")
        renamed.set()

    thread = threading.Thread(target=delivery, daemon=True)
    thread.start()
    assert in_pass.wait(30)
    renaming = threading.Thread(target=rename, daemon=True)
    renaming.start()
    assert wake.wait(30)  # the pass is asked to end early
    assert "rename" not in order  # ...and the rename waits for it
    end_pass.set()
    renaming.join(timeout=30)
    thread.join(timeout=30)
    assert order == ["own rename", "pass 1 ends", "rename", "pass 2"]


def test_a_rename_before_any_pass_goes_straight_through() -> None:
    """A gate no pass has used yet: a rename neither waits nor asks a pass to end early."""
    wake = threading.Event()
    gate = PassGate(wake)
    renamed = threading.Event()

    def rename() -> None:
        with gate.exclusive():
            renamed.set()

    thread = threading.Thread(target=rename, daemon=True)
    thread.start()
    assert renamed.wait(30), "a rename with no pass under way waited"
    thread.join(timeout=30)
    assert not wake.is_set()


def test_answers_are_moved_to_the_row_that_holds_the_key_their_call_carried(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    renamed, other, lost = (store.ensure_audience(k, k.upper()).id for k in ("old", "other", "gone"))
    keys = {renamed: "old", other: "other", lost: "gone"}  # what the calls carried
    a, b, c = (
        PendingChange(renamed, "u1", True),
        PendingChange(other, "u1", True),
        PendingChange(lost, "u2", True),
    )
    results = [Outcome((a, b), 200), Outcome((c,), 200)]
    run_ids = {renamed: 11, other: 12, lost: 13}
    with store.engine.connect() as conn:
        assert as_carried(conn, results, run_ids, keys) == (results, run_ids)  # nothing renamed
    # Renamed meanwhile: "old" is another row now; no row has "gone" any more.
    with store.engine.begin() as conn:
        conn.execute(sa.update(audiences).where(audiences.c.id == renamed).values(key="new"))
        conn.execute(sa.update(audiences).where(audiences.c.id == lost).values(key="gone2"))
    old = store.ensure_audience("old", "OLD").id
    caplog.set_level("WARNING")
    with store.engine.connect() as conn:
        moved, moved_runs = as_carried(conn, results, run_ids, keys)
    assert moved == [Outcome((PendingChange(old, "u1", True), b), 200)]  # nothing to record c against
    assert moved_runs == {old: 11, **run_ids}
    assert [r.getMessage() for r in caplog.records] == [
        "answers to calls that carried gone, old recorded under that key: its row was renamed meanwhile"
    ]
