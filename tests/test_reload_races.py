"""What a daemon's reload, or a lease it lost and took back, may race: the delivery pass.

(Issue #19, A.1 and B.) A rename applied by a reload (SIGHUP) while identify calls are in
flight; a daemon that loses its lease and takes it back; a rename beside the daemon's
writes on SQLite; a holder stalled past its lease. Real daemons where signals matter,
in-process ones where a seam is needed; the loopback stand-in for Gleap, on both stores.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync import store as store_mod
from audiencesync.config import Config
from audiencesync.renames import Renames
from audiencesync.schema import audiences
from audiencesync.store import Store
from audiencesync.sync import Syncer
from tests.conftest import ConfigFactory, SourceDB
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


def test_a_rename_beside_another_write_waits_for_the_lock_on_sqlite(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    """B: a rename's transaction takes SQLite's write lock up front. Deferred, it failed at once
    with "database is locked" when another connection (the daemon's delivery) committed a write
    between its first read and its first write, and the refresh behind it was skipped."""
    if not store_url.startswith("sqlite"):
        pytest.skip("SQLite's deferred transactions")
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
