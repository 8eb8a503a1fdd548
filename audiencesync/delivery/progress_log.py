"""The progress line of a long delivery: sent, remaining, rate and ETA, at most every so often.

Reads only the store's pending count; the clock is a seam.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from audiencesync.store.store import Store

log = logging.getLogger(__name__)


class ProgressLog:
    """A log line at least every ``every`` seconds during a long delivery: sent, remaining, rate, ETA."""

    def __init__(
        self, store: Store, audience_ids: Sequence[int], clock: Callable[[], float], every: float
    ) -> None:
        self.store = store
        self.audience_ids = audience_ids
        self.clock = clock
        self.every = every
        self.started = self.last = clock()
        self.count = 0

    def sent(self, n: int) -> None:
        self.count += n
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        remaining = self.store.pending_count(self.audience_ids)
        rate = self.count / max(now - self.started, 1e-9)
        eta = remaining / rate if rate else float("inf")
        log.info(
            "delivering: %d sent, %d remaining, %.1f calls/s, ETA %s",
            self.count,
            remaining,
            rate,
            _duration(eta),
        )

    def done(self) -> None:
        if self.count and self.clock() - self.started >= self.every:
            log.info("delivery pass done: %d sent in %s", self.count, _duration(self.clock() - self.started))


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
