"""The daemon under stress: store errors, failed refreshes, admin requests, Gleap down, signals, fencing.

(Issue #9, parts B and C12.) Daemons run in-process where a seam is needed
(backoffs, a failing drain) and as real processes where signals matter.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.daemon.scheduler import Daemon as DaemonCore
from audiencesync.errors import GleapUnavailableError, LeaseLostError
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease, instance_id
from audiencesync.store.schema import leases
from tests.conftest import SQLITE_ONLY, TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, Daemon, cli, daemons, free_port, members_true, wait_for
from tests.test_sync import cycle

__all__ = ["daemons"]  # the fixture, re-used

ENDLESS = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT i AS user_id FROM n WHERE i < 0"
)


class InProcess:
    """A Daemon running in a thread of the test, with quick backoffs."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        defaults: dict[str, Any] = {
            "backoff_initial": 0.01,
            "breaker_backoff": (0.2, 0.5),
            "error_backoff": (0.1, 0.5),
        }
        self.core = DaemonCore(config, **(defaults | kwargs))
        self.thread = threading.Thread(target=self._run, name="daemon-under-test", daemon=True)
        self.status: int | None = None

    def _run(self) -> None:
        self.status = self.core.run()

    def __enter__(self) -> InProcess:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.core.request_stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the daemon did not stop"


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:  # not serving yet
        return 0, str(error)


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def query(url: str, sql: str) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql)))
    finally:
        engine.dispose()


# --- 4. one failure never kills a loop ----------------------------------------------------


# BEGIN EXCLUSIVE is SQLite's lock.
@SQLITE_ONLY
def test_a_locked_store_does_not_kill_the_daemon(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    store_url: str,
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, token=None, sync=SYNC.replace("= 3", "= 6"), extra=SCHEDULE)
    config = with_store_setting(config, "busy_timeout_seconds = 0.2")
    locker = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # held from before the daemon starts
    daemon = daemons(config)
    wait_for(lambda: "database is locked" in daemon.output, what="the daemon to meet the lock")
    assert daemon.process.poll() is None, daemon.output
    locker.execute("COMMIT")
    wait_for(lambda: members_true(gleap) == {"u1", "u2"}, what="the first sync after the lock")

    # Locked again mid-flight, while the source changes: every loop meets it.
    mark = len(daemon.output)
    locker.execute("BEGIN EXCLUSIVE")
    source.set(["u2", "u3"])
    wait_for(lambda: "database is locked" in daemon.output[mark:], what="the loops to meet the lock")
    assert daemon.process.poll() is None, daemon.output
    locker.execute("COMMIT")
    locker.close()
    wait_for(lambda: members_true(gleap) == {"u2", "u3"}, timeout=60, what="convergence after the lock")
    assert daemon.stop() == 0
    # A locked store is foreseen: each loop says so in a line, with no traceback.
    assert "Traceback" not in daemon.output, daemon.output


def with_store_setting(config: Config, line: str) -> Config:
    from audiencesync.config.loading import load_config

    config.path.write_text(config.path.read_text().replace("[store]\n", f"[store]\n{line}\n", 1))
    return load_config(config.path)


# --- 5. pending work is delivered even when its refresh fails ----------------------------------


@pytest.mark.parametrize("refresh", ["failed", "held"])
def test_earlier_pending_changes_go_out_when_the_refresh_fails_or_is_held(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, refresh: str
) -> None:
    members = [f"u{i}" for i in range(10)]
    source.set(members)
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE)
    assert cycle(config).complete
    source.set([*members, "new"])
    gleap.set_token("rotated")  # the next cycle's delivery is refused: "new" stays pending
    assert cycle(config).aborted is not None
    gleap.set_token(TOKEN)
    if refresh == "failed":
        with sqlite3.connect(source.path) as conn:
            conn.execute("DROP TABLE members")
        conn.close()
    else:
        source.set(members[:3])  # would remove 8 of 11: held
    with InProcess(config):
        wait_for(lambda: "new" in members_true(gleap), timeout=20, what="the earlier pending change")
    assert set(members) <= members_true(gleap)  # the held removals were not applied


def test_a_requeued_change_goes_out_without_waiting_for_a_refresh(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    source.set(["u1", "bad"])
    hourly = '[schedule]\ninterval = "1h"\njitter = "0s"\n[sync]\nmax_attempts = 1\n'
    config = make_config(gleap.base_url, extra=hourly)
    gleap.fail_user("bad", 422, body="nope")
    with InProcess(config) as daemon:
        wait_for(lambda: members_true(gleap) == {"u1"}, what="the first sync")
        wait_for(lambda: len(daemon.core.store.parked()) == 1, what="the rejected change to be parked")
        # The initial run may still be in its last pass; a change re-queued then would go out in
        # that run, which is right but not what this test is about.
        wait_for(
            lambda: query(store_url, "SELECT count(*) FROM sync_runs WHERE finished_at IS NULL")[0][0] == 0,
            what="the initial run to finish",
        )
        gleap.clear_faults()
        engine = store_mod.create_engine(store_url)
        assert store_mod.Store(engine).requeue(user_id="bad") == 1  # as `audiencesync retry` does
        engine.dispose()
        wait_for(lambda: members_true(gleap) == {"u1", "bad"}, timeout=30, what="the re-queued change")
    modes = [r[0] for r in query(store_url, "SELECT mode FROM sync_runs ORDER BY id")]
    assert modes == ["initial", "delivery"]


# --- 6. admin actions while the daemon runs ---------------------------------------------------


def test_allow_removals_and_full_are_carried_out_by_the_running_daemon(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    members = [f"u{i}" for i in range(10)]
    source.set(members)
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE)
    daemon = daemons(config)
    wait_for(lambda: members_true(gleap) == set(members), what="the first sync")
    source.set(members[:3])
    wait_for(lambda: "held" in daemon.output, what="the guard to hold the audience")

    released = cli(config, "sync", "--audience", "segment_a", "--allow-removals", "--wait", "60")
    assert released.returncode == 0, released.stdout + released.stderr
    assert f"pid {daemon.process.pid}" in released.stdout and "asked it to" in released.stdout
    assert "segment_a: refreshed" in released.stdout and "left=7" in released.stdout
    wait_for(lambda: members_true(gleap) == set(members[:3]), what="the released removals")

    gleap.reset_log()
    full = cli(config, "sync", "--full", "--wait", "60")
    assert full.returncode == 0, full.stdout + full.stderr
    assert "(full)" in full.stdout
    wait_for(lambda: len(gleap.identify_calls) >= 3, what="the full resend")
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_an_admin_request_nobody_takes_is_withdrawn(make_config: ConfigFactory, store_url: str) -> None:
    config = make_config()
    engine = store_mod.create_engine(store_url)
    now = store_mod.utc_now()
    with engine.begin() as conn:  # a daemon that holds the lease but never polls (hung)
        conn.execute(
            sa.insert(leases).values(
                name="writer", holder="h", host="elsewhere", pid=1, acquired_at=now, renewed_at=now,
                expires_at=now + timedelta(hours=1), role="daemon",
            )
        )  # fmt: skip
    engine.dispose()
    asked = cli(config, "sync", "--audience", "segment_a", "--allow-removals", "--wait", "1")
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert "elsewhere (pid 1)" in asked.stdout and "withdrawn" in asked.stdout
    assert [tuple(r) for r in query(store_url, "SELECT kind, state FROM admin_requests")] == [
        ("release", "failed")
    ]
    plain = cli(config, "sync")  # a plain sync keeps today's behaviour
    assert plain.returncode == 4, plain.stderr


# --- 7 and 8. Gleap down, and health that tells the truth ---------------------------------------


def test_breaker_pauses_delivery_and_health_goes_503_and_back(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="audiencesync")
    port = free_port()
    source.set(["u1", "u2"])
    config = make_config(
        gleap.base_url, sync=SYNC, extra=SCHEDULE + f'[server]\nlisten = "127.0.0.1:{port}"\n'
    )
    down = threading.Event()
    down.set()
    with InProcess(config) as daemon:
        real_drain = daemon.core._drain

        def drain(runs: Any, halt: threading.Event, term: str) -> int:
            if down.is_set():
                raise GleapUnavailableError(base_url=gleap.base_url, failures=20, users=20, last_error="503")
            return real_drain(runs, halt, term)

        daemon.core._drain = drain  # type: ignore[method-assign]
        wait_for(lambda: "circuit breaker open" in healthz(port)[1], what="/healthz to report the breaker")
        assert healthz(port)[0] == 503
        assert "audiencesync_gleap_breaker_open 1.0" in metrics(port)
        assert 'audiencesync_oldest_pending_change_age_seconds{audience="segment_a"}' in metrics(port)
        assert 'audiencesync_unknown_outcome_changes{audience="segment_a"} 0.0' in metrics(port)
        assert members_true(gleap) == set()
        down.clear()
        wait_for(lambda: members_true(gleap) == {"u1", "u2"}, what="delivery after the recovery")
        wait_for(lambda: healthz(port) == (200, "ok\n"), what="/healthz back to ok")
        assert "audiencesync_gleap_breaker_open 0.0" in metrics(port)
    opened = [r for r in caplog.records if "Pausing delivery" in r.getMessage()]
    assert len(opened) == 1 and opened[0].levelname == "ERROR"
    assert any("Gleap answers again" in r.getMessage() for r in caplog.records)


def test_health_reports_a_stalled_delivery_and_status_shows_it(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    port = free_port()
    source.set(["u1", "u2"])
    server = f'[server]\nlisten = "127.0.0.1:{port}"\nstall_after = "1s"\n'
    config = make_config(gleap.base_url, sync=SYNC.replace("= 3", "= 1.5"), extra=SCHEDULE + server)
    gleap.fail_next(1_000_000, 503)
    with InProcess(config):
        wait_for(lambda: "delivery stalled" in healthz(port)[1], what="/healthz to report the stall")
        assert healthz(port)[0] == 503
        # `status` reads the health the daemon stored at its last heartbeat: poll, it lags /healthz.
        wait_for(
            lambda: "health: unhealthy (stalled): delivery stalled" in cli(config, "status").stdout,
            what="status to show the stall",
        )
        gleap.clear_faults()
        wait_for(lambda: healthz(port) == (200, "ok\n"), what="/healthz back to ok")
        wait_for(lambda: "health: ok" in cli(config, "status").stdout, what="status to show the recovery")
        listing = cli(config, "status", "--format", "json").stdout
        assert '"unknown": 0' in listing and '"oldest_pending_age_seconds": null' in listing


def test_a_loop_that_died_makes_health_say_so(make_config: ConfigFactory) -> None:
    core = DaemonCore(make_config())
    try:
        core.active = True
        core._died = "the delivery loop died: RuntimeError: boom"
        ok, body = core.health()
        assert not ok
        # The first line says why (the lease's heartbeat carries it); the concern follows, with its fix.
        first, *concerns = body.splitlines()
        assert first == "the delivery loop died: RuntimeError: boom"
        assert concerns == [
            "dead: the delivery loop died: RuntimeError: boom. Fix: restart the service (systemd's "
            "watchdog does after WatchdogSec); the log says why the loop ended"
        ]
    finally:
        core.engine.dispose()


# --- 9. signals are honoured promptly --------------------------------------------------------


def endless_audience() -> str:
    return f'\n[[audiences]]\nname = "Segment A"\nsource = "main"\nquery = "{ENDLESS}"\n'


def test_sigterm_during_a_slow_source_query_stops_the_daemon(
    make_config: ConfigFactory, gleap: GleapStandIn, daemons: Callable[[Config], Daemon], store_url: str
) -> None:
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE, audiences=endless_audience())
    daemon = daemons(config)
    wait_for(
        lambda: bool(query(store_url, "SELECT 1 FROM sync_runs WHERE status = 'running'")), what="the query"
    )
    started = time.monotonic()
    assert daemon.stop(timeout=20) == 0, daemon.output
    assert time.monotonic() - started < 10  # shutdown_grace_seconds = 5, and some slack
    assert [tuple(r) for r in query(store_url, "SELECT status FROM sync_runs")] == [("interrupted",)]
    assert query(store_url, "SELECT * FROM memberships") == []
    assert query(store_url, "SELECT * FROM leases") == []  # released: nothing was left running


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_sync_cancels_the_query_and_reports(
    make_config: ConfigFactory, gleap: GleapStandIn, store_url: str, sig: int, status: int
) -> None:
    config = make_config(gleap.base_url, token=None, audiences=endless_audience())
    process = subprocess.Popen(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), "sync"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"GLEAP_API_TOKEN": TOKEN},
    )
    try:
        wait_for(
            lambda: bool(query(store_url, "SELECT 1 FROM sync_runs WHERE status = 'running'")),
            what="the query",
        )
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == status, stdout + stderr
    assert f"stopped by {signal.Signals(sig).name}: 0 change(s) delivered, 0 still pending" in stderr
    assert query(store_url, "SELECT * FROM memberships") == []


# --- 12. a lease that fences ------------------------------------------------------------------


def test_a_takeover_waits_for_the_old_holders_write_to_commit(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    clock = [store_mod.utc_now()]
    old = WriterLease(engine, lambda: clock[0], ttl_seconds=10)
    old.acquire()
    paused, resume = threading.Event(), threading.Event()

    def fence_then_pause(conn: sa.Connection) -> None:
        old.check(conn)
        paused.set()  # inside the write, after the fence check: the holder stalls here
        resume.wait(30)

    writer = store_mod.Store(engine, fence=fence_then_pause)
    written = threading.Thread(target=writer.ensure_audience, args=("a", "A"))
    written.start()
    assert paused.wait(30)
    clock[0] += timedelta(seconds=11)  # the old holder's lease expires meanwhile
    new = WriterLease(engine, lambda: clock[0], ttl_seconds=10)
    taken: list[object] = []
    takeover = threading.Thread(target=lambda: taken.append(new.try_acquire()))
    takeover.start()
    takeover.join(timeout=1.0)
    assert taken == [], "the new holder took the lease while the old holder's write was open"
    resume.set()
    written.join(timeout=30)
    takeover.join(timeout=30)
    assert taken == [None]  # taken, once the old write committed
    with pytest.raises(LeaseLostError):
        store_mod.Store(engine, fence=old.check).ensure_audience("b", "B")
    engine.dispose()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("same_instance", [True, False])
def test_a_dead_pid_is_only_believed_in_the_same_pid_namespace(store_url: str, same_instance: bool) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    mine = WriterLease(engine, store_mod.utc_now, ttl_seconds=30)
    now = store_mod.utc_now()
    with engine.begin() as conn:  # a live lease of a process on a host with our name
        conn.execute(
            sa.insert(leases).values(
                name="writer", holder="twin", host=mine.host, pid=dead_pid(), acquired_at=now,
                renewed_at=now, expires_at=now + timedelta(minutes=5),
                instance=instance_id() if same_instance else "pidns:other boot:other",
            )
        )  # fmt: skip
    holder = mine.try_acquire()
    if same_instance:
        assert holder is None  # our kernel says that pid is gone: taken at once
    else:
        assert holder is not None and holder.holder == "twin"  # another container's pid: not ours to judge
    engine.dispose()


def test_the_daemon_and_sync_set_the_lease_role(make_config: ConfigFactory, tmp_path: Path) -> None:
    core = DaemonCore(make_config())
    try:
        assert core.lease.role == "daemon"
        assert core.lease.try_acquire() is None
        assert core.store.lease_holder()["role"] == "daemon"  # type: ignore[index]
    finally:
        core.engine.dispose()
