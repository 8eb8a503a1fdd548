"""The daemon's health: what /healthz answers, and what the lease's heartbeat tells other processes.

A mixin of ``scheduler.Daemon``, kept apart because it is a concept of its
own: it judges the whole daemon from the outside (its threads alive, Gleap's
circuit breaker, progress stalled, audiences late) and only reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from audiencesync import store as store_mod
from audiencesync.config import Config
from audiencesync.errors import brief, iso_time
from audiencesync.health import Outage, Progress


class DaemonHealth:
    # Provided by the daemon.
    config: Config
    store: store_mod.Store
    outage: Outage
    progress: Progress
    scheduler: BackgroundScheduler | None
    stop: threading.Event
    active: bool
    _delivery: threading.Thread | None
    _died: str | None
    _started: datetime
    _due: Callable[[], int]  # the delivery loop's: changes due now

    def health(self) -> tuple[bool, str]:
        if not self.active:
            return (True, "standby") if not self.stop.is_set() else (False, "stopping")
        if self._died is not None:
            return False, self._died
        if self.scheduler is None or not self.scheduler.running:
            return False, "the scheduler is not running"
        if self._delivery is None or not self._delivery.is_alive():
            return False, "the delivery loop is not running"
        if self.outage.open and self.outage.opened_at is not None:
            probe = self.outage.next_probe_at
            return False, (
                f"Gleap is unavailable; delivery paused (circuit breaker open since "
                f"{iso_time(self.outage.opened_at)}, next probe {iso_time(probe) if probe else 'soon'}): "
                f"{self.outage.reason}"
            )
        try:
            stalled = self.progress.stalled(self._due())
            rows = self.store.status()
        except Exception as exc:
            return False, f"the store can't be read: {brief(exc)}"
        if stalled is not None:
            return False, stalled
        now = store_mod.utc_now()
        # A paused property is never late: it is not meant to refresh (nor a removed one).
        intervals = {a.key: a.interval for a in self.config.active}
        late = []
        for row in rows:
            if row.key not in intervals:
                continue
            last = row.refreshed_at or self._started
            if now - max(last, self._started) > timedelta(seconds=2 * intervals[row.key]):
                late.append(f"{row.key} (last success {last:%Y-%m-%d %H:%M} UTC)")
        if late:
            return False, "no successful cycle within twice the interval: " + ", ".join(late)
        return True, "ok"

    def _lease_health(self) -> tuple[str, datetime | None]:
        """What the heartbeat writes into the lease row, for `status` in other processes."""
        ok, reason = self.health()
        return ("ok" if ok else f"unhealthy: {reason}"), self.progress.acked_at
