"""Cancelling a source query: at its timeout, or when audiencesync is stopping."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)


class TimedOut(Exception):
    """The query ran past its source's timeout_seconds."""


class Stopped(Exception):
    """The query was cancelled because audiencesync is stopping."""


class Watchdog:
    """Cancels the connection's running statement once the source's time is up."""

    def __init__(self, conn: Connection, seconds: float) -> None:
        self._driver = conn.connection.driver_connection
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self.fired = False
        self._done = threading.Event()

    def cancel_until_done(self) -> None:
        """Cancel now and again every 0.1 s until the read ends: a cancel that lands just
        before the statement starts is a no-op for the driver, and must not be lost."""

        def repeat() -> None:
            while not self._done.is_set():
                self.cancel()
                self._done.wait(0.1)

        threading.Thread(target=repeat, name="cancel-source-query", daemon=True).start()

    def _expire(self) -> None:
        self.fired = True
        self.cancel()

    def cancel(self) -> None:
        """Interrupt the connection's running statement, if any."""
        # sqlite3 has interrupt(); psycopg has cancel_safe() (3.2+) or cancel().
        for name in ("interrupt", "cancel_safe", "cancel"):
            method = getattr(self._driver, name, None)
            if callable(method):
                try:
                    method()
                except Exception as exc:  # the statement may have just finished
                    log.debug("cancelling the source query failed: %s", exc)
                return

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._timer.cancel()
