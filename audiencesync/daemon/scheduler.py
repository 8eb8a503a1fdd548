"""The daemon: `audiencesync run`.

It wires the parts together:
- the writer lease, and a standby loop until this process holds it; while it does,
  the active period (``active_period.py``) runs the rest;
- one APScheduler job per audience, which only refreshes the snapshot (quick;
  ``refresh_jobs.py``);
- a single delivery thread, which drains every audience's pending changes in
  turns through the shared rate limiter (``delivery_loop.py``);
- a retention thread, which prunes old history once a day when
  ``[retention] keep`` is set (``retention.py``);
- signals: SIGTERM and SIGINT stop it gracefully, a second one exits at once,
  and SIGHUP reloads the config (``reload.py``);
- the optional HTTP endpoint: the status pages (``web/app.py``), /healthz (what it answers:
  ``health.py``) and /metrics, on [server] listen while it may serve there
  (``listener.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

import httpx
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import make_wsgi_app

from audiencesync.alerts.alerts import Alerts
from audiencesync.backoff import Backoff
from audiencesync.config.loading import Config
from audiencesync.daemon.active_period import STORE_CONNECTIONS, ActivePeriod
from audiencesync.daemon.admin import AdminDesk
from audiencesync.daemon.arenas import Trimmer
from audiencesync.daemon.delivery_loop import DeliveryLoop
from audiencesync.daemon.health import DaemonHealth
from audiencesync.daemon.health_report import Outage, Progress
from audiencesync.daemon.listener import Listener
from audiencesync.daemon.metrics import Metrics
from audiencesync.daemon.notify import Notifier
from audiencesync.daemon.reload import ConfigReload
from audiencesync.daemon.retention import Retention
from audiencesync.delivery.pass_gate import PassGate
from audiencesync.errors import (
    GleapError,
    LeaseLostError,
    brief,
    foreseen,
    iso_time,
)
from audiencesync.gleap.client import GleapClient
from audiencesync.lifecycle import states as lifecycle
from audiencesync.lifecycle.forget import Forgetter
from audiencesync.lifecycle.forget_requests import ForgetDesk, ForgetQueue
from audiencesync.lifecycle.prune import Pruner
from audiencesync.refresh.sources import Sources
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.store.requests import AdminRequests
from audiencesync.sync.cycle import Run, Syncer
from audiencesync.web.app import WebApp

log = logging.getLogger(__name__)


class Daemon(ConfigReload, DeliveryLoop, DaemonHealth, ActivePeriod):
    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_initial: float = 0.5,
        breaker_backoff: tuple[float, float] = (15.0, 30.0),
        error_backoff: tuple[float, float] = (1.0, 60.0),
        clock: store_mod.Clock = store_mod.utc_now,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier()  # systemd's, from the environment
        self.standing = "starting"
        self.transport = transport
        self.backoff_initial = backoff_initial
        # Gleap unavailable: probe again after 15 s, then every 30 s, so that delivery resumes
        # within a minute of Gleap answering again (a cap of 60 s took 51-54 s in the soaks).
        # A probe costs at most breaker_trial_calls requests (a pass with nothing due, none).
        self.breaker_backoff = breaker_backoff
        self.error_backoff = error_backoff  # a store error in a loop: retry after 1 s, doubling to 1 min
        self.engine = store_mod.engine_for(config.store, pool_size=STORE_CONNECTIONS)
        self.lease = WriterLease(
            self.engine, store_mod.utc_now, ttl_seconds=config.sync.lease_seconds, role="daemon"
        )
        self.lease.health = self._lease_health
        # The store's clock (a seam for tests): every time the store writes, and what retention
        # finds due. The lease keeps the real clock: its expiry is judged across processes.
        self.store = store_mod.Store(self.engine, clock=clock, fence=self.lease.check)
        self.admin = AdminDesk(
            AdminRequests(self.engine, store_mod.utc_now, fence=self.lease.check),
            refresh=self._refresh,
            busy=self._is_busy,
            submit=self._submit,
            pending_count=lambda audience_id: self.store.pending_count([audience_id]),
            lease_lost=lambda: self.halt.set(),
        )
        # `forget` while this daemon holds the store: carried out on the delivery thread, between passes.
        self.forgets = ForgetDesk(
            ForgetQueue(self.engine, store_mod.utc_now, fence=self.lease.check), self._forgetter
        )
        self.outage = Outage(store_mod.utc_now)
        stall_after = config.server.stall_after_seconds if config.server is not None else 900.0
        self.progress = Progress(store_mod.utc_now, stall_after)
        self._ids: dict[str, int] = {}  # audience key -> id, for the configured audiences seen
        self.alerts = Alerts.of(config, self.engine, clock=clock)
        self._busy: set[str] = set()  # audiences refreshing now
        self.syncer = self._syncer(config)
        self.stop = threading.Event()  # the process is to stop
        self.halt = threading.Event()  # the current active period is to end (stop, or the lease lost)
        self.wake = threading.Event()
        # A rename waits for the delivery pass under way (pass_gate.py); one per active period.
        self.gate = PassGate(self.wake)
        self._reload = threading.Event()
        self._signals = 0
        self._lock = threading.Lock()
        self._open: dict[int, Run] = {}  # audience id -> its run still delivering
        self._superseded: list[tuple[int, Run]] = []  # taken over by a refresh (delivery_loop._take_over)
        self._passes = 0  # delivery passes taken so far
        self._pass_runs: dict[int, Run] = {}  # the last pass's runs, in the order of their turns
        self._opened_by = 0  # the audience that went first in the last pass
        self._acked = False  # the pass under way had a call acknowledged
        self._refreshing = 0
        self._started = store_mod.utc_now()
        self.active = False
        self.scheduler: BackgroundScheduler | None = None
        self._delivery: threading.Thread | None = None
        pruner = Pruner(self.engine, clock)
        self.metrics = Metrics(
            self.store.status,
            prunes=lambda: (pruner.last(finished=True), pruner.exact_from()),
            states=lambda: lifecycle.states(self.config),
            attention=self.attention,
        )
        # Read at each look, so that a reload turns retention on, off or changes it.
        self.retention = Retention(pruner, lambda: self.config.retention.keep_seconds, self.metrics)
        self._retention: threading.Thread | None = None
        self.listener: Listener | None = None  # [server] listen, while it may serve there (listener.py)
        self._died: str | None = None  # why a loop thread ended, when it did
        self.trim = Trimmer()  # malloc's free pages back to the system, once a minute (arenas.py)
        self.blocked: GleapError | None = None  # the delivery loop's last pass: Gleap refused it

    def _forgetter(self) -> Forgetter:
        config, transport = self.config.gleap, self.transport
        token = config.api_token
        client = (
            (lambda: GleapClient(config, token, transport=transport, backoff_initial=self.backoff_initial))
            if token is not None
            else None
        )
        return Forgetter(self.engine, fence=self.lease.check, client=client)

    def _syncer(self, config: Config) -> Syncer:
        return Syncer(
            config, self.store, sources=Sources(config.sources), transport=self.transport,
            backoff_initial=self.backoff_initial, alerts=self.alerts,
            renaming=lambda: self.gate.exclusive(),  # the current active period's gate
        )  # fmt: skip

    # --- the process ----------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Every write is a transaction, so dying here leaves the store consistent;
            # unacknowledged changes stay pending.
            os.write(2, b"audiencesync: second signal, exiting now\n")
            os._exit(1)
        self.request_stop()

    def request_stop(self) -> None:
        """Stop gracefully, as on SIGTERM (thread-safe; tests call it directly)."""
        self.stop.set()
        self.halt.set()
        self.wake.set()
        self.notifier.stopping()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload.set()

    def run(self) -> int:
        """Serve until stopped. Returns the exit status."""
        store_mod.upgrade(self.engine)
        if self.config.server is not None:
            self.listener = Listener(
                self.config.server.host,
                self.config.server.port,
                self._web(),
                retry_seconds=self.lease.ttl.total_seconds() / 3,
            )
        errors = Backoff(*self.error_backoff)
        try:
            while not self.stop.is_set():
                if not self._standby():
                    break
                try:
                    self._serve()
                    errors.reset()
                except LeaseLostError as exc:
                    log.error("%s Going back to standby.", exc)
                    self.alerts.lease_lost(str(exc))
                except Exception as exc:
                    # The store failed while starting or running the active period
                    # (locked, connection lost): not a reason to exit. Stand by and retry.
                    delay = errors.next()
                    log.error(
                        "the active period ended on an error: %s. Retrying in %.0f s.",
                        brief(exc),
                        delay,
                        exc_info=errors.failures == 1 and not foreseen(exc),
                    )
                    self.standing = f"standby: the active period ended on an error; retrying in {delay:.0f} s"
                    self._pause(delay)
        finally:
            if self.listener is not None:
                self.listener.close()
            self.alerts.close()
            self.syncer.sources.dispose()
            self.engine.dispose()
        log.info("stopped")
        return 0

    def _web(self) -> WebApp:
        assert self.config.server is not None
        return WebApp(
            self.engine,
            token=self.config.server.auth_token,
            configured=lambda: lifecycle.states(self.config),  # a reload changes them
            health=self.health,
            attention=self.attention,
            clock=store_mod.utc_now,
            metrics=make_wsgi_app(self.metrics.registry),
            this_process=lambda: "active" if self.active else "standby",
        )

    def _standby(self) -> bool:
        """Wait until this process holds the lease; False if told to stop first."""
        self.standing = "standby: waiting for the store's lease"
        announced: float | None = None  # not 0.0: the monotonic clock may start near 0 at boot
        errors = Backoff(*self.error_backoff)
        while not self.stop.is_set():
            try:
                holder = self.lease.try_acquire()
            except Exception as exc:
                delay = errors.next()
                log.error(
                    "standby: can't reach the store's lease: %s. Retrying in %.0f s.", brief(exc), delay
                )
                self._pause(delay)
                continue
            if errors.reset():
                log.info("standby: the store answers again")
            if holder is None:
                log.info("active: holding the store's lease as %s", self.lease.holder)
                self.alerts.forget_cache()  # other processes may have opened or ended conditions
                self.alerts.lease_held(self.lease.took_over)
                return True
            self.standing = f"standby: the store is held by {holder.host} pid {holder.pid}"
            if self.listener is not None:
                self.listener.beside(holder, self.lease.host)
            self.notifier.ready(self.standing)
            if announced is None or time.monotonic() - announced > 300:
                log.info(
                    "standby: the store is held by %s pid %d (lease to %s); waiting to take over",
                    holder.host,
                    holder.pid,
                    iso_time(holder.expires_at),
                )
                announced = time.monotonic()
            self._pause(self.lease.ttl.total_seconds() / 3)
        return False

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self._reload.is_set():
                self.reload()
            self.beat()
            self.stop.wait(min(0.2, max(0.0, deadline - time.monotonic())))
