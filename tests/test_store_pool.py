"""The daemon's store connections: one kept for each thread that can wait on the store, all
opened when it becomes active, so that a store lock that makes them all wait at once opens
none (issue 22: a lock that opened and closed overflow connections left RSS 1.1 MB higher).

The lock is real, on every table: SQLite, another connection's BEGIN EXCLUSIVE; PostgreSQL, a
transaction holding LOCK TABLE ... IN EXCLUSIVE MODE (reads go on, writes wait), as the soak's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from audiencesync.daemon.active_period import REFRESH_WORKERS, STORE_CONNECTIONS
from audiencesync.store import store as store_mod
from bench.soak_world import StoreLock
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, members_true, wait_for
from tests.test_daemon_hardening import InProcess

KEYS = ("pool_one", "pool_two", "pool_three", "pool_four")
AUDIENCES = "".join(
    f"""
    [[audiences]]
    name = "Pool {key.removeprefix("pool_")}"
    source = "main"
    query = "SELECT user_id FROM members WHERE segment = 'a'"
    """
    for key in KEYS
)


def store_locked(store_url: str) -> contextlib.AbstractContextManager[None]:
    """Every table of the store locked against writes for the block, as the soak locks it."""
    return StoreLock(store_url).held()


class Opened:
    """Counts the connections an engine's pool opens, and the most it has out at once."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.count = 0
        self.peak = 0
        self._lock = threading.Lock()
        sa.event.listen(engine, "connect", self._connect)
        sa.event.listen(engine, "checkout", self._checkout)

    def _connect(self, *_: Any) -> None:
        with self._lock:
            self.count += 1

    def _checkout(self, *_: Any) -> None:
        pool = self.engine.pool
        assert isinstance(pool, QueuePool)
        with self._lock:
            self.peak = max(self.peak, pool.checkedout())

    def remove(self) -> None:
        sa.event.remove(self.engine, "connect", self._connect)
        sa.event.remove(self.engine, "checkout", self._checkout)


def migrated_engine(store_url: str, **kwargs: Any) -> sa.Engine:
    engine = store_mod.create_engine(store_url, create=True, **kwargs)
    store_mod.upgrade(engine)
    engine.dispose()  # the migration's connection: the pool starts empty
    return engine


def test_fill_pool_opens_every_connection_the_pool_keeps(store_url: str) -> None:
    engine = migrated_engine(store_url, pool_size=4)
    opened = Opened(engine)
    try:
        assert store_mod.fill_pool(engine) == 4
        assert opened.count == 4
        pool = engine.pool
        assert isinstance(pool, QueuePool) and pool.checkedin() == 4 and pool.overflow() == 0
        # Four threads' worth of connections out at once: all of them the pool's own.
        with contextlib.ExitStack() as held:
            for _ in range(4):
                held.enter_context(engine.connect()).exec_driver_sql("SELECT 1")
        assert opened.count == 4
        assert store_mod.fill_pool(engine) == 4  # again: nothing more to open
        assert opened.count == 4
        # With a connection out (another thread's), it opens none in that one's place.
        with engine.connect():
            assert store_mod.fill_pool(engine) == 4
        assert opened.count == 4 and pool.overflow() <= 0
    finally:
        opened.remove()
        engine.dispose()


def test_fill_pool_takes_a_connection_handed_back_meanwhile_and_still_opens_them_all(store_url: str) -> None:
    engine = migrated_engine(store_url, pool_size=3)
    other = engine.connect()  # another thread's, out when the fill starts
    opened = Opened(engine)
    handed_back: list[bool] = []

    def hand_back(*_: Any) -> None:
        if not handed_back:  # at the fill's first checkout: the other thread is done with it
            handed_back.append(True)
            other.close()

    sa.event.listen(engine, "checkout", hand_back)
    try:
        assert store_mod.fill_pool(engine) == 3
        pool = engine.pool
        assert isinstance(pool, QueuePool) and pool.checkedin() == 3 and pool.checkedout() == 0
        assert handed_back and opened.count == 2  # the other one's was open already
    finally:
        sa.event.remove(engine, "checkout", hand_back)
        opened.remove()
        other.close()
        engine.dispose()


def test_fill_pool_leaves_a_pool_of_one_connection_alone() -> None:
    engine = store_mod.empty_store()  # a StaticPool: the one connection it has
    try:
        assert store_mod.fill_pool(engine) == 0
    finally:
        engine.dispose()


def test_fill_pool_warns_and_goes_on_when_a_connection_cannot_be_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file with no schema: the connection opens, reading a table fails.
    engine = store_mod.create_engine(f"sqlite:///{tmp_path / 'store.db'}", create=True, pool_size=3)
    try:
        with caplog.at_level(logging.WARNING, logger="audiencesync.store.database"):
            assert store_mod.fill_pool(engine) == 1  # the one it opened, back in the pool
        [record] = caplog.records
        assert "could not open the store's connections ahead of need" in record.getMessage()
        assert "no such table: leases" in record.getMessage()
    finally:
        engine.dispose()


def test_a_store_lock_that_holds_every_refresh_opens_no_connection(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    source.set(["u1", "u2"])
    # A lease long enough that no renewal gives up while the test holds the lock.
    config = make_config(
        gleap.base_url, audiences=AUDIENCES, sync='lease_seconds = 60\nretry_backoff = "0s"', extra=SCHEDULE
    )
    daemon = InProcess(config)
    engine = daemon.core.engine
    opened = Opened(engine)  # from the daemon's first connection
    try:
        with daemon:
            wait_for(
                lambda: all(members_true(gleap, key) == {"u1", "u2"} for key in KEYS), what="the first syncs"
            )
            pool = engine.pool
            assert isinstance(pool, QueuePool) and pool.size() == STORE_CONNECTIONS
            # Filled as it became active: every connection it keeps, and no more, is open.
            assert opened.count == STORE_CONNECTIONS
            with store_locked(store_url):
                source.set(["u2", "u3"])
                # Every refresh worker (one per audience, 2 s apart) and the heartbeat wait at once.
                wait_for(
                    lambda: pool.checkedout() >= REFRESH_WORKERS + 1,
                    timeout=60,
                    what="the refreshes and the heartbeat to wait on the lock",
                )
            wait_for(
                lambda: all(members_true(gleap, key) == {"u2", "u3"} for key in KEYS),
                timeout=60,
                what="delivery after the lock",
            )
            assert opened.peak >= REFRESH_WORKERS + 1
            assert opened.count == STORE_CONNECTIONS, f"{opened.count} opened, {opened.peak} out at once"
            assert daemon.core.active and not daemon.core.lease.lost.is_set()
    finally:
        opened.remove()
