"""A token bucket shared by every call to one Gleap project.

Hand-written rather than taken from aiolimiter because the rate must be able
to drop when Gleap answers 429 and climb back afterwards, which fixed-rate
limiters don't offer. The adjustment is additive-increase/multiplicative-
decrease, as in TCP: halve on a 429, win back 2% of the configured rate with
each success.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# How much later than its token a call may reach the server, relative to the others, without
# a sliding minute there holding more than the limit.
LATENESS_SECONDS = 1.0


class TokenBucket:
    def __init__(
        self,
        per_minute: int,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        # A small burst keeps a fresh start from spending a minute's budget at once,
        # which is what trips a server's own sliding window.
        self.capacity = float(burst if burst is not None else max(1, min(per_minute // 60, 10)))
        # Any 60 s window sees at most the burst plus a minute of refills: the refill rate
        # leaves room for the burst, so the window never holds more than ``per_minute``
        # (measured against a stand-in that counts a sliding minute: 1,200/min with the
        # burst on top drew a 429 about once a minute). The minute's refills are spread over
        # one more second: calls reach the server later than they take their token, and not
        # all equally late (the pool, the event loop, a busy machine), so the server's minute
        # can hold calls from a little more than a minute of the bucket's. With no such
        # room, 1,200/min on a loaded 2-core machine drew a 429 in the third minute; with it,
        # 97.9% of the limit and no 429 (bench/perf.py --rows e2 --full, both stores).
        self.max_rate = max(per_minute - self.capacity, per_minute / 2) / (60.0 + LATENESS_SECONDS)
        self.min_rate = self.max_rate / 16
        self.rate = self.max_rate
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def acquire(self) -> None:
        # The lock makes waiters queue in order instead of stampeding on refill.
        async with self._lock:
            self._refill()
            # Within a rounding error of a token is a token: the sleep that would make up
            # the last 1e-16 of one is below the clock's resolution, and would never end.
            while self._tokens < 1.0 - 1e-9:
                await self._sleep((1.0 - self._tokens) / self.rate)
                self._refill()
            self._tokens -= 1.0

    def pause(self, seconds: float) -> None:
        """Spend the bucket ahead, so nobody sends for ``seconds`` (a Retry-After)."""
        # Several tasks hit by the same 429 must not add their pauses up.
        self._refill()
        self._tokens = min(self._tokens, -seconds * self.rate)

    def slow_down(self, pause_seconds: float) -> None:
        """A 429: pause everyone, then go on at half the rate."""
        self._refill()
        self.rate = max(self.min_rate, self.rate / 2)
        self.pause(pause_seconds)

    def recover(self) -> None:
        """A success: climb back towards the configured rate."""
        if self.rate < self.max_rate:
            self._refill()
            self.rate = min(self.max_rate, self.rate + self.max_rate / 50)
