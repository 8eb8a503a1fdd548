"""systemd's notify protocol: READY, STATUS, WATCHDOG, RELOADING and STOPPING on a real AF_UNIX socket.

The watchdog pings come from the daemon's main loop, so a stalled loop or a dead
one must silence them: each test knows when the loop stopped (an event set on
the stalled thread, or the STATUS line sent by it) and only then listens for
pings that can no longer come.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from audiencesync.config.loading import Config
from audiencesync.daemon.notify import Notifier
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, Daemon, daemons, members_true, wait_for
from tests.test_daemon_hardening import InProcess

__all__ = ["daemons"]  # the fixture, re-used

WATCHDOG_USEC = 200_000  # pings every 0.1 s


class Listener:
    """The systemd side: a bound datagram socket, and the messages received on it, in order."""

    def __init__(self, address: str) -> None:
        self.name = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(message)
        return message

    def until(self, found: Callable[[dict[str, str]], bool], timeout: float = 30, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if message is not None and found(message):
                return
        raise AssertionError(f"no {what or 'such message'} in {self.received}")

    def drain(self) -> None:
        while self.next(0.001) is not None:
            pass

    def kinds(self) -> list[str]:
        """Each message's first key (READY, WATCHDOG...), repeated pings and status updates folded."""
        kinds: list[str] = []
        for message in self.received:
            kind = next(iter(message))
            if kind not in ("WATCHDOG", "STATUS") or not kinds or kinds[-1] != kind:
                kinds.append(kind)
        return kinds

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    # Abstract namespace: no path length limit (108 bytes) to trip over in a deep tmp_path.
    notify = Listener(f"@audiencesync-test-{uuid.uuid4().hex}")
    yield notify
    notify.close()


def notifier(listener: Listener, watchdog_usec: int = WATCHDOG_USEC) -> Notifier:
    return Notifier({"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": str(watchdog_usec)})


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    quiet = Notifier({})
    assert quiet.address is None and quiet.watchdog_interval is None
    quiet.ready("active")
    quiet.alive()
    quiet.stopping()


def test_the_watchdog_is_for_the_pid_systemd_named(listener: Listener) -> None:
    other = Notifier({"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    ours = notifier(listener, 1_000_000)
    assert ours.watchdog_interval == 0.5


def test_pings_are_spaced_at_half_the_watchdog_interval(listener: Listener) -> None:
    now = [100.0]
    pinger = Notifier({"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "2000000"}, clock=lambda: now[0])
    for step in (0.0, 0.5, 0.99, 1.0, 1.5, 2.0):
        now[0] = 100.0 + step
        pinger.alive()
    listener.drain()
    assert listener.received == [{"WATCHDOG": "1"}] * 3  # at 0, 1.0 and 2.0 s


def test_a_dead_socket_is_logged_once_and_the_daemon_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    gone.ready("active")
    gone.status("active: still")
    assert len([r for r in caplog.records if "can't notify systemd" in r.getMessage()]) == 1


def test_a_socket_nobody_reads_never_blocks_the_caller(
    listener: Listener, caplog: pytest.LogCaptureFixture
) -> None:
    # The systemd side stops reading: its queue fills up.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as filler:
        address = "\0" + listener.name[1:]
        with contextlib.suppress(BlockingIOError):
            for _ in range(100_000):
                filler.sendto(b"STATUS=filler", address)
    stuck = notifier(listener)
    sent = threading.Event()

    def send() -> None:
        stuck.ready("active")
        stuck.alive()
        stuck.status("active: still")
        sent.set()

    threading.Thread(target=send, daemon=True).start()
    assert sent.wait(timeout=30), "a full notify socket blocked the caller"
    assert len([r for r in caplog.records if "can't notify systemd" in r.getMessage()]) == 1


def test_the_daemon_notifies_ready_status_watchdog_reload_and_stop(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, listener: Listener
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE)
    with InProcess(config, notifier=notifier(listener)) as daemon:
        listener.until(lambda m: "READY" in m, what="READY=1")
        assert listener.received[0]["READY"] == "1"
        assert listener.received[0]["STATUS"].startswith("active")
        listener.until(lambda m: "WATCHDOG" in m, what="a watchdog ping")
        wait_for(lambda: members_true(gleap) == {"u1", "u2"}, what="the first sync")
        listener.until(lambda m: "next refresh segment_a at" in m.get("STATUS", ""), what="the next refresh")

        daemon.core._reload.set()  # what SIGHUP does
        listener.until(lambda m: "RELOADING" in m, what="RELOADING=1")
        assert int(listener.received[-1]["MONOTONIC_USEC"]) > 0
        listener.until(lambda m: "READY" in m, what="READY=1 after the reload")
        listener.until(lambda m: "WATCHDOG" in m, what="pings after the reload")
    listener.until(lambda m: "STOPPING" in m, what="STOPPING=1")
    assert [k for k in listener.kinds() if k not in ("WATCHDOG", "STATUS")] == [
        "READY", "RELOADING", "READY", "STOPPING",
    ]  # fmt: skip


def test_watchdog_pings_stop_while_the_main_loop_is_stalled(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, listener: Listener
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE)
    stalled, release = threading.Event(), threading.Event()
    with InProcess(config, notifier=notifier(listener)) as daemon:
        listener.until(lambda m: "WATCHDOG" in m, what="a watchdog ping")
        real_poll = daemon.core.admin.poll

        def stuck() -> None:  # the main loop hangs in a store read, as on a dead connection
            stalled.set()
            release.wait()
            real_poll()

        daemon.core.admin.poll = stuck  # type: ignore[method-assign]
        assert stalled.wait(30)
        listener.drain()  # sent before the stall: the loop is the only sender of pings
        silent_for = 20 * WATCHDOG_USEC / 2e6  # 20 missed pings
        assert listener.next(silent_for) is None, listener.received[-1]
        daemon.core.admin.poll = real_poll  # type: ignore[method-assign]
        release.set()
        listener.until(lambda m: "WATCHDOG" in m, what="pings once the loop goes round again")


def test_watchdog_pings_stop_when_a_loop_died(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, listener: Listener
) -> None:
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE)
    with InProcess(config, notifier=notifier(listener)) as daemon:
        listener.until(lambda m: "WATCHDOG" in m, what="a watchdog ping")
        daemon.core._died = "the delivery loop died: RuntimeError: boom"
        # Sent by the main loop once it saw the death: no ping can follow it.
        listener.until(
            lambda m: m.get("STATUS") == "unhealthy: the delivery loop died: RuntimeError: boom",
            what="the unhealthy status",
        )
        assert listener.next(20 * WATCHDOG_USEC / 2e6) is None, listener.received[-1]
        daemon.core._died = None  # let it stop cleanly


def test_a_standby_daemon_is_ready_and_says_who_holds_the_store(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, listener: Listener
) -> None:
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE)
    with InProcess(config) as first:
        wait_for(lambda: first.core.active, what="the first daemon to take the store")
        with InProcess(config, notifier=notifier(listener)):
            listener.until(lambda m: "READY" in m, what="READY=1")
            assert listener.received[-1]["STATUS"].startswith("standby: the store is held by")
            listener.until(lambda m: "WATCHDOG" in m, what="pings on standby")


def test_the_real_process_notifies_and_answers_sighup_and_sigterm(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE)
    # A socket file, as systemd makes one (/run/systemd/notify); short, for the 108-byte limit.
    with tempfile.TemporaryDirectory(prefix="as-notify-") as directory:
        listener = Listener(str(Path(directory) / "notify"))
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
            monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
            daemon = daemons(config)
            listener.until(lambda m: "READY" in m, what="READY=1")
            listener.until(lambda m: "WATCHDOG" in m, what="a watchdog ping")
            daemon.process.send_signal(signal.SIGHUP)
            listener.until(lambda m: "RELOADING" in m, what="RELOADING=1")
            listener.until(lambda m: "READY" in m, what="READY=1 after the reload")
            assert daemon.stop() == 0, daemon.output
            listener.until(lambda m: "STOPPING" in m, what="STOPPING=1")
            kinds = [k for k in listener.kinds() if k not in ("WATCHDOG", "STATUS")]
            assert kinds == ["READY", "RELOADING", "READY", "STOPPING"]
        finally:
            listener.close()
