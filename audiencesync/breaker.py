"""The circuit breaker: stop a delivery pass when Gleap is down for everyone.

Without it, an unreachable Gleap costs every pending user its full retry
budget, one after the other: hours of warnings with the lease held. The
breaker counts failed calls (no answer, or a 5xx) across users; one success
resets the count. It opens after ``threshold`` failures in a row that span at
least two users, so a single poisoned user can't open it. Once open, every
call stops retrying at once and the pass ends with everything still pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self, threshold: int, *, min_users: int = 2, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.min_users = min(min_users, threshold)
        self.clock = clock
        self.failures = 0
        self.users: set[str] = set()
        self.last_error: str | None = None
        self.opened_at: float | None = None
        self._opened = asyncio.Event()

    @classmethod
    def probing(cls, clock: Callable[[], float] = time.monotonic) -> CircuitBreaker:
        """A half-open breaker, for the first pass after an outage: one failure opens it again."""
        return cls(1, min_users=1, clock=clock)

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def failure(self, user_id: str, error: str) -> None:
        self.failures += 1
        self.users.add(user_id)
        self.last_error = error
        if not self.is_open and self.failures >= self.threshold and len(self.users) >= self.min_users:
            self.opened_at = self.clock()
            self._opened.set()

    def success(self) -> None:
        if not self.is_open:
            self.failures = 0
            self.users.clear()

    async def sleep(self, seconds: float) -> None:
        """A retry's backoff sleep, cut short when the breaker opens."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._opened.wait(), seconds)
