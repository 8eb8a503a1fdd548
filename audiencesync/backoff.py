"""Bounded exponential backoff: for the daemon's loops (store errors, Gleap's circuit breaker),
and for each user whose delivery failed (``outcomes.Backoff``)."""

from __future__ import annotations


def doubling(initial: float, maximum: float, failures: int) -> float:
    """The wait after the ``failures``-th failure in a row (1 for the first): doubling, capped."""
    return float(min(maximum, initial * 2.0 ** min(max(failures - 1, 0), 60)))


class Backoff:
    """``initial`` seconds, doubling on each failure up to ``maximum``; ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return doubling(self.initial, self.maximum, self.failures)

    def reset(self) -> bool:
        """Back to ``initial``; True when there had been failures (a recovery worth logging)."""
        failed, self.failures = self.failures > 0, 0
        return failed
