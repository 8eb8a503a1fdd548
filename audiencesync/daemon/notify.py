"""systemd's notify protocol (sd_notify), for `Type=notify` units: readiness, status, watchdog, stop.

Each message is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` means Linux's abstract namespace).
Without ``$NOTIFY_SOCKET`` (not under systemd, or another unit type) every
method does nothing. The protocol is small enough that a dependency (python-
systemd, sdnotify) would cost more than it saves.

The watchdog is not pinged from a timer: the daemon's main loop calls
``alive()`` each time round, so when that loop stalls the pings stop and
systemd restarts the service after ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"


class Notifier:
    def __init__(
        self, environ: Mapping[str, str] = os.environ, clock: Callable[[], float] = time.monotonic
    ) -> None:
        address = self.socket_name = environ.get(ENV_SOCKET) or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self.clock = clock
        # systemd expects a ping at least every WATCHDOG_USEC; its docs advise half of it.
        self.watchdog_interval: float | None = None
        usec, pid = environ.get(ENV_WATCHDOG_USEC, ""), environ.get(ENV_WATCHDOG_PID, "")
        if address is not None and usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())):
            self.watchdog_interval = int(usec) / 2_000_000
        self._pinged: float | None = None
        self._status: str | None = None
        self._ready = False
        self._warned = False

    def ready(self, status: str) -> None:
        """The daemon serves (active or standby): READY=1 once, and again after each reload."""
        if not self._ready:
            self._ready = True
            self._status = status
            self._send("READY=1", f"STATUS={status}")
        else:
            self.status(status)

    def status(self, status: str) -> None:
        """STATUS= for `systemctl status`; sent only when it changed."""
        if status != self._status:
            self._status = status
            self._send(f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) requires; older ones ignore it.
        self._ready = False
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")

    def stopping(self) -> None:
        self._status = "stopping"
        self._send("STOPPING=1", "STATUS=stopping: finishing the calls in flight")

    def alive(self) -> None:
        """The main loop went round: WATCHDOG=1, at most every half of WATCHDOG_USEC."""
        if self.watchdog_interval is None:
            return
        now = self.clock()
        if self._pinged is None or now - self._pinged >= self.watchdog_interval:
            self._pinged = now
            self._send("WATCHDOG=1")

    def _send(self, *fields: str) -> None:
        if self.address is None:
            return
        # A fresh socket per message, as sd_notify does: no state shared between the
        # main loop and a signal handler (STOPPING=1 is sent from one). Never blocking: a socket
        # whose queue nobody reads would otherwise stall the main loop on its next message, and
        # with it the heartbeat. Such a message is dropped (BlockingIOError), and said once.
        try:
            with socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            ) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: the socket won't come back, and the daemon works without it
                self._warned = True
                log.warning("can't notify systemd at %s: %s", self.socket_name, exc)
