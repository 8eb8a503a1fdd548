"""`audiencesync run` as a real process: schedule, status, health, metrics, signals, standby, reload."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.store.schema import leases
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_sync import TWO_AUDIENCES

SCHEDULE = """
[schedule]
interval = "2s"
jitter = "1s"
shutdown_grace_seconds = 5
"""
SYNC = 'lease_seconds = 3\nretry_backoff = "0s"'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    def __init__(self, config: Config, log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if k != "AUDIENCESYNC_FAILPOINT"} | {
            "GLEAP_API_TOKEN": TOKEN
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "audiencesync", "--config", str(config.path), "run"],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            env=env,
        )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[[Config], Daemon]]:
    started: list[Daemon] = []

    def start(config: Config) -> Daemon:
        daemon = Daemon(config, tmp_path / f"daemon{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def members_true(gleap: GleapStandIn, key: str = "segment_a") -> set[str]:
    return {user for user, attributes in gleap.contacts.items() if attributes.get(key) is True}


def healthz(port: int) -> str:
    """The body of /healthz, whatever the status; empty while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as error:
        return str(error.read().decode())
    except OSError:
        return ""


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), *args],
        capture_output=True,
        text=True,
        timeout=120,  # a generous bound, not a race: a loaded machine is slow
        check=False,
        env=os.environ | {"GLEAP_API_TOKEN": TOKEN},
    )


def test_daemon_syncs_on_schedule_and_serves_status_health_and_metrics(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    port = free_port()
    first = [f"u{i:03d}" for i in range(200)]
    source.set(first)
    config = make_config(
        gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE + f'[server]\nlisten = "127.0.0.1:{port}"\n'
    )
    daemon = daemons(config)
    wait_for(lambda: members_true(gleap) == set(first), what="the first full sync")

    # Churn lands on the next scheduled cycle, 2-3 s later.
    second = [*first[20:], "new1", "new2"]
    source.set(second)
    wait_for(lambda: members_true(gleap) == set(second), timeout=15, what="the scheduled cycle")
    assert gleap.contacts["u000"]["segment_a"] is False

    # status works while the daemon runs. The last run is the one open now, or one
    # just closed: "partial" when the next scheduled refresh took over from it before
    # all of its calls were answered (the rest then go out in the newer run).
    status = cli(config, "status", "--format", "json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    [audience] = data["audiences"]
    assert audience["key"] == "segment_a" and audience["members"] == len(second)
    assert audience["next_run_at"] is not None
    assert audience["last_run"]["status"] in ("succeeded", "partial", "running")
    assert data["lease"]["pid"] == daemon.process.pid
    table = cli(config, "status")
    assert "segment_a" in table.stdout and f"pid {daemon.process.pid}" in table.stdout

    # Healthy once a cycle succeeded within twice the interval; on a loaded machine a
    # refresh can come late, so poll rather than read once.
    wait_for(lambda: healthz(port) == "ok\n", timeout=30, what="/healthz to answer ok")
    # Every cycle after the churn was delivered finds nothing left and succeeds.
    wait_for(
        lambda: 'audiencesync_cycles_total{audience="segment_a",result="succeeded"}' in metrics(port),
        what="a succeeded cycle in /metrics",
    )
    text = metrics(port)
    assert 'audiencesync_identify_calls_total{status="200"}' in text
    assert f'audiencesync_members{{audience="segment_a"}} {float(len(second))}' in text
    assert "audiencesync_cycle_duration_seconds_bucket" in text
    assert 'audiencesync_pending_changes{audience="segment_a"}' in text

    assert daemon.stop() == 0
    output = daemon.output
    # The summary line of the first cycle. It is "partial" when the next scheduled
    # refresh (2-3 s later) came before all 200 calls were answered.
    assert re.search(r"segment_a: (succeeded|partial) \(initial\) members=200 entered=200 ", output), output
    assert TOKEN not in output


def test_sigterm_mid_delivery_exits_0_and_leaves_a_consistent_store(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    store_url: str,
) -> None:
    members = [f"u{i:03d}" for i in range(400)]
    source.set(members)
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE)
    gleap.delay_next(10_000, 0.02)
    daemon = daemons(config)
    wait_for(lambda: len(gleap.identify_calls) >= 50, what="delivery to start")
    assert daemon.stop() == 0
    sent = len(gleap.identify_calls)
    assert sent < 400, "the stop came too late to be mid-delivery"

    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM leases")).scalar_one() == 0  # released
        statuses = {r[0] for r in conn.execute(sa.text("SELECT status FROM sync_runs"))}
        acked = conn.execute(sa.text("SELECT count(*) FROM memberships WHERE acked")).scalar_one()
    engine.dispose()
    assert "running" not in statuses
    assert acked == len(members_true(gleap))  # every answer received was recorded

    gleap.clear_faults()
    rerun = cli(config, "sync")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert members_true(gleap) == set(members)
    assert len(gleap.identify_calls) <= 400 + config.gleap.max_concurrency


def lease_row(store_url: str) -> sa.Row[Any]:
    """The store's lease as the daemons see it: who holds it, renewed when, until when."""
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(leases)).one()
    finally:
        engine.dispose()


def test_standby_takes_over_when_the_active_daemon_dies(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    store_url: str,
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE)
    active = daemons(config)
    wait_for(lambda: members_true(gleap) == {"u1", "u2"}, what="the first daemon's sync")
    standby = daemons(config)
    wait_for(lambda: "standby: the store is held by" in standby.output, what="the standby message")
    # Not a fixed sleep: wait until the lease the standby found has run out and the active
    # daemon has renewed it more than one of the standby's lease checks (ttl / 3) later. A
    # standby that took a lease renewed under it would have become active by then.
    seen = lease_row(store_url)
    check = timedelta(seconds=config.sync.lease_seconds / 3)
    wait_for(
        lambda: lease_row(store_url).renewed_at > seen.expires_at + check,
        timeout=20,
        what="the active daemon to renew the lease past the one the standby saw",
    )
    assert lease_row(store_url).pid == active.process.pid
    assert "active:" not in standby.output and standby.process.poll() is None

    active.process.kill()
    active.process.wait()
    wait_for(lambda: "active:" in standby.output, timeout=10, what="the takeover")
    source.set(["u1", "u2", "u3"])
    wait_for(lambda: members_true(gleap) == {"u1", "u2", "u3"}, timeout=15, what="the new daemon's cycle")
    assert standby.stop() == 0


def test_sighup_reload_adds_an_audience_and_refuses_a_broken_config(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    source.set(["u1"], "a")
    source.set(["u7", "u8"], "b")
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE)
    daemon = daemons(config)
    wait_for(lambda: members_true(gleap) == {"u1"}, what="the first sync")

    make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE, audiences=TWO_AUDIENCES)
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: members_true(gleap, "segment_b") == {"u7", "u8"}, timeout=15, what="the added audience")
    assert "reloaded" in daemon.output and "1 added" in daemon.output

    config.path.write_text(config.path.read_text() + "\n[[audiences]]\nname = 'Broken'\n")
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.output, timeout=10, what="the refusal")
    assert daemon.process.poll() is None  # still running the previous config
    source.set(["u1", "u2"], "a")
    wait_for(lambda: members_true(gleap) == {"u1", "u2"}, timeout=15, what="a cycle after the refusal")
    assert daemon.stop() == 0


def test_a_long_first_sync_does_not_hold_back_another_audiences_changes(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    big = [f"big{i:04d}" for i in range(1500)]
    source.set(big, "a")
    source.set(["s1", "s2"], "b")
    # 50 calls a second: the big audience's first sync takes about 30 s, so the small
    # audience's waits below have room on a loaded machine before it could end.
    config = make_config(
        gleap.base_url,
        token=None,
        sync=SYNC,
        extra=SCHEDULE,
        audiences=TWO_AUDIENCES,
        requests_per_minute=3000,
    )
    daemon = daemons(config)
    # Each refresh (every 2-3 s, each audience) ends the pass under way; the audiences take
    # turns from a different one each pass (delivery_loop._take_runs), so the small one's
    # changes go out at the start of one of the next passes, not after a page of the big
    # one that those refreshes kept cutting short (this timed out under load). The first
    # wait also covers the process's start, several seconds on a loaded 2-core machine.
    wait_for(lambda: members_true(gleap, "segment_b") == {"s1", "s2"}, timeout=60, what="the small audience")
    source.set(["s1", "s2", "s3"], "b")
    wait_for(lambda: "s3" in members_true(gleap, "segment_b"), timeout=30, what="the small audience's change")
    assert len(members_true(gleap, "segment_a")) < len(big)  # ...while the big first sync still runs
    wait_for(lambda: members_true(gleap, "segment_a") == set(big), timeout=120, what="the big first sync")
    assert daemon.stop() == 0


def test_a_second_signal_exits_at_once_and_the_store_stays_consistent(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
) -> None:
    members = [f"u{i:03d}" for i in range(300)]
    source.set(members)
    port = free_port()
    config = make_config(
        gleap.base_url,
        token=None,
        sync=SYNC,
        extra=SCHEDULE.replace("= 5", "= 60") + f'[server]\nlisten = "127.0.0.1:{port}"\n',
        timeout_seconds=120,
    )
    # Calls in flight are held unanswered, so a graceful stop keeps waiting for them
    # (up to the 60 s grace) for as long as the test needs. One is enough: a refresh (every
    # 2-3 s) can end the pass after fewer than max_concurrency calls went out, and that pass
    # then waits for those, so max_concurrency of them may never be held. 60 s: the process's
    # start (several seconds on a loaded 2-core machine) is part of it.
    gleap.hold()
    daemon = daemons(config)
    assert gleap.wait_held(1, timeout=60), "delivery never started"
    daemon.process.send_signal(signal.SIGTERM)
    # Two signals sent back to back can reach the process as one; the second must
    # come after the first was handled: the work is being shut down by then.
    wait_for(lambda: "scheduler is not running" in healthz(port), what="the graceful stop to begin")
    started = time.monotonic()
    # At once: well within the grace the graceful stop would give the held calls (60 s),
    # with room for a loaded machine to schedule the process.
    assert daemon.stop(signal.SIGTERM, timeout=30) == 1
    assert time.monotonic() - started < 30
    assert "second signal, exiting now" in daemon.output
    gleap.release()
    gleap.clear_faults()
    rerun = cli(config, "sync")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert members_true(gleap) == set(members)


def test_health_reports_standby_and_what_is_wrong(make_config: ConfigFactory) -> None:
    from audiencesync.daemon.scheduler import Daemon as DaemonCore

    core = DaemonCore(make_config())
    try:
        assert core.health() == (True, "standby")
        core.active = True
        ok, reason = core.health()
        assert not ok and "scheduler is not running" in reason
    finally:
        core.engine.dispose()


def test_standby_says_so_at_once_even_just_after_boot(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # time.monotonic() counts from about boot on Linux: a host up for under 5 minutes
    # must not keep a standby daemon silent.
    from audiencesync.daemon import scheduler
    from audiencesync.store import store as store_mod
    from audiencesync.store.lease import WriterLease

    core = scheduler.Daemon(make_config())
    real = time.monotonic
    booted = real() - 10.0
    monkeypatch.setattr("audiencesync.daemon.scheduler.time.monotonic", lambda: real() - booted)
    caplog.set_level(logging.INFO, logger="audiencesync.daemon.scheduler")
    try:
        store_mod.upgrade(core.engine)
        assert WriterLease(core.engine, store_mod.utc_now, ttl_seconds=600).try_acquire() is None
        result: list[bool] = []
        standby = threading.Thread(target=lambda: result.append(core._standby()))
        standby.start()
        try:
            wait_for(lambda: "standby: the store is held by" in caplog.text, what="the standby message")
        finally:
            core.stop.set()
            standby.join(timeout=30)
        assert result == [False]
    finally:
        core.engine.dispose()


def test_a_daemon_that_loses_its_lease_stops_writing_and_goes_back_to_standby(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    store_url: str,
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE)
    daemon = daemons(config)
    wait_for(lambda: members_true(gleap) == {"u1"}, what="the first sync")

    engine = sa.create_engine(store_url)
    steal = "UPDATE leases SET holder = 'thief', host = 'elsewhere', pid = 1, expires_at = :until"
    with engine.begin() as conn:  # another host takes the store over
        conn.execute(sa.text(steal), {"until": datetime.now(UTC) + timedelta(hours=1)})
    wait_for(lambda: "Going back to standby" in daemon.output, timeout=15, what="the lost lease")
    wait_for(
        lambda: "standby: the store is held by elsewhere pid 1" in daemon.output, timeout=10, what="standby"
    )
    # Stopped writing: a change in the source that an active daemon would store and send
    # within one scheduled cycle (interval + jitter) and one lease check is neither stored
    # nor sent, and the new holder's lease row stays as it wrote it. The store is read
    # throughout that window, not once after a sleep.
    before, sent = written(engine), len(gleap.requests)
    source.set(["u1", "u2"])
    window = time.monotonic() + 2 + 1 + config.sync.lease_seconds / 3
    while time.monotonic() < window:
        assert written(engine) == before and len(gleap.requests) == sent
        time.sleep(0.2)
    with engine.begin() as conn:  # ...and gives it back
        conn.execute(sa.text("DELETE FROM leases"))
    wait_for(lambda: daemon.output.count("active:") == 2, timeout=15, what="the daemon to take over again")
    wait_for(lambda: members_true(gleap) == {"u1", "u2"}, timeout=15, what="a cycle after the takeover")
    assert written(engine) != before  # the same reads see a writing daemon
    engine.dispose()
    assert daemon.stop() == 0


def written(engine: sa.Engine) -> tuple[Any, ...]:
    """What an active daemon writes: its runs, the memberships and their outcomes, the call
    log, the lease row."""
    with engine.connect() as conn:
        return tuple(
            conn.execute(sa.text(query)).all()
            for query in (
                "SELECT id, status, finished_at FROM sync_runs ORDER BY id",
                "SELECT audience_id, user_id, desired, acked, unknown, changed_at, acked_at "
                "FROM memberships ORDER BY audience_id, user_id",
                "SELECT count(*) FROM calls",
                "SELECT holder, pid, renewed_at, expires_at FROM leases",
            )
        )
