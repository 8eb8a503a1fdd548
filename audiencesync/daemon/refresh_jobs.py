"""The daemon's refresh jobs: one APScheduler job per audience, and what one refresh does.

A mixin of ``scheduler.Daemon``, kept apart because it is a concept of its
own: when an audience is due, how its job is scheduled (and rescheduled on a
reload), and how a refresh hands its run to the delivery loop
(``delivery_loop``) without ever refreshing one audience twice at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from audiencesync.config.loading import AudienceConfig, Config
from audiencesync.daemon.metrics import Metrics
from audiencesync.errors import ConfigError, GleapError, LeaseLostError, brief, foreseen
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.sync.cycle import Run, Syncer

log = logging.getLogger(__name__)

# How a last run may have ended for the daemon to run the audience again as soon as it is active.
RERUN_AT_START = ("aborted", "failed", "interrupted")


class RefreshJobs:
    # Provided by the daemon.
    config: Config
    store: store_mod.Store
    syncer: Syncer
    lease: WriterLease
    metrics: Metrics
    scheduler: BackgroundScheduler | None
    halt: threading.Event
    wake: threading.Event
    _lock: threading.Lock
    _open: dict[int, Run]
    _busy: set[str]
    _ids: dict[str, int]
    _refreshing: int
    _take_over: Callable[[int], None]  # the delivery loop's: hands it the audience's open run to close
    blocked: GleapError | None  # the delivery loop's: why Gleap took no call in its last pass

    def _due_now(self, audience: AudienceConfig) -> bool:
        """Never synced, overdue, changes still pending, or its last run ended red: don't wait a
        whole interval.

        Red is aborted (a token Gleap refused, Gleap down), failed (its source) or interrupted
        (a process stopped mid-run): whatever made it so may be fixed by now, e.g. a manual
        `sync` with a wrong token, and the run would otherwise stay red for hours. Held is
        not: it waits for a person's release, and would only be held again.
        """
        try:
            self.syncer.rename(audience)  # before its row is read: it may still be under an old key
            existing = self.store.ensure_audience(
                audience.key, audience.name, kind=audience.kind, missing=audience.missing
            )
        except LeaseLostError:
            raise
        except Exception as exc:
            log.warning("can't read %s's state (%s); refreshing it now", audience.key, brief(exc))
            return True
        self._ids[audience.key] = existing.id
        if existing.refreshed_at is None or self.store.pending_count([existing.id]) > 0:
            return True
        if self.store.last_run_status(existing.id) in RERUN_AT_START:
            log.info("%s's last run ended red; refreshing it now", audience.key)
            return True
        return store_mod.utc_now() - existing.refreshed_at > timedelta(seconds=audience.interval)

    def _schedule(self, audience: AudienceConfig, *, start_now: bool) -> None:
        assert self.scheduler is not None
        trigger = IntervalTrigger(seconds=audience.interval, jitter=audience.jitter or None, timezone=UTC)
        self.scheduler.add_job(
            self._refresh_job,
            trigger,
            args=[audience.key],
            id=audience.key,
            name=f"refresh {audience.key}",
            replace_existing=True,
            **({"next_run_time": datetime.now(UTC)} if start_now else {}),
        )
        self._record_next_run(audience.key)

    def _record_next_run(self, key: str) -> None:
        job = self.scheduler.get_job(key) if self.scheduler is not None else None
        next_run = job.next_run_time if job is not None else None
        with contextlib.suppress(Exception):  # only shown by `status`; the next refresh writes it again
            self.store.set_next_run(key, next_run)

    def _refresh_job(self, key: str) -> None:
        try:
            self._refresh(key)
        except Exception as exc:
            log.error(
                "refreshing %s failed: %s; its next scheduled run tries again",
                key,
                brief(exc),
                exc_info=not foreseen(exc),
            )

    def _refresh(self, key: str, *, full: bool = False, allow_removals: bool = False) -> Run | None:
        """Refresh one audience's snapshot and hand its run to the delivery loop.

        None when it did not run: stopping, no longer configured, or already refreshing.
        """
        if self.halt.is_set():
            return None
        # A refresh is the active period's: still running after the next period began, it
        # fails the fence rather than write beside it.
        with self.lease.bound() as term:
            return self._refresh_bound(key, term, full=full, allow_removals=allow_removals)

    def _refresh_bound(self, key: str, term: str, *, full: bool, allow_removals: bool) -> Run | None:
        try:
            audience = self.config.audience(key)
        except ConfigError:
            return None  # removed by a reload a moment ago
        if not audience.enabled:
            return None  # paused by a reload a moment ago
        with self._lock:
            if key in self._busy:
                return None
            self._busy.add(key)
            self._refreshing += 1
        started = time.monotonic()
        try:
            self.syncer.rename(audience)  # before its row is read: it may still be under an old key
            existing = self.store.ensure_audience(
                audience.key, audience.name, kind=audience.kind, missing=audience.missing
            )
            self._ids[key] = existing.id
            self._take_over(existing.id)  # its run closes once its calls have Gleap's verdict
            run = self.syncer.refresh(audience, str(uuid.uuid4()), full=full, allow_removals=allow_removals)
            self.metrics.cycle_duration.labels(key).observe(time.monotonic() - started)
            if run.report.status == "failed" and self.syncer.sources.cancelled.is_set():
                # Stopped mid-query: nothing was applied; not a failure of the source.
                self.store.finish_run(
                    run.run_id, "interrupted", error="stopped while the source query ran; snapshot untouched"
                )
                return run
            # A failed or held refresh applied nothing, but what earlier cycles left
            # pending still goes out: the run stays open for the delivery loop.
            with self._lock:
                self._open[run.audience.id] = run
            self.wake.set()
            return run
        except LeaseLostError:
            if self.lease.current(term):  # else a later period runs: not this refresh's to end
                self.lease.lost.set()
                self.halt.set()
            return None
        finally:
            with self._lock:
                self._refreshing -= 1
                self._busy.discard(key)
            self._record_next_run(key)

    def _is_busy(self, key: str) -> bool:
        with self._lock:
            return key in self._busy

    def _submit(self, job: Callable[[], None], job_id: str) -> None:
        assert self.scheduler is not None
        self.scheduler.add_job(job, id=job_id, misfire_grace_time=None)

    def _close(self, run: Run) -> None:
        """Finish a run and log its one summary line. While Gleap refuses the calls (the token,
        or an outage), a run ends "aborted" with the reason, as a plain `sync`'s does."""
        self.syncer.finish(run, aborted=self.blocked)
        self.metrics.cycles.labels(run.report.key, run.report.status).inc()
        log.info("%s", run.report.summary())
