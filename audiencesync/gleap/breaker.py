"""The circuit breaker: stop a delivery pass when Gleap is down for everyone, resume when it is back.

Without it, an unreachable Gleap costs every pending user its full retry
budget, one after the other: hours of warnings with the lease held. Three states:

- closed: it counts failed requests (no answer, or a 5xx) across users; one
  success resets the count. It opens after ``threshold`` failures in a row that
  span at least two users, so a single poisoned user can't open it.
- open: every call stops retrying at once and the pass ends with everything
  still pending (the daemon waits, then probes).
- half-open: how the daemon's first pass after an outage starts. Up to
  ``trials.calls`` requests go out (the trials); every other request waits for
  the verdict, so a probe never floods a Gleap that is still down. As soon as
  the trials' outcome is certain, it closes (at most ``trials.failure_rate`` of
  them failed) or opens again. Closed, the normal rule applies at once for the
  rest of the same pass. A single user's failures (its retries) don't reopen it
  while other users were tried, for the same reason as when closed.

A pass that ends before its trials are all answered is judged on the answered
ones (``settle``). The breaker lives on one event loop (a delivery pass): no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
# The state gauge's values (metrics.py): 0 closed, 1 open, 2 half-open.
STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


@dataclass(frozen=True)
class Trials:
    """A half-open breaker's rule: ``calls`` trial requests, at most ``failure_rate`` of them failed
    to close ([gleap] breaker_trial_calls and breaker_trial_failure_rate)."""

    calls: int
    failure_rate: float

    def too_many(self, failures: int, out_of: int) -> bool:
        # Exact: 0.3 of 10 trials allows 3 failures, where float arithmetic could allow 2.
        return failures > Fraction(str(self.failure_rate)) * out_of


class CircuitBreaker:
    def __init__(
        self,
        threshold: int,
        *,
        min_users: int = 2,
        clock: Callable[[], float] = time.monotonic,
        trials: Trials | None = None,
        on_change: Callable[[CircuitBreaker], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.min_users = min(min_users, threshold)
        self.clock = clock
        self.trials = trials  # None: closed from the start (a pass not after an outage, `sync`)
        self.on_change = on_change  # told each change of state (the daemon's health and alerts)
        self.state = HALF_OPEN if trials is not None else CLOSED
        # Closed: the failures in a row and their users. Half-open: the trials' failures, their users.
        self.failures = 0
        self.users: set[str] = set()
        self.last_error: str | None = None
        self.opened_at: float | None = None
        # Half-open: requests let out as trials (each told once; one with no verdict gives its
        # place back), those answered well, and the users tried.
        self.admitted = 0
        self.successes = 0
        self.tried: set[str] = set()
        # The half-open breaker's verdict: (trials failed, trials answered) when it closed or reopened.
        self.verdict: tuple[int, int] | None = None
        self._opened = asyncio.Event()
        self._changed = asyncio.Event()

    @classmethod
    def probing(
        cls,
        threshold: int,
        trials: Trials,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitBreaker], None] | None = None,
    ) -> CircuitBreaker:
        """A half-open breaker, for the first pass after an outage: ``threshold`` rules once it closes."""
        return cls(threshold, clock=clock, trials=trials, on_change=on_change)

    @property
    def is_open(self) -> bool:
        return self.state == OPEN

    @property
    def answered(self) -> int:
        """Half-open: the trials answered so far (well or not)."""
        return self.successes + self.failures if self.state == HALF_OPEN else 0

    async def admit(self) -> bool:
        """Whether a request may go out: False once open. Half-open, it is one of the trials,
        or waits for their verdict once they are all out. Each request admitted is then told
        once: ``success``, ``failure`` or ``void``."""
        while self.state == HALF_OPEN and self.admitted >= self._trials().calls:
            await self._changed.wait()
        if self.state == OPEN:
            return False
        if self.state == HALF_OPEN:
            self.admitted += 1
        return True

    def failure(self, user_id: str, error: str) -> None:
        self.failures += 1
        self.users.add(user_id)
        self.last_error = error
        if self.state == HALF_OPEN:
            self.tried.add(user_id)
            self._judge()
        elif self.state == CLOSED and self.failures >= self.threshold and len(self.users) >= self.min_users:
            self._open()

    def success(self, user_id: str | None = None) -> None:
        if self.state == HALF_OPEN:
            self.successes += 1
            if user_id is not None:
                self.tried.add(user_id)
            self._judge()
        elif self.state == CLOSED:
            self.failures = 0
            self.users.clear()

    def void(self) -> None:
        """A request admitted went without a verdict on Gleap (a 429, a refused token, never
        sent): half-open, its trial goes to another request."""
        if self.state == HALF_OPEN:
            self.admitted -= 1
            self._wake()

    def settle(self) -> None:
        """The pass ends: a half-open breaker is judged on the trials answered, if any."""
        if self.state == HALF_OPEN and self.answered:
            self._verdict()

    async def sleep(self, seconds: float) -> None:
        """A retry's backoff sleep, cut short when the breaker opens."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._opened.wait(), seconds)

    def _judge(self) -> None:
        """Open or close as soon as the trials' outcome is certain, whatever the rest answer."""
        trials = self._trials()
        if self.answered >= trials.calls:
            self._verdict()
        elif trials.too_many(self.failures, trials.calls) and len(self.users) >= self.min_users:
            self._open()  # too many already, from two users
        elif not trials.too_many(trials.calls - self.successes, trials.calls):
            self._close()  # even if every other trial failed, it would close
        # else the trials still to be answered decide

    def _verdict(self) -> None:
        """On the trials answered: one user's failures reopen it only if no other user was tried."""
        enough_users = len(self.users) >= min(self.min_users, len(self.tried))
        if self._trials().too_many(self.failures, self.answered) and enough_users:
            self._open()
        else:
            self._close()

    def _open(self) -> None:
        # Reopened by its trials, or opened by failures in a row (after closing, the verdict is old).
        self.verdict = (self.failures, self.answered) if self.state == HALF_OPEN else None
        self.state = OPEN
        self.opened_at = self.clock()
        self._opened.set()
        self._notify()

    def _close(self) -> None:
        self.verdict = (self.failures, self.answered)
        # The trials' failures are no part of the next run of failures in a row.
        self.state = CLOSED
        self.failures = 0
        self.users.clear()
        self._notify()

    def _trials(self) -> Trials:
        assert self.trials is not None, "only a breaker made half-open has trials"
        return self.trials

    def _wake(self) -> None:
        """Wake the requests waiting for a trial or the verdict."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _notify(self) -> None:
        self._wake()
        if self.on_change is not None:
            self.on_change(self)
