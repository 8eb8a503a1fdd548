"""The daemon's delivery loop: one thread that drains every audience's due changes, for ever.

A mixin of ``scheduler.Daemon``, kept apart because it is a concept of its
own: it turns refreshed runs (and changes due without a refresh) into
delivery passes, closes runs once nothing is due, and survives everything but
a lost lease: store errors back off, a Gleap outage pauses and probes, a
refused token waits for a reload.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError

from audiencesync.alerts.alerts import Alerts
from audiencesync.backoff import Backoff
from audiencesync.config.loading import Config
from audiencesync.daemon.health_report import Outage, Progress
from audiencesync.daemon.metrics import Metrics
from audiencesync.delivery.pass_gate import PassGate
from audiencesync.errors import (
    AudienceSyncError,
    GleapAuthError,
    GleapError,
    GleapUnavailableError,
    LeaseLostError,
    brief,
    detached,
    foreseen,
)
from audiencesync.gleap.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Trials
from audiencesync.lifecycle.forget_requests import ForgetDesk
from audiencesync.store.lease import WriterLease
from audiencesync.store.lease_renewal import LeaseUnrenewedError
from audiencesync.store.store import Outcome, Store
from audiencesync.sync.cycle import Run, Syncer

log = logging.getLogger(__name__)

# How long the delivery thread sleeps when nothing is pending, unless a refresh wakes it.
# It then looks for changes due without a refresh (re-queued, backoff elapsed).
IDLE_SECONDS = 5.0
# After Gleap refused the token, wait this long before trying again (a rotated token
# can be fixed with a SIGHUP reload meanwhile).
AUTH_BACKOFF_SECONDS = 300.0
# While the lease waits for a locked store to let it be renewed, look again this often.
UNRENEWED_WAIT_SECONDS = 1.0


class DeliveryLoop:
    # Provided by the daemon.
    config: Config
    store: Store
    syncer: Syncer
    lease: WriterLease
    metrics: Metrics
    alerts: Alerts
    outage: Outage
    progress: Progress
    halt: threading.Event
    wake: threading.Event
    error_backoff: tuple[float, float]
    breaker_backoff: tuple[float, float]
    _lock: threading.Lock
    _open: dict[int, Run]
    _busy: set[str]
    _ids: dict[str, int]
    _died: str | None
    _close: Callable[[Run], None]
    # Why Gleap took no call in the last pass (the token refused, or Gleap down), or None: a
    # run closed meanwhile ended "aborted" with it, as a plain `sync` records it.
    blocked: GleapError | None
    # Runs a refresh took over from (``_take_over``), each with the number of the pass whose
    # verdict it waits for; and the passes taken so far, the last one's runs.
    _superseded: list[tuple[int, Run]]
    _passes: int
    _pass_runs: dict[int, Run]
    _opened_by: int  # the audience whose turn came first in the last pass
    # Gleap acknowledged a call of the pass under way (a 2xx): it takes the token.
    _acked: bool
    forgets: ForgetDesk
    gate: PassGate

    def _deliver_forever(self) -> None:
        # This thread works for the active period (the lease's term) that started it, and ends
        # with it: left over (stuck in a store write past the shutdown's grace), it can neither
        # write beside the next period's delivery thread nor send its calls (lease.bind).
        term = self.lease.bind()
        try:
            self._delivery_loop(self.halt, term)
        except BaseException as exc:
            # Nothing should get here; if it does, /healthz must say so.
            self._died = f"the delivery loop died: {brief(exc)}"
            log.exception("the delivery loop died")
            raise

    def _delivery_loop(self, halt: threading.Event, term: str) -> None:
        errors = Backoff(*self.error_backoff)
        probes = Backoff(*self.breaker_backoff)
        # Whether ``blocked`` says how Gleap takes the calls: not before a pass of this period
        # got Gleap's verdict (a call acknowledged, the token refused, Gleap down). Until then a
        # run taken over is closed only when nothing is owed: else its status would be a guess.
        known = False
        while not halt.is_set() and not self.lease.lost.is_set() and self.lease.current(term):
            self.wake.clear()
            calls = 0
            self._acked = False
            # A failed pass's wait runs after its except block: inside it, the error being
            # handled keeps every frame of the pass alive (its pages, calls and connections),
            # through a wait of up to minutes while an outage lasts (docs/performance.md).
            pause: Callable[[], object] | None = None
            try:
                # No rename runs meanwhile (pass_gate.py): every answer of the pass is recorded
                # under the key its call carried, before any row can change its key.
                with self.gate.passing():
                    # Between passes: no call is in flight, so no answer can bring a forgotten user back.
                    self.forgets.carry_out_waiting()
                    self._close_inactive()
                    self._open_delivery_runs()
                    runs = self._take_runs()
                    if runs:
                        calls = self._drain(runs, halt, term)
                        self._close_drained(runs)
                if not calls and not self._due():
                    self.progress.nothing_due()
            except GleapUnavailableError as exc:
                delay = probes.next()
                if self.outage.trip(str(exc), delay):
                    log.error("%s Pausing delivery; probing again in %g s.", exc, delay)
                else:
                    log.info("Gleap is still unavailable (%s); next probe in %g s", exc.last_error, delay)
                self.metrics.breaker(OPEN)
                self.blocked, known = detached(exc), True
                self._close_superseded()
                self.alerts.gleap(str(exc))
                pause = functools.partial(halt.wait, delay)
            except GleapAuthError as exc:
                log.error("%s Retrying in %d s.", exc, AUTH_BACKOFF_SECONDS)
                self.blocked, known = detached(exc), True
                self._close_superseded()
                self.alerts.refused(str(exc))
                self.wake.clear()
                pause = functools.partial(self.wake.wait, AUTH_BACKOFF_SECONDS)
            except LeaseLostError:
                if self.lease.current(term):  # else a later period runs: not this thread's to end
                    self.lease.lost.set()
                    halt.set()
                return
            except LeaseUnrenewedError as exc:
                # The store is locked and the heartbeat is still trying: calls pause until it
                # renews (its retries come every twentieth of the TTL), the lease is not lost.
                log.warning("delivery paused: %s", exc)
                pause = functools.partial(halt.wait, UNRENEWED_WAIT_SECONDS)
            except Exception as exc:
                delay = errors.next()
                log.error(
                    "delivery failed: %s. Everything unacknowledged stays pending; retrying in %.0f s.",
                    brief(exc),
                    delay,
                    exc_info=errors.failures == 1 and not foreseen(exc),
                )
                pause = functools.partial(halt.wait, delay)
            if pause is not None:
                pause()
                continue
            if calls and self.outage.probing:
                # The pass ended (new work, a stop) before any trial call was answered: no
                # verdict yet, so the next pass probes again, at once.
                continue
            known = known or self._acked
            if self.blocked is not None and (self._acked or not self._owed()):
                # Gleap acknowledged a call of this pass, or nothing is owed that it could refuse.
                # A pass that made no call (what is owed waits out a backoff, or new work ended it
                # first), or whose calls got no verdict (timeouts, 5xx below the breaker's
                # threshold), says nothing of the token.
                self.blocked = None
            if errors.reset():
                log.info("delivery: the store answers again")
            probes.reset()
            if self.outage.close():  # a probe pass with nothing to send
                self.blocked = None
                log.info("Gleap answers again; delivery resumed")
                self.metrics.breaker(CLOSED)
            if known or (self._superseded and not self._owed()):
                self._close_superseded()  # the verdict is in ``blocked``, or nothing is left to judge
            if calls:
                self.alerts.gleap(None)  # calls went through: ends an outage, even a previous process's
            if not calls:
                self.wake.wait(IDLE_SECONDS)

    def _due(self) -> int:
        return self.store.due_count(list(self._ids.values())) if self._ids else 0

    def _owed(self) -> int:
        return self.store.pending_count(list(self._ids.values())) if self._ids else 0

    def _take_runs(self) -> dict[int, Run]:
        """The open runs, for the pass about to start (its number goes with them), in the order
        their audiences take turns: by audience id, from the one after the audience that went
        first in the last pass.

        A refresh ends the pass under way (new work), and the next pass starts the turns again.
        Started from the same audience every time, the ones behind a long first sync got theirs
        only when a whole page of it went out between two refreshes: with refreshes a second
        apart (test_daemon, under load), never. Now each open audience goes first in one of any
        few passes in a row, and its changes then go out first.
        """
        with self._lock:
            self._passes += 1
            ids = sorted(self._open)
            if ids:
                first = next((i for i, audience_id in enumerate(ids) if audience_id > self._opened_by), 0)
                ids = ids[first:] + ids[:first]
                self._opened_by = ids[0]
            self._pass_runs = {audience_id: self._open[audience_id] for audience_id in ids}
            return self._pass_runs

    def _take_over(self, audience_id: int) -> None:
        """A refresh takes the audience over from its open run, if any (on the refresh's thread).

        The run is not closed here: its calls may still be out, and its status (``aborted``
        while Gleap refuses them) depends on their verdict. It closes after the pass that
        took it; or, if no pass took it, after the next one, which carries what it left
        pending under its successor; and not before the daemon knows how Gleap takes its
        calls (``known`` in the loop). Closed here, the first run of a daemon whose token
        Gleap refuses ended ``partial`` whenever the refresh came before the first 401.
        """
        with self._lock:
            run = self._open.pop(audience_id, None)
            if run is not None:
                taken = any(r is run for r in self._pass_runs.values())
                self._superseded.append((self._passes if taken else self._passes + 1, run))

    def _close_superseded(self) -> None:
        """Close the runs taken over whose pass has ended: its verdict is in ``blocked`` now.
        Not after a pass that ended without one (a store error, a probe cut short)."""
        with self._lock:
            due = [run for n, run in self._superseded if n <= self._passes]
            self._superseded = [(n, run) for n, run in self._superseded if n > self._passes]
        for i, run in enumerate(due):
            try:
                self._close(run)
            except Exception as exc:
                # The store failed: the rest close after a later pass (or at the stop).
                log.warning("could not close the run of %s: %s", run.report.key, brief(exc))
                with self._lock:
                    self._superseded[:0] = [(0, r) for r in due[i:]]
                return

    def _close_inactive(self) -> None:
        """Close the runs of properties paused or removed by a reload: their rows must not go out
        in the next pass, not even in another property's call (a pass carries only the rows of
        the ids it is given). Between passes, so no answer is recorded into a closed run."""
        active = {a.key for a in self.config.active}
        with self._lock:
            stale = [(i, run) for i, run in self._open.items() if run.audience.key not in active]
            for audience_id, _ in stale:
                del self._open[audience_id]
        for _, run in stale:
            self._close(run)

    def _open_delivery_runs(self) -> None:
        """Open a 'delivery' run for each audience with changes due but no open run and no refresh
        going: re-queued changes and elapsed backoffs go out now, not at the next refresh."""
        for audience in self.config.active:
            audience_id = self._ids.get(audience.key)
            if audience_id is None:
                continue
            with self._lock:
                if audience_id in self._open or audience.key in self._busy:
                    continue
            if not self.store.due_count([audience_id]):
                continue
            run = self.syncer.delivery_run(audience, str(uuid.uuid4()))
            with self._lock:
                if audience_id in self._open or audience.key in self._busy:
                    late = run  # a refresh started meanwhile: it delivers them
                else:
                    self._open[audience_id] = run
                    continue
            self._close(late)

    def _drain(self, runs: dict[int, Run], halt: threading.Event, term: str) -> int:
        deliverer = self.syncer.deliverer()
        # No request goes out unless the lease is surely still held: a daemon that stalled past
        # its expiry must not call Gleap beside its successor (its answers already can't be
        # recorded: the fence). The margin leaves a request time to reach Gleap before expiry.
        deliverer.before_send = functools.partial(self.lease.require, term)
        deliverer.observe = self._observe
        deliverer.events.on_acknowledged = self._acknowledged
        deliverer.events.on_answer = self.metrics.track
        if self.outage.open:
            # The first pass after an outage is the probe: a few trial calls decide (breaker.py).
            gleap = self.config.gleap
            deliverer.breaker = CircuitBreaker.probing(
                gleap.breaker_failures,
                Trials(gleap.breaker_trial_calls, gleap.breaker_trial_failure_rate),
                on_change=self._breaker_changed,
            )
            self.outage.probe()
            self.metrics.breaker(HALF_OPEN)
        keys = {audience_id: run.audience.key for audience_id, run in runs.items()}
        # A renamed property's old keys go out with it, logged under its run.
        owners = {r.id: audience_id for audience_id, run in runs.items() for r in run.retired}
        keys |= {r.id: r.key for run in runs.values() for r in run.retired}

        def run_id(audience_id: int) -> int:
            owner = owners.get(audience_id, audience_id)
            with self._lock:
                run = self._open.get(owner) or runs[owner]
            return run.run_id

        try:
            return asyncio.run(
                deliverer.drain(
                    [*runs, *owners],
                    keys,
                    run_id,
                    stop=halt,
                    grace_seconds=self.config.schedule.shutdown_grace_seconds,
                    new_work=self.wake,
                )
            )
        finally:
            # The field conflicts of the pass's acknowledged calls, into the runs their (losing)
            # audiences' answers were recorded under.
            try:
                self.store.add_field_conflicts(deliverer.run_conflicts)
            except (AudienceSyncError, SQLAlchemyError) as exc:
                # Only a count: the pass's own outcome (or error) is what matters.
                log.warning("could not count the field conflicts of a delivery pass: %s", exc)

    def _breaker_changed(self, breaker: CircuitBreaker) -> None:
        """A probe pass's breaker closed (its trial calls went well enough): delivery resumes in
        this same pass, so /healthz, `status`, the page, /metrics and the alert say so now, not
        when the pass ends. Reopened, the pass ends and the loop records it (GleapUnavailableError)."""
        if breaker.state != CLOSED or not self.outage.close():
            return
        failed, answered = breaker.verdict or (0, 0)
        log.info("Gleap answers again (%d of %d trial calls failed); delivery resumed", failed, answered)
        self.metrics.breaker(CLOSED)
        self.blocked = None  # Gleap takes calls: a run this pass closes did not end "aborted"
        # Called on the pass's event loop: the alert's store write goes to a thread.
        try:
            asyncio.get_running_loop().run_in_executor(None, self.alerts.gleap, None)
        except RuntimeError:  # no loop running: a unit test's direct call
            self.alerts.gleap(None)

    def _observe(self, outcomes: Sequence[Outcome]) -> None:
        self.metrics.outcomes(outcomes)
        if any(outcome.acknowledged for outcome in outcomes):
            self._acknowledged()

    def _acknowledged(self) -> None:
        """Gleap acknowledged a call (identify or track) of the pass under way."""
        self._acked = True
        self.progress.acknowledged()

    def _close_drained(self, runs: dict[int, Run]) -> None:
        for audience_id, run in runs.items():
            # Changes waiting out a backoff don't keep the run open: a delivery run
            # picks them up when they are due.
            if self.store.due_count([audience_id]):
                continue
            with self._lock:
                if self._open.get(audience_id) is not run:
                    continue  # a newer refresh took over this audience
                del self._open[audience_id]
            self._close(run)
