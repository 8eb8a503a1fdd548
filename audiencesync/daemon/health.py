"""The daemon's health: what /healthz answers, and what the lease's heartbeat tells other processes.

A mixin of ``scheduler.Daemon``, kept apart because it is a concept of its
own: it judges the whole daemon from the outside (its threads alive, Gleap's
circuit breaker, progress stalled, audiences late) and only reads.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from audiencesync.alerts import attention as attention_mod, store_unwritable
from audiencesync.config.loading import Config
from audiencesync.daemon.health_report import Outage, Progress
from audiencesync.daemon.listener import Listener
from audiencesync.daemon.notify import Notifier
from audiencesync.errors import brief, iso_time
from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease


class DaemonHealth:
    # Provided by the daemon.
    config: Config
    store: store_mod.Store
    lease: WriterLease
    outage: Outage
    progress: Progress
    scheduler: BackgroundScheduler | None
    stop: threading.Event
    active: bool
    _delivery: threading.Thread | None
    _died: str | None
    _started: datetime
    _due: Callable[[], int]  # the delivery loop's: changes due now
    notifier: Notifier
    standing: str  # what the daemon does while not active (standby, a retry)
    listener: Listener | None

    def dead(self) -> str | None:
        """Why a loop of the active daemon is gone, or None: what a restart would cure, so
        systemd's watchdog hears nothing while it is so (the breaker or a stall are Gleap's)."""
        if not self.active:
            return None
        if self._died is not None:
            return self._died
        if self.scheduler is None or not self.scheduler.running:
            return "the scheduler is not running"
        if self._delivery is None or not self._delivery.is_alive():
            return "the delivery loop is not running"
        return None

    def attention(self) -> attention_mod.Attention:
        """The daemon's and each property's state (attention.py), with what only this process
        knows: its loops, Gleap's circuit breaker, whether delivery stalled, whether the lease's
        renewals fail."""
        local = attention_mod.Local(
            active=self.active,
            stopping=self.stop.is_set(),
            dead=self.dead(),
            outage=self._outage_reason(),
            outage_since=self.outage.opened_at,
            stalled=self.progress.stalled(self._due()) if self.active else None,
            started_at=self._started,
            intervals={a.key: a.interval for a in self.config.active},
            # A copy: the heartbeat's thread updates its reason, and clears it with a renewal.
            unrenewed=copy.copy(self.lease.failing) if self.active else None,
            lease_seconds=self.lease.ttl.total_seconds(),
        )
        with self.store.engine.connect() as conn:
            return attention_mod.read(conn, lifecycle.states(self.config), store_mod.utc_now(), local)

    def _outage_reason(self) -> str | None:
        if not self.outage.open or self.outage.opened_at is None:
            return None
        if self.outage.probing:
            return (
                f"Gleap was unavailable; probing (circuit breaker half-open: delivery resumes if at "
                f"most {self.config.gleap.breaker_trial_failure_rate:.0%} of "
                f"{self.config.gleap.breaker_trial_calls} trial calls fail): {self.outage.reason}"
            )
        probe = self.outage.next_probe_at
        return (
            f"Gleap is unavailable; delivery paused (circuit breaker open, next probe "
            f"{iso_time(probe) if probe else 'soon'}): {self.outage.reason}"
        )

    def health(self) -> tuple[bool, str]:
        """/healthz: unhealthy for what concerns the whole daemon (attention.py); a property's own
        conditions (held, a failing source, parked) are listed, and leave it healthy."""
        if not self.active and self.stop.is_set():
            return False, "stopping"
        try:
            healthy, body = self.attention().health()
        except Exception as exc:
            dead = self.dead()
            return False, dead if dead is not None else f"the store can't be read: {brief(exc)}"
        if healthy and not self.active:
            # Standing by while another daemon holds the store is healthy; a lease this daemon
            # lost with no daemon holding the store since is not (attention.py).
            return True, "\n".join(["standby", *body.splitlines()[1:]])
        return healthy, body

    def beat(self) -> None:
        """The main loop went round: tell systemd (STATUS, WATCHDOG=1), unless a loop is gone."""
        if self.stop.is_set():
            return  # STOPPING=1 was sent: systemd's stop timeout rules now
        dead = self.dead()
        if dead is not None:
            # No ping: after WatchdogSec systemd restarts the service, which is the cure.
            self.notifier.status(f"unhealthy: {dead}")
            return
        self.notifier.status(self.service_status())
        self.notifier.alive()

    def service_status(self) -> str:
        """One line for `systemctl status`: active or standby, what comes next, and whether its
        [server] listen can't be served (listener.py)."""
        if not self.active:
            return self.standing
        line = self._active_status()
        if self.listener is not None and self.listener.problem is not None:
            line += f"; not serving on {self.listener.address} (in use or refused), trying again"
        return line

    def _active_status(self) -> str:
        # In attention's order (DAEMON_CONDITIONS): the store before Gleap. No store read here.
        lease = self.lease
        ttl, until = lease.ttl.total_seconds(), lease.valid_until
        unwritable = store_unwritable.of_daemon(copy.copy(lease.failing), ttl, until, store_mod.utc_now())
        if unwritable is not None:
            return f"active: {unwritable.reason}"
        if self.outage.open and self.outage.probing:
            return "active: Gleap was unavailable, probing with trial calls (circuit breaker half-open)"
        if self.outage.open:
            probe = iso_time(self.outage.next_probe_at) if self.outage.next_probe_at else "soon"
            return f"active: Gleap is unavailable, delivery paused; next probe {probe}"
        jobs = [job for job in self.scheduler.get_jobs() if job.next_run_time] if self.scheduler else []
        if not jobs:
            return "active"
        job = min(jobs, key=lambda job: job.next_run_time)
        return f"active: {len(jobs)} scheduled; next refresh {job.id} at {iso_time(job.next_run_time)}"

    def _lease_health(self) -> tuple[str, datetime | None]:
        """What the heartbeat writes into the lease row, for `status` in other processes."""
        # "unhealthy (STATE): REASON", which attention.py reads back in other processes. Never
        # "unhealthy (store_unwritable)": that state is renewals failing, and this is written by
        # a renewal; other processes see it by the row's renewed_at standing still instead.
        try:
            failing = self.attention().failing if self.active else None
        except Exception as exc:
            return f"unhealthy: the store can't be read: {brief(exc)}", self.progress.acked_at
        health = "ok" if failing is None else f"unhealthy ({failing.state}): {failing.reason}"
        return health, self.progress.acked_at
