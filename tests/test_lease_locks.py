"""A store lock shorter than the lease never costs the lease; a longer one loses it, and says so.

(Issue 22, item 2.) The lock is real: on SQLite a second connection holding a write
transaction (BEGIN IMMEDIATE), on PostgreSQL a transaction holding the lease row FOR UPDATE.
It starts just after a renewal the test has seen in the row and lasts until 80% of the TTL
after it: the edge the heartbeat must survive. SQLite's busy timeout is set short, as a store
may be configured, so that a renewal cannot simply wait the whole lock out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import QueuePool

from audiencesync.errors import LeaseLostError
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.store.lease_renewal import LeaseUnrenewedError
from audiencesync.store.schema import leases
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, cli, free_port, members_true, wait_for
from tests.test_daemon_hardening import InProcess, healthz, metrics, with_store_setting

TTL = 15.0  # long enough that the renewal after the lock has seconds to spare on a busy machine
EDGE = 0.8  # the lock ends this fraction of the TTL after the last renewal


def lease_row(engine: sa.Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(leases).where(leases.c.name == "writer")).one()


def next_renewal(engine: sa.Engine, after: datetime, timeout: float = 30) -> Any:
    """The lease row once a renewal later than ``after`` is in it."""
    seen: list[Any] = []

    def renewed() -> bool:
        seen[:] = [lease_row(engine)]
        return bool(seen[0].renewed_at > after)

    wait_for(renewed, timeout=timeout, what="a renewal of the lease")
    return seen[0]


@contextlib.contextmanager
def locked(store_url: str) -> Iterator[None]:
    """The store locked against the lease's renewal for the block, as another process would."""
    if store_url.startswith("sqlite"):
        locker = sqlite3.connect(store_url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # the write lock: every other writer waits or fails
            yield
            locker.execute("COMMIT")
        finally:
            locker.close()
        return
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(sa.text("SELECT holder FROM leases WHERE name = 'writer' FOR UPDATE")).all()
            yield
            # the rollback at the block's end lets the row go
    finally:
        engine.dispose()


def until(moment: datetime, timeout: float = 60) -> None:
    """Wait (polling) until the real clock, which the lease uses, reaches ``moment``."""
    wait_for(lambda: store_mod.utc_now() >= moment, timeout=timeout, what=f"the clock to reach {moment}")


def short_busy_engine(store_url: str) -> sa.Engine:
    engine = store_mod.create_engine(store_url, create=True, busy_timeout_seconds=0.2)
    store_mod.upgrade(engine)
    return engine


# --- the lease alone ----------------------------------------------------------------------------


def test_a_lock_ending_at_four_fifths_of_the_ttl_keeps_the_lease(store_url: str) -> None:
    engine = short_busy_engine(store_url)
    lease = WriterLease(engine, store_mod.utc_now, ttl_seconds=TTL)
    try:
        with lease.held():
            last = next_renewal(engine, after=lease_row(engine).renewed_at)
            with locked(store_url):
                until(last.renewed_at + timedelta(seconds=EDGE * TTL))
            after = next_renewal(engine, after=last.renewed_at)
            # Renewed before it expired: no other process could have taken it meanwhile.
            assert after.renewed_at < last.expires_at, (after.renewed_at, last.expires_at)
            assert after.holder == lease.holder
            assert not lease.lost.is_set() and lease.loss is None
            lease.require(lease.holder)  # calls to Gleap may go out again
    finally:
        engine.dispose()


def test_a_lock_longer_than_the_ttl_loses_the_lease_and_says_why(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="audiencesync")
    ttl = 4.0
    engine = short_busy_engine(store_url)
    lease = WriterLease(engine, store_mod.utc_now, ttl_seconds=ttl)
    try:
        with lease.held():
            last = next_renewal(engine, after=lease_row(engine).renewed_at)
            with locked(store_url):
                wait_for(lease.lost.is_set, timeout=ttl * 5, what="the lease to be lost")
            assert lease.loss is not None
            message = str(lease.loss)
            assert f"the store's lease expired at {last.expires_at.isoformat(timespec='seconds')}" in message
            assert "could not be renewed for" in message
            assert ("database is locked" if store_url.startswith("sqlite") else "lock timeout") in message
            assert "no other process has taken it" in message
            assert "took over" not in message
            with pytest.raises(LeaseLostError) as raised:
                lease.require(lease.holder)
            assert str(raised.value) == message
            with pytest.raises(LeaseLostError) as raised, engine.begin() as conn:
                lease.check(conn)
            assert str(raised.value) == message
    finally:
        engine.dispose()
    logged = [r for r in caplog.records if r.name.startswith("audiencesync")]
    warned = [r for r in logged if "could not renew the store's lease" in r.getMessage()]
    assert warned and all(r.levelname == "WARNING" for r in warned)
    assert not any("took over" in r.getMessage() for r in logged)


def test_a_takeover_is_named_as_one(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    mine = WriterLease(engine, store_mod.utc_now, ttl_seconds=TTL)
    later = [store_mod.utc_now() + timedelta(seconds=2 * TTL)]
    other = WriterLease(engine, lambda: later[0], ttl_seconds=TTL)  # its clock is past our expiry
    other.pid = 4242
    try:
        with mine.held():
            assert other.try_acquire() is None
            wait_for(mine.lost.is_set, timeout=TTL * 2, what="the next renewal to find the other holder")
            assert mine.loss is not None
            assert f"another process took over the store's lease: {other.host} pid 4242" in str(mine.loss)
    finally:
        engine.dispose()


def test_an_unrenewed_lease_pauses_calls_until_it_expires(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    clock = [store_mod.utc_now()]
    lease = WriterLease(engine, lambda: clock[0], ttl_seconds=TTL)
    try:
        lease.acquire()
        term = lease.holder
        clock[0] += timedelta(seconds=TTL - lease.send_margin / 2)  # within the margin, not expired
        with pytest.raises(LeaseUnrenewedError, match="no calls to Gleap until it is renewed"):
            lease.require(term)
        assert not lease.lost.is_set()  # a pause: the heartbeat may still renew it
        lease.renew()
        lease.require(term)
        clock[0] += timedelta(seconds=TTL + 1)  # past the expiry, still unrenewed
        with pytest.raises(LeaseLostError, match=r"expired at .* unrenewed") as raised:
            lease.require(term)
        assert "took over" not in str(raised.value)
        assert lease.lost.is_set()
    finally:
        engine.dispose()


# --- the daemon ---------------------------------------------------------------------------------


def interrupted_runs(store_url: str) -> int:
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            query = sa.text("SELECT count(*) FROM sync_runs WHERE status = 'interrupted'")
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def daemon_config(
    make_config: ConfigFactory, gleap: GleapStandIn, store_url: str, ttl: float, extra: str = SCHEDULE
) -> Any:
    sync = f'lease_seconds = {ttl:g}\nretry_backoff = "0s"'
    config = make_config(gleap.base_url, sync=sync, extra=extra)
    if store_url.startswith("sqlite"):
        config = with_store_setting(config, "busy_timeout_seconds = 0.2")
    return config


def test_the_daemon_keeps_its_lease_and_runs_through_a_lock_shorter_than_it(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    source.set(["u1", "u2"])
    with InProcess(daemon_config(make_config, gleap, store_url, TTL)) as daemon:
        wait_for(lambda: members_true(gleap) == {"u1", "u2"}, what="the first sync")
        lease = daemon.core.lease
        term = lease.holder
        engine = daemon.core.engine
        last = next_renewal(engine, after=lease_row(engine).renewed_at)
        with locked(store_url):
            source.set(["u2", "u3"])  # refreshes meet the lock, and fail until it ends
            until(last.renewed_at + timedelta(seconds=EDGE * TTL))
        wait_for(lambda: members_true(gleap) == {"u2", "u3"}, what="delivery after the lock")
        after = next_renewal(engine, after=last.renewed_at)
        assert after.renewed_at < last.expires_at
        assert lease.holder == term and not lease.lost.is_set(), lease.loss  # the same term throughout
        assert daemon.core.active
    assert interrupted_runs(store_url) == 0


def test_the_daemon_says_its_lease_expired_in_a_lock_and_takes_it_back(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    store_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="audiencesync")
    ttl = 4.0
    source.set(["u1"])
    with InProcess(daemon_config(make_config, gleap, store_url, ttl)) as daemon:
        wait_for(lambda: members_true(gleap) == {"u1"}, what="the first sync")
        lease = daemon.core.lease
        term = lease.holder
        with locked(store_url):
            wait_for(lease.lost.is_set, timeout=ttl * 5, what="the lease to be lost")
        wait_for(lambda: lease.holder != term and daemon.core.active, timeout=60, what="the lease taken back")
        source.set(["u1", "u2"])
        wait_for(lambda: members_true(gleap) == {"u1", "u2"}, what="delivery in the new term")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "took over" not in text, text
    lost = [r for r in caplog.records if "Going back to standby" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelname == "ERROR", text
    assert "could not be renewed for" in lost[0].getMessage()
    assert "no other process has taken it" in lost[0].getMessage()


def test_a_renewal_puts_the_pooled_connections_busy_timeout_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = store_mod.create_engine(url, create=True, busy_timeout_seconds=30)
    store_mod.upgrade(engine)
    lease = WriterLease(engine, store_mod.utc_now, ttl_seconds=TTL)
    try:
        lease.acquire()
        lease.renew(timeout=0.1)
        pool = engine.pool
        assert isinstance(pool, QueuePool) and pool.checkedin() == 1  # the one connection, back in the pool
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 30_000
    finally:
        engine.dispose()


def test_a_lock_past_the_grace_is_store_unwritable_on_every_surface_until_a_renewal_goes_through(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    """(attention.py's store_unwritable.) Renewals failing for longer than a third of the TTL make
    /healthz answer 503 with the state, and /metrics, the page, systemd's STATUS and `status` (in
    another process: by the row standing still) say it too; a lock ending before 0.8 of the TTL
    keeps the lease, and the first renewal after it ends the state."""
    ttl = 30.0  # the state opens ~17 s after the last renewal: ~7 s to see it before the lock ends
    source.set(["u1"])
    port = free_port()
    # Refreshes a minute apart: the lock fails those due meanwhile, and with 2 s apart the audience
    # would soon be stalled (no successful cycle within twice the interval), failing /healthz too.
    schedule = SCHEDULE.replace('interval = "2s"', 'interval = "60s"')
    server = f'[server]\nlisten = "127.0.0.1:{port}"\n'
    config = daemon_config(make_config, gleap, store_url, ttl, extra=schedule + server)
    with InProcess(config) as daemon:
        wait_for(lambda: members_true(gleap) == {"u1"}, what="the first sync")
        wait_for(lambda: healthz(port)[0] == 200, what="/healthz to answer")
        lease, engine = daemon.core.lease, daemon.core.engine
        term = lease.holder
        last = next_renewal(engine, after=lease_row(engine).renewed_at)
        edge = last.renewed_at + timedelta(seconds=EDGE * ttl)  # the lock ends by then, at the latest
        answers: list[tuple[datetime, int, str]] = []

        def unwritable() -> bool:
            code, body = healthz(port)
            answers.append((store_mod.utc_now(), code, body))  # the time after the daemon judged
            return code == 503 and body.startswith("the store can't be written")

        def left() -> float:
            return float((edge - store_mod.utc_now()).total_seconds())

        with locked(store_url):
            wait_for(unwritable, timeout=left(), what="/healthz to say store_unwritable")
            failing = lease.failing
            assert failing is not None
            grace = ttl / 3
            early = [(at - failing.since, code, body) for at, code, body in answers if code != 200]
            assert all(waited.total_seconds() > grace for waited, _, _ in early), early
            first, *lines = answers[-1][2].splitlines()
            assert "renewals have been failing for" in first
            assert ("database is locked" if store_url.startswith("sqlite") else "lock timeout") in first
            (line,) = [x for x in lines if x.startswith("store unwritable: ")]
            assert "Fix: find what keeps the store from being written" in line and "pg_locks" in line
            assert 'audiencesync_condition{audience="",condition="store_unwritable"} 1.0' in metrics(port)
            assert "audiencesync_healthy 0.0" in metrics(port)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                assert 'data-state="store_unwritable" data-subject=""' in response.read().decode()
            # systemd's STATUS line (sent by the main loop when it changes; test_notify.py)
            assert daemon.core.service_status().startswith("active: the store can't be written: ")

            def status_says() -> bool:
                data = json.loads(cli(config, "status", "--format", "json").stdout)
                return bool(data["daemon"]["state"] == "store_unwritable")

            wait_for(status_says, timeout=left(), what="`status` in another process to say so")
        wait_for(lambda: healthz(port)[1].splitlines()[0] == "ok", timeout=ttl, what="/healthz ok again")
        assert 'condition="store_unwritable"} 0.0' in metrics(port)
        after = next_renewal(engine, after=last.renewed_at)
        assert after.renewed_at < last.expires_at  # renewed in time: the same term throughout
        assert lease.holder == term and not lease.lost.is_set(), lease.loss
        assert json.loads(cli(config, "status", "--format", "json").stdout)["daemon"]["state"] == "ok"
