"""The daemon's HTTP endpoint on ``[server] listen``: bound while the daemon may serve there.

Two daemons on one host share one ``[server] listen``, and only one process can listen on
it. So the address goes with the store's lease:

- the active daemon listens on it. If it can't (the address is in use: a daemon on this host
  going back to standby has not let go yet, `audiencesync serve` without ``--listen``,
  another program), it logs the error once, works on without its pages, and tries again
  every third of ``lease_seconds`` until it can; it says so in its systemd status meanwhile;
- a standby behind a daemon on this same host leaves the address to it (and lets go of it
  when it goes back to standby): that daemon's /healthz, pages and /metrics are the store's;
- a standby behind a daemon on another host, or a ``sync`` run, listens when it can (its
  /healthz answers 200 ``standby``), as in a container of its own, and tries again at each of
  its lease checks when it can't, without an error: a standby needs no address.
"""

from __future__ import annotations

import logging
import time

from audiencesync.errors import ListenError
from audiencesync.store.lease import Holder
from audiencesync.web.app import WsgiApp
from audiencesync.web.server import Server, address

log = logging.getLogger(__name__)

FIX = (
    "stop what listens there, or set [server] listen to a free address and restart the daemon "
    "(it works on meanwhile, without its status page, /healthz and /metrics)"
)


class Listener:
    def __init__(self, host: str, port: int, app: WsgiApp, *, retry_seconds: float) -> None:
        self.host = host
        self.port = port
        self.address = address(host, port)
        self.app = app
        self.retry_seconds = retry_seconds
        self.server: Server | None = None
        self.problem: str | None = None  # why the active daemon isn't listening, while it isn't
        self._next = 0.0  # monotonic: no attempt before

    @property
    def listening(self) -> bool:
        return self.server is not None

    def open(self, *, active: bool) -> bool:
        """Listen, unless already listening or the last attempt was under ``retry_seconds`` ago.

        Only the active daemon logs a failure (once, until it listens): a standby needs no address."""
        if self.server is not None:
            return True
        now = time.monotonic()
        if now < self._next:
            return False
        try:
            server = Server(self.host, self.port, self.app, fix=FIX)
        except ListenError as exc:
            self._next = now + self.retry_seconds
            if active and self.problem is None:
                log.error(
                    "not serving the status pages, /healthz and /metrics: %s Trying again every %.0f s.",
                    exc,
                    self.retry_seconds,
                )
            self.problem = str(exc) if active else None
            return False
        server.start()
        self.server = server
        log.info(
            "serving the status pages, /healthz and /metrics on http://%s/%s",
            address(self.host, server.port),
            "" if self.problem is None else " (the address is free again)",
        )
        self.problem = None
        return True

    def beside(self, holder: Holder, this_host: str) -> None:
        """On standby behind ``holder``: leave the address to an active daemon on this host."""
        if holder.role == "daemon" and holder.host == this_host:
            self.close(f"the active daemon on this host (pid {holder.pid}) serves there")
        else:
            self.open(active=False)

    def close(self, why: str | None = None) -> None:
        """Stop listening (the next ``open`` tries at once)."""
        self._next = 0.0
        self.problem = None
        server, self.server = self.server, None
        if server is None:
            return
        server.stop()
        if why is not None:
            log.info("no longer listening on %s: %s", self.address, why)
