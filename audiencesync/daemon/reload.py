"""The daemon's config reload (SIGHUP): audiences added, removed, paused, resumed or
rescheduled without a restart, and the alerts' webhooks replaced.

A mixin of ``scheduler.Daemon``, kept apart because it is a concept of its own:
what may change while running (everything but ``[store] url``), and how the
schedule and a delivery pass under way follow the new config.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from apscheduler.jobstores.base import JobLookupError

from audiencesync.alerts.alerts import Alerts
from audiencesync.config.loading import Config, load_config
from audiencesync.daemon.notify import Notifier
from audiencesync.daemon.refresh_jobs import RefreshJobs
from audiencesync.errors import ConfigError
from audiencesync.sync.cycle import Syncer

log = logging.getLogger(__name__)


class ConfigReload(RefreshJobs):
    # Provided by the daemon.
    alerts: Alerts
    notifier: Notifier
    _reload: threading.Event
    _syncer: Callable[[Config], Syncer]
    service_status: Callable[[], str]

    def reload(self) -> None:
        """SIGHUP: re-read the config; add, remove and reschedule audiences without a restart."""
        self._reload.clear()
        self.notifier.reloading()
        try:
            self._reload_config()
        finally:
            self.notifier.ready(self.service_status())

    def _reload_config(self) -> None:
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, still running the previous config: %s", exc)
            return
        if new.store.url != self.config.store.url:
            log.error("reload refused: [store] url can't change while running; restart the daemon instead")
            return
        # Scheduled: the active properties. One paused (enabled = false) leaves the schedule as a
        # removed one does, and one resumed joins it as an added one does.
        old = {a.key: a for a in self.config.active}
        fresh = {a.key: a for a in new.active}
        listed = ({a.key for a in self.config.properties}, {a.key for a in new.properties})
        old_syncer = self.syncer
        self.config = new
        self.alerts.configure(new.alerts, Alerts.secrets_of(new))
        self.syncer = self._syncer(new)
        if self.scheduler is not None:
            for key in old.keys() - fresh.keys():
                with contextlib.suppress(JobLookupError):
                    self.scheduler.remove_job(key)
                self._ids.pop(key, None)
                with contextlib.suppress(Exception):  # only shown by `status`
                    self.store.set_next_run(key, None)
            for key, audience in fresh.items():
                before = old.get(key)
                if before is None and audience.previous_keys:
                    # A rename: its refresh job applies it, once the delivery pass under way has
                    # recorded its answers (pass_gate.py). Not here: this thread pings the watchdog.
                    self._schedule(audience, start_now=True)
                elif before is None:
                    self._schedule(audience, start_now=self._due_now(audience))
                elif (before.interval, before.jitter) != (audience.interval, audience.jitter):
                    self._schedule(audience, start_now=False)
        if old.keys() - fresh.keys():
            # A pass under way ends early: the next one leaves out what was paused or removed.
            self.wake.set()
        # Running refreshes may still use the old sources; their engines close when idle.
        old_syncer.sources.dispose()
        was, now = listed
        log.info(
            "reloaded %s: %d audience(s) (%d added, %d removed, %d paused, %d resumed)",
            Path(new.path),
            len(now),
            len(now - was),
            len(was - now),
            len((old.keys() - fresh.keys()) & now),
            len((fresh.keys() - old.keys()) & was),
        )
