"""Draining pending changes to Gleap: fair across audiences, bounded, resumable.

Audiences take turns a page of users at a time (``call_turns``), so a new
audience's hours-long first sync never starves the few changes of the others.
Each user gets one call carrying all of their pending properties (memberships,
trait values). ``max_concurrency`` senders make the calls through the shared
rate limiter, each its next call once the last one's answer arrived. Answers are
recorded in batches (``record_batches``), one store transaction each: a batch closes at
``RECORD_BATCH`` answers or ``RECORD_LINGER`` seconds after its first answer,
whichever comes first. No new call starts while ``max_concurrency +
RECORD_WINDOW`` calls are sent and not yet recorded: that bounds what a crash
can make the next run send again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import islice

import httpx

from audiencesync import failpoints, values
from audiencesync.config.loading import GleapConfig, Secret
from audiencesync.delivery.call_turns import plan_calls
from audiencesync.delivery.field_winners import reconcile
from audiencesync.delivery.identify_calls import Call
from audiencesync.delivery.progress_log import ProgressLog
from audiencesync.delivery.record_batches import RECORD_WINDOW, next_batch
from audiencesync.delivery.track import EventSender
from audiencesync.delivery.unknown_marks import UnknownMarks
from audiencesync.errors import AudienceSyncError, GleapAuthError, GleapUnavailableError
from audiencesync.gleap.breaker import CircuitBreaker
from audiencesync.gleap.client import GleapClient
from audiencesync.store.events import Outbox
from audiencesync.store.store import Backoff, Outcome, PendingChange, Store

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


class Deliverer:
    """Sends what is pending. Seams: the store, an httpx transport, a clock for progress lines."""

    def __init__(
        self,
        store: Store,
        gleap: GleapConfig,
        token: Secret,
        *,
        max_attempts: int,
        backoff: Backoff | None = None,
        breaker: CircuitBreaker | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_initial: float = 0.5,
        page_size: int = 100,
        progress_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        observe: Callable[[Sequence[Outcome]], None] | None = None,
        field_order: Sequence[str] = (),
    ) -> None:
        self.store = store
        self.gleap = gleap
        self.token = token
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.breaker = breaker or CircuitBreaker(gleap.breaker_failures)
        self.transport = transport
        self.backoff_initial = backoff_initial
        self.page_size = page_size
        self.progress_every = progress_every
        self.clock = clock
        self.observe = observe
        self.events = EventSender(
            Outbox(store.engine, clock=store.clock, fence=store.fence),
            batch_size=gleap.track_batch_size,
            max_attempts=max_attempts,
            backoff=(self.backoff.seconds, self.backoff.max_seconds),
        )
        # Called before each request to Gleap; raises to stop the pass (the daemon's lease check).
        self.before_send: Callable[[], None] | None = None
        self.field_order = field_order  # the configured audiences' keys, first wins a field
        # Fields Gleap acknowledged with another audience's value: by losing audience's key, and
        # by the run each loser's answers were recorded under when the call's were (run id).
        self.conflicts: Counter[str] = Counter()
        self.run_conflicts: Counter[int] = Counter()

    async def drain(
        self,
        audience_ids: Sequence[int],
        keys: Mapping[int, str],
        run_ids: Callable[[int], int],
        *,
        stop: threading.Event | None = None,
        grace_seconds: float = 30.0,
        tick: Progress | None = None,
        new_work: threading.Event | None = None,
    ) -> int:
        """One pass over everything due in these audiences; returns the number of requests made.

        The identify calls go first; then the events whose identify is done (see
        ``track.EventSender``), unless the pass was halted.

        When ``stop`` is set, no new call starts; calls in flight get
        ``grace_seconds`` to finish (their answers are stored), then are
        cancelled and stay pending. When ``new_work`` is set (a refresh added
        changes), the pass ends early and normally, so that the caller can
        start a new one that includes them: an audience whose turn has passed
        must not wait for a long first sync to finish. When the circuit breaker
        opens, the pass ends once the answers in hand are stored, and raises
        ``GleapUnavailableError``.

        Before a page of calls goes out, its rows are marked outcome-unknown
        in the store (write-ahead): a crash mid-call then leaves the change
        pending whatever the source says next. Rows marked but never sent are
        given their mark back at the end.
        """
        # A config whose order of audiences changed since the last pass may change the winning
        # contact fields of users none of whose rows changed: make those pending first.
        await asyncio.to_thread(
            reconcile,
            self.store.engine,
            self.store.fence,
            self.field_order,
            audience_ids,
            clock=self.store.clock,
        )
        answers: asyncio.Queue[Outcome | None] = asyncio.Queue()
        # Calls sent and not yet recorded: in flight, or answered and waiting for their batch.
        unrecorded = asyncio.Semaphore(self.gleap.max_concurrency + RECORD_WINDOW)
        refused: GleapAuthError | None = None
        calls = 0
        progress = ProgressLog(self.store, audience_ids, self.clock, self.progress_every)
        marked = UnknownMarks(self.store)
        ids_of = {key: audience_id for audience_id, key in keys.items()}

        async def write_answers() -> None:
            done = False
            while not done:
                batch, done = await next_batch(answers)
                if batch:
                    failpoints.reach("before-record")
                    ids = {c.audience_id: run_ids(c.audience_id) for o in batch for c in o.changes}
                    await asyncio.to_thread(
                        self.store.record,
                        batch,
                        ids,
                        max_attempts=self.max_attempts,
                        backoff=self.backoff,
                        keys=keys,  # what the calls carried: a row renamed meanwhile is not acknowledged
                    )
                    self._count_conflicts(batch, ids, ids_of, run_ids)
                    progress.sent(len(batch))
                    if self.observe is not None:
                        self.observe(batch)
                    if tick is not None:
                        tick(len(batch))
                for _ in batch:
                    unrecorded.release()

        async def send(client: GleapClient, user_id: str, call: Call[PendingChange]) -> None:
            changes = call.changes
            try:
                answer = await client.identify(user_id, call.attributes)
            except GleapAuthError as exc:
                # A verdict on the token: this request was not applied. The calls in flight
                # finish (and are refused) rather than being cancelled half-sent.
                nonlocal refused
                refused = refused or exc
                if exc.maybe_applied:
                    # An earlier attempt got no verdict and may have been applied: recorded as
                    # unknown (its requests in the call log), not given its old mark back.
                    answers.put_nowait(
                        Outcome(
                            tuple(changes),
                            exc.status,
                            f"HTTP {exc.status}",
                            retries=len(exc.tries) - 1,
                            maybe_applied=True,
                            tries=exc.tries,
                        )
                    )
                    return
                marked.unsent(changes)
                unrecorded.release()
                return
            except BaseException:
                unrecorded.release()
                raise
            if answer.halted:
                # The breaker opened while the call waited for the limiter: it never went out.
                marked.unsent(changes)
                unrecorded.release()
                return
            answers.put_nowait(
                Outcome(
                    tuple(changes),
                    answer.status,
                    answer.error,
                    permanent=answer.permanent,
                    retries=answer.retries,
                    rate_limited=answer.rate_limited,
                    maybe_applied=answer.maybe_applied,
                    tries=answer.tries,
                    fields=tuple((name, values.encode(v)) for name, v in call.fields.items()),
                    conflicts=tuple(call.conflicts),
                )
            )
            if not answer.ok and not self.breaker.is_open:
                log.warning("identify %s refused: %s", user_id, answer.error)

        def halted() -> bool:
            """No new call starts: told to stop, Gleap down for everyone, or the token refused."""
            return (stop is not None and stop.is_set()) or self.breaker.is_open or refused is not None

        async def stopper(tasks: set[asyncio.Task[None]]) -> None:
            assert stop is not None
            while not stop.is_set():
                await asyncio.sleep(0.1)
            # The senders start no new call now; those in flight get the grace period.
            _, unfinished = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in unfinished:
                task.cancel()

        client = GleapClient(
            self.gleap,
            self.token,
            transport=self.transport,
            breaker=self.breaker,
            backoff_initial=self.backoff_initial,
            now=self.store.clock,  # the call log's times, on the same clock as the rest of the store
            before_send=self.before_send,
        )
        plan = plan_calls(
            self.store,
            audience_ids,
            self.page_size,
            keys=keys,
            field_order=self.field_order,
            on_page=marked.mark,
        )
        # The planner keeps up to a page of calls ahead of the senders, reading the next
        # page while this one goes out: on PostgreSQL a page's reads and write-ahead mark
        # take tens of milliseconds, which would otherwise leave every sender idle.
        queued: asyncio.Queue[tuple[str, Call[PendingChange]] | None] = asyncio.Queue()
        room = asyncio.Event()
        closing = False

        def ended() -> bool:
            return closing or halted() or (new_work is not None and new_work.is_set())

        async def planner() -> None:
            while not ended():
                if queued.qsize() >= self.page_size:
                    room.clear()
                    await room.wait()
                    continue
                # A page's worth per trip to the store's thread, not a trip per call.
                page = await asyncio.to_thread(_take, plan, self.page_size)
                if not page:
                    break
                for item in page:
                    queued.put_nowait(item)
            queued.put_nowait(None)

        async def sender() -> None:
            """One of ``max_concurrency``: a call at a time, until the plan is done or the pass halts.

            A fixed set of senders, rather than a task per call: measured, it costs a
            quarter less CPU per call, httpx's pool included.
            """
            nonlocal calls
            while not ended():
                await unrecorded.acquire()
                item = await queued.get()
                if queued.qsize() < self.page_size:
                    room.set()
                if item is None or ended():
                    unrecorded.release()
                    if item is None:
                        queued.put_nowait(None)  # for the other senders
                    return  # a call taken but not sent keeps its mark until ``marked.restore``
                user_id, call = item
                marked.sent(call.changes)
                calls += 1
                await send(client, user_id, call)

        try:
            async with client:
                async with asyncio.TaskGroup() as supervisor:
                    supervisor.create_task(write_answers())
                    try:
                        async with asyncio.TaskGroup() as senders:
                            planning = senders.create_task(planner())
                            n = self.gleap.max_concurrency
                            workers = {senders.create_task(sender()) for _ in range(n)}
                            watcher = senders.create_task(stopper(workers)) if stop is not None else None
                            await asyncio.wait(workers)
                            if watcher is not None:
                                # Drained normally: wait for the calls, not for a stop signal.
                                watcher.cancel()
                            # Not cancelled: a page being read ends with its marks known to ``marked``.
                            closing = True
                            room.set()
                            await planning
                    finally:
                        # Whatever happened, the answers already received get recorded.
                        answers.put_nowait(None)
                if not halted():
                    try:
                        calls += await self.events.send_due(
                            client,
                            audience_ids,
                            run_ids,
                            halted=halted,
                            stop=stop,
                            grace_seconds=grace_seconds,
                        )
                    except GleapAuthError as exc:
                        refused = refused or exc
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        finally:
            await asyncio.to_thread(marked.restore)
        progress.done()
        if self.conflicts:
            log.warning(
                "fields sent with the value of an audience listed earlier in the config (first wins): %s",
                ", ".join(f"{key}: {n}" for key, n in sorted(self.conflicts.items())),
            )
        if refused is not None:
            raise refused
        # A probe pass that ran out of calls before its trials were all answered: judged on those.
        self.breaker.settle()
        if self.breaker.is_open:
            verdict = self.breaker.verdict  # reopened by its trials, not by failures in a row
            raise GleapUnavailableError(
                base_url=self.gleap.base_url,
                failures=verdict[0] if verdict is not None else self.breaker.failures,
                users=len(self.breaker.users),
                last_error=self.breaker.last_error or "unknown",
                trials=verdict[1] if verdict is not None else None,
            )
        return calls

    def _count_conflicts(
        self,
        batch: Sequence[Outcome],
        ids: Mapping[int, int],
        ids_of: Mapping[str, int],
        run_ids: Callable[[int], int],
    ) -> None:
        """The field conflicts of a recorded batch's acknowledged calls, each into the run its
        loser's answers were just recorded under (``ids``), or else its open run; a loser with
        no row in this pass has no run here, and is only logged."""
        for outcome in batch:
            if not outcome.acknowledged:
                continue
            for loser in outcome.conflicts:
                self.conflicts[loser] += 1
                audience_id = ids_of.get(loser)
                if audience_id is not None:
                    run_id = ids[audience_id] if audience_id in ids else run_ids(audience_id)
                    self.run_conflicts[run_id] += 1


def _take(plan: Iterator[tuple[str, Call[PendingChange]]], n: int) -> list[tuple[str, Call[PendingChange]]]:
    return list(islice(plan, n))


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that matters in a task group's failure: ours before any other."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for error in leaves:
        if isinstance(error, AudienceSyncError):
            return error
    return leaves[0]
