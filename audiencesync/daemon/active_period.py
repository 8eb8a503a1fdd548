"""The daemon's active period: what it runs while it holds the store's writer lease.

A mixin of ``scheduler.Daemon``, kept apart because it is a concept of its own: once
the lease is taken (``scheduler.Daemon._standby``), the refresh jobs are scheduled,
the delivery and retention threads started, admin and forget requests polled and a
stalled delivery alerted, until the daemon stops or the lease is lost; then the work
is shut down within its grace and the open runs closed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from audiencesync.alerts.alerts import Alerts
from audiencesync.config.loading import AudienceConfig, Config
from audiencesync.daemon.admin import AdminDesk
from audiencesync.daemon.arenas import Trimmer
from audiencesync.daemon.health_report import Outage, Progress
from audiencesync.daemon.listener import Listener
from audiencesync.daemon.metrics import Metrics
from audiencesync.daemon.notify import Notifier
from audiencesync.daemon.retention import Retention
from audiencesync.delivery.pass_gate import PassGate
from audiencesync.errors import LeaseLostError, brief
from audiencesync.gleap.breaker import CLOSED
from audiencesync.lifecycle.forget_requests import ForgetDesk
from audiencesync.store.lease import WriterLease
from audiencesync.store.store import Store, fill_pool
from audiencesync.sync.cycle import Run, Syncer

log = logging.getLogger(__name__)

# How often the daemon looks for admin requests (sync --allow-removals / --full).
REQUEST_POLL_SECONDS = 2.0
# How often it looks whether delivery stalled, for the alerts.
STALL_POLL_SECONDS = 10.0
# Refreshes that run at once (each audience's one at a time; see max_instances below).
REFRESH_WORKERS = 4
# The store connections the daemon keeps (scheduler.Daemon): one for each thread that can wait
# on the store at the same time (a store lock holds them all at once): the main loop's heartbeat
# and requests, the delivery pass, retention, every refresh worker, and two web requests. More
# than that only opens overflow connections, for a burst of web requests.
STORE_CONNECTIONS = 3 + REFRESH_WORKERS + 2


class ActivePeriod:
    # Provided by the daemon and its other mixins.
    config: Config
    store: Store
    syncer: Syncer
    lease: WriterLease
    metrics: Metrics
    alerts: Alerts
    outage: Outage
    progress: Progress
    notifier: Notifier
    admin: AdminDesk
    forgets: ForgetDesk
    retention: Retention
    trim: Trimmer
    listener: Listener | None
    scheduler: BackgroundScheduler | None
    stop: threading.Event
    halt: threading.Event
    wake: threading.Event
    gate: PassGate
    active: bool
    _reload: threading.Event
    _lock: threading.Lock
    _open: dict[int, Run]
    _superseded: list[tuple[int, Run]]
    _refreshing: int
    _delivery: threading.Thread | None
    _retention: threading.Thread | None
    _schedule: Callable[..., None]  # (audience, *, start_now)
    _due_now: Callable[[AudienceConfig], bool]
    _deliver_forever: Callable[[], None]
    _due: Callable[[], int]
    _close: Callable[[Run], None]
    reload: Callable[[], None]
    beat: Callable[[], None]
    service_status: Callable[[], str]

    def _serve(self) -> None:
        # A new event, not the last one cleared: threads the last period left behind keep theirs, set.
        self.halt = threading.Event()
        if self.stop.is_set():
            self.halt.set()
        # Not the last period's: a delivery thread it left behind must not hold renames up.
        self.gate = PassGate(self.wake)
        self.syncer.sources.resume()
        self.outage.close()
        self.metrics.breaker(CLOSED)
        with self.lease.kept(release=lambda: self._refreshing == 0):
            self.active = True
            if self.listener is not None:
                self.listener.open(active=True)
            self.progress.start()
            # Now, not when a store lock makes every thread wait at once (database.fill_pool).
            opened = fill_pool(self.store.engine)
            log.debug("store connections open: %d", opened)
            interrupted = self.store.mark_interrupted()
            if interrupted:
                log.warning("%d run(s) of an earlier process were left open; marked interrupted", interrupted)
            self.scheduler = BackgroundScheduler(
                timezone=UTC,
                executors={"default": ThreadPoolExecutor(max_workers=REFRESH_WORKERS)},
                job_defaults={
                    "coalesce": True,  # missed runs collapse into one
                    "max_instances": 1,  # an audience never refreshes twice at once
                    "misfire_grace_time": int(self.config.schedule.misfire_grace_seconds),
                },
            )
            # Started first, so that each job gets its next run time as it is added.
            self.scheduler.start()
            for audience in self.config.active:  # a paused one is not scheduled
                self._schedule(audience, start_now=self._due_now(audience))
            self._delivery = threading.Thread(target=self._deliver_forever, name="delivery", daemon=True)
            self._delivery.start()
            # Only while active: a prune needs no lease (see prune.py), but a standby pruning
            # beside the active daemon would only do the same work twice.
            self._retention = threading.Thread(
                target=self.retention.run, args=(self.halt,), name="retention", daemon=True
            )
            self._retention.start()
            polled = looked = 0.0
            self.notifier.ready(self.service_status())
            try:
                while not self.halt.is_set() and not self.lease.lost.is_set():
                    if self.listener is not None:
                        self.listener.open(active=True)  # again, while the address was in use
                    self.beat()
                    if self._reload.is_set():
                        self.reload()
                    if time.monotonic() - polled >= REQUEST_POLL_SECONDS:
                        polled = time.monotonic()
                        self.admin.poll()
                        self._wake_for_forgets()
                    if time.monotonic() - looked >= STALL_POLL_SECONDS:
                        looked = time.monotonic()
                        self._alert_if_stalled()
                    self.trim()
                    self.halt.wait(0.2)
            finally:
                self._shutdown_work()
            if self.lease.lost.is_set():
                raise self.lease.loss or LeaseLostError()  # why: expired while locked, or taken over

    def _alert_if_stalled(self) -> None:
        """Delivery stalled (as /healthz judges it), or moves again. Not while Gleap's breaker is
        open: that has its own alert, and no call can be acknowledged meanwhile."""
        if not self.alerts.enabled or self.outage.open:
            return
        try:
            stalled = self.progress.stalled(self._due())
        except Exception as exc:
            log.warning("can't tell whether delivery stalled: %s", brief(exc))
            return
        self.alerts.stalled(stalled)

    def _wake_for_forgets(self) -> None:
        """A queued forget ends the delivery pass early: it is carried out between two passes."""
        try:
            if self.forgets.queue.waiting():
                self.wake.set()
        except Exception as exc:
            log.warning("can't read forget requests: %s", brief(exc))

    def _shutdown_work(self) -> None:
        """Stop starting work, give in-flight calls their grace, close the open runs."""
        self.halt.set()
        self.wake.set()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        # A slow source query would hold the stop for as long as it runs: cancel it.
        # Its refresh fails before applying anything, so the snapshot is untouched.
        self.syncer.sources.cancel()
        grace = self.config.schedule.shutdown_grace_seconds
        if self._delivery is not None:
            self._delivery.join(timeout=grace + 5)
        if self._retention is not None:
            self._retention.join(timeout=grace + 5)  # a prune stops after its current batch
        deadline = time.monotonic() + grace
        while self._refreshing and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._refreshing:
            log.warning("a source query is still running; leaving the lease to expire rather than release it")
        with self._lock:
            # The runs refreshes took over first: no verdict is coming for them any more.
            runs = [run for _, run in self._superseded] + list(self._open.values())
            self._superseded.clear()
            self._open.clear()
        for run in runs:
            try:
                self._close(run)
            except Exception as exc:  # the next process marks it interrupted
                log.warning("could not close the run of %s: %s", run.report.key, brief(exc))
        self.active = False
