"""Bounded exponential backoff for the daemon's loops (store errors, Gleap's circuit breaker)."""

from __future__ import annotations


class Backoff:
    """``initial`` seconds, doubling on each failure up to ``maximum``; ``reset()`` after a success."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * 2.0 ** min(self.failures, 60))
        self.failures += 1
        return float(delay)

    def reset(self) -> bool:
        """Back to ``initial``; True when there had been failures (a recovery worth logging)."""
        failed, self.failures = self.failures > 0, 0
        return failed
