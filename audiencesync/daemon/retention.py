"""The daemon's retention: once a day, prune the history older than ``[retention] keep``.

It runs on a thread of its own, so a prune never holds delivery or a refresh
back by more than one batch's wait for the store (see ``prune``). Whether a
prune is due is read from the prunes table, not kept in memory: a restart
does not prune again within a day of the last prune that finished, whoever
ran it (this daemon, another, or `audiencesync prune`). A prune that failed or
was interrupted did not finish, so it does not count: the next look carries
it on. A failure is logged with its context, counted, and tried again after a
backoff; it never ends the daemon.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from audiencesync.backoff import Backoff
from audiencesync.daemon.metrics import Metrics
from audiencesync.errors import brief, foreseen, iso_time
from audiencesync.lifecycle.prune import Pruner

log = logging.getLogger(__name__)

# At most one prune that finished per this long.
EVERY = timedelta(hours=24)
# How often the thread looks whether a prune is due: one small read of the store.
CHECK_SECONDS = 600.0


class Retention:
    """Seams: the pruner (its clock decides what is due), how long to keep (read at each look,
    so a SIGHUP reload turns it on, off or changes it), how often to look, the backoff."""

    def __init__(
        self,
        pruner: Pruner,
        keep_seconds: Callable[[], float | None],
        metrics: Metrics,
        *,
        check_seconds: float = CHECK_SECONDS,
        error_backoff: tuple[float, float] = (60.0, 3600.0),
    ) -> None:
        self.pruner = pruner
        self.keep_seconds = keep_seconds
        self.metrics = metrics
        self.check_seconds = check_seconds
        self.error_backoff = error_backoff
        self.looks = 0  # how many times it looked (tests wait on it)

    def due(self) -> bool:
        """No prune finished within ``EVERY``, by whoever ran it."""
        last = self.pruner.last(finished=True)
        return last is None or self.pruner.clock() - last.started_at >= EVERY

    def run(self, halt: threading.Event) -> None:
        """Look every ``check_seconds`` and prune when due, until ``halt``; never raises."""
        errors = Backoff(*self.error_backoff)
        while not halt.is_set():
            delay = self.check_seconds
            before: datetime | None = None
            try:
                keep = self.keep_seconds()
                if keep is not None and self.due():
                    before = self.pruner.clock() - timedelta(seconds=keep)
                    result = self.pruner.prune(before, by="daemon", stop=halt)
                    for table, count in result.deleted.per_table():
                        self.metrics.pruned_rows.labels(table).inc(count)
                if errors.reset():
                    log.info("retention: pruning works again")
            except Exception as exc:
                delay = errors.next()
                self.metrics.prune_failures.inc()
                log.error(
                    "retention: %s failed: %s. Delivery goes on; retrying in %.0f s.",
                    f"pruning the history before {iso_time(before)}" if before else "reading the last prune",
                    brief(exc),
                    delay,
                    exc_info=errors.failures == 1 and not foreseen(exc),
                )
            self.looks += 1
            halt.wait(delay)
