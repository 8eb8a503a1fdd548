"""``GleapStandIn``: the stand-in as tests hold it, with its lifecycle (start, stop, an outage
that ends on the same port) and what it was told, for assertions. Imports the package's other
modules."""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
from types import TracebackType
from typing import Any

from tests.gleap_standin.routes import Routes
from tests.gleap_standin.server import Handler, Server
from tests.gleap_standin.wire import RecordedRequest


class GleapStandIn(Routes):
    """Gleap's ``/admin/auth``, ``/admin/identify``, ``/admin/track`` and ``DELETE
    /admin/contacts/<id>`` on 127.0.0.1, with fault injection (``FaultRules``, which gives the
    order the rules are taken in). ``latency_seconds`` postpones every identify's answer, as a
    distant Gleap would (the benchmark's "50 ms per answer"); ``keep_log=False`` keeps no
    request log and no bodies, for a run of hours.
    """

    def __init__(
        self,
        token: str = "test-token",
        *,
        rate_limit_per_minute: int | None = None,
        latency_seconds: float = 0.0,
        keep_log: bool = True,
    ) -> None:
        super().__init__(
            token,
            rate_limit_per_minute=rate_limit_per_minute,
            latency_seconds=latency_seconds,
            keep_log=keep_log,
        )
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> GleapStandIn:
        """Serve on 127.0.0.1; after a stop() it comes back on the same port (an outage that ends)."""
        if self._server is not None:
            raise RuntimeError("GleapStandIn is already running")
        server = Server(("127.0.0.1", self._port), Handler)
        server.standin = self
        self._port = server.server_address[1]
        self._stopping.clear()
        self._server = server
        # A short poll interval keeps stop() (and so every test using the fixture) quick.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="gleap-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        # Idle keep-alive connections would otherwise go on being answered by a "stopped" server.
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> GleapStandIn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("GleapStandIn is not running; call start() first")
        return f"http://127.0.0.1:{self._port}"

    # -- what it was told, for assertions ----------------------------------------------------------

    @property
    def token(self) -> str:
        with self._lock:
            return self._token

    @token.setter
    def token(self, token: str) -> None:
        self.set_token(token)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [self._requests[seq] for seq in sorted(self._requests)]

    @property
    def contacts(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._contacts)

    @property
    def identify_calls(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._identify_calls)

    @property
    def deleted_contacts(self) -> list[str]:
        with self._lock:
            return list(self._deleted_contacts)

    @property
    def track_calls(self) -> list[list[dict[str, Any]]]:
        """The events of each accepted (2xx) track call, in arrival order."""
        with self._lock:
            return copy.deepcopy(self._track_calls)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event accepted, in arrival order."""
        return [event for batch in self.track_calls for event in batch]

    @property
    def connections_opened(self) -> int:
        """The connections clients opened to the stand-in, all told (a pool that keeps its
        connections between calls opens each once)."""
        with self._lock:
            return self._connections_opened

    def answer_counts(self) -> dict[tuple[str, int], int]:
        """How many requests got each answer, by (route, status): route is ``identify``,
        ``track``, ``delete``, ``auth`` or ``other``; status 0 is a dropped or lost answer."""
        with self._lock:
            return dict(self._answer_counts)

    @property
    def last_ack_at(self) -> float | None:
        """When (``time.monotonic()``) an identify was last answered a 2xx; None before any."""
        with self._lock:
            return self._last_ack_at

    def reset_log(self) -> None:
        with self._lock:
            self._requests.clear()
            self._identify_calls.clear()
            self._deleted_contacts.clear()
            self._track_calls.clear()
            self._log_epoch = self._next_seq

    def arrivals(self, route: str) -> int:
        """How many requests to ``route`` (a path) have arrived, answered or not."""
        with self._lock:
            return self._arrivals[route]

    def wait_arrived(self, route: str, count: int, timeout: float = 30) -> bool:
        """Block until ``count`` requests to ``route`` have arrived in all (see arrivals())."""
        with self._arrived_changed:
            return self._arrived_changed.wait_for(lambda: self._arrivals[route] >= count, timeout)

    def set_token(self, token: str) -> None:
        with self._lock:
            self._token = token
