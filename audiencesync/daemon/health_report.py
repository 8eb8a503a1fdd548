"""What the daemon's /healthz says, and what its heartbeat writes into the lease row.

Healthy means work gets done: the loops are alive, Gleap's circuit breaker is
closed, delivery acknowledged something within ``stall_after`` whenever work was
due, and every audience refreshed within twice its interval.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from audiencesync.errors import iso_time

Clock = Callable[[], datetime]


class Outage:
    """The daemon's view of Gleap's circuit breaker.

    Open after a drain gave up on Gleap; probing (the breaker half-open) while the
    next pass's trial calls go out; closed as soon as their verdict is good, or by a
    pass with nothing to send.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.opened_at: datetime | None = None
        self.reason = ""
        self.next_probe_at: datetime | None = None
        self.probing = False

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def trip(self, reason: str, retry_in: float) -> bool:
        """Record a failed drain or probe; True when this opened the breaker (log it once)."""
        opened = self.opened_at is None
        if opened:
            self.opened_at = self.clock()
        self.reason = reason
        self.probing = False
        self.next_probe_at = self.clock() + timedelta(seconds=retry_in)
        return opened

    def probe(self) -> None:
        """A probe pass starts: the breaker is half-open until its trial calls' verdict."""
        self.probing, self.next_probe_at = True, None

    def close(self) -> bool:
        """True when it was open (log the recovery once)."""
        was_open, self.opened_at, self.next_probe_at = self.opened_at is not None, None, None
        self.probing = False
        return was_open


class Progress:
    """When delivery last moved: an acknowledged call, or a moment with nothing due.

    Delivery is stalled when work is due and neither happened for ``stall_after``.
    """

    def __init__(self, clock: Clock, stall_after_seconds: float) -> None:
        self.clock = clock
        self.stall_after = timedelta(seconds=stall_after_seconds)
        self._lock = threading.Lock()
        self.acked_at: datetime | None = None  # the last acknowledged call
        self._since = clock()

    def start(self) -> None:
        """A new active period: its stall clock starts now."""
        with self._lock:
            self._since = self.clock()

    def acknowledged(self) -> None:
        with self._lock:
            self.acked_at = self._since = self.clock()

    def nothing_due(self) -> None:
        with self._lock:
            self._since = self.clock()

    def stalled(self, due: int) -> str | None:
        if not due:
            return None
        with self._lock:
            since = self._since
        idle = self.clock() - since
        if idle <= self.stall_after:
            return None
        last = iso_time(self.acked_at) if self.acked_at else "never"
        return (
            f"delivery stalled: {due} change(s) due and no call acknowledged for "
            f"{int(idle.total_seconds())} s (stall_after = {int(self.stall_after.total_seconds())} s; "
            f"last acknowledged: {last})"
        )
