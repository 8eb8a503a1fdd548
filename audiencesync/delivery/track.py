"""Sending the due Audience Entered / Exited events to Gleap's track endpoint, in batches.

The delivery pass runs this after its identify calls, on the same client (so
the same rate limiter, retries and circuit breaker). Batches go one at a time,
in the events' order: a crash re-sends at most the one batch in flight. Each
batch is marked outcome-unknown in the store before it leaves, and its answer
is stored as soon as it arrives. A batch refused as a whole (400, 413, 422) is
split in halves until the refused events stand alone, so one bad event never
parks its neighbours; a lone event refused is a verdict on it. A user's events
in one audience keep their order through the splits: once one of them fails,
the later ones in the rest of the batch are not sent (they wait for it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeAlias

from audiencesync import failpoints
from audiencesync.errors import GleapAuthError
from audiencesync.gleap.api import track_event
from audiencesync.gleap.client import Answer, GleapClient
from audiencesync.store.events import DueEvent, EventOutcome, Outbox

log = logging.getLogger(__name__)

# Answers about a batch's content that may concern only some of its events.
SPLIT_STATUSES = frozenset({400, 413, 422})

# Whose events are kept in order: a user's, in one audience.
Stream: TypeAlias = tuple[str, int]


def stream(event: DueEvent) -> Stream:
    return event.user_id, event.audience_id


def event_body(event: DueEvent) -> dict[str, object]:
    return track_event(
        event.user_id,
        event.name,
        event.at,
        {"audience_key": event.audience_key, "audience_name": event.audience_name},
    )


class EventSender:
    """Sends what the outbox says is due. Seams: the outbox, the batch size, the retry policy."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        batch_size: int,
        max_attempts: int,
        backoff: tuple[float, float],
    ) -> None:
        self.outbox = outbox
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        # Told of every acknowledged batch (the daemon's stall detection counts them as progress).
        self.on_acknowledged: Callable[[], None] | None = None
        # Told of every answer to a track call, with the number of events it carried (/metrics).
        self.on_answer: Callable[[Answer, int], None] | None = None

    async def send_due(
        self,
        client: GleapClient,
        audience_ids: Sequence[int],
        run_ids: Callable[[int], int],
        *,
        halted: Callable[[], bool],
        stop: threading.Event | None = None,
        grace_seconds: float = 30.0,
    ) -> int:
        """One pass over the due events of these audiences; returns the number of requests sent.

        A user whose event failed in this pass has no later event of that audience sent
        in it, not even in the other half of a split batch, so that their events never
        arrive out of order. Once ``stop`` is set, the request in
        flight gets ``grace_seconds``, as identify calls do, then is cancelled (its
        events stay marked unknown, and owed).
        """
        task = asyncio.create_task(self._pass(client, audience_ids, run_ids, halted))

        async def cancel_on_stop() -> None:
            assert stop is not None
            while not stop.is_set():
                await asyncio.sleep(0.1)
            await asyncio.wait([task], timeout=grace_seconds)
            task.cancel()

        watcher = asyncio.create_task(cancel_on_stop()) if stop is not None else None
        try:
            await asyncio.wait([task])
        except BaseException:
            task.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        return 0 if task.cancelled() else task.result()

    async def _pass(
        self,
        client: GleapClient,
        audience_ids: Sequence[int],
        run_ids: Callable[[int], int],
        halted: Callable[[], bool],
    ) -> int:
        after = 0
        requests = 0
        failed: set[Stream] = set()
        while not halted():
            page = await asyncio.to_thread(self.outbox.due, audience_ids, after, self.batch_size)
            if not page:
                break
            after = page[-1].id
            batch = [event for event in page if stream(event) not in failed]
            if not batch:
                continue
            await asyncio.to_thread(self.outbox.mark_unknown, batch)
            failpoints.reach("event-batch")
            recorded: set[int] = set()
            try:
                sent = await self._deliver(client, batch, run_ids, 0, recorded, halted, failed)
            except GleapAuthError:
                # A verdict on the token: nothing was applied.
                await asyncio.to_thread(
                    self.outbox.restore_unknown, [e for e in batch if e.id not in recorded]
                )
                raise
            requests += sent
        return requests

    async def _record_refused(
        self, batch: list[DueEvent], exc: GleapAuthError, run_ids: Callable[[int], int], sends_before: int
    ) -> None:
        outcome = EventOutcome(
            tuple(batch),
            exc.status,
            f"HTTP {exc.status}",
            maybe_applied=True,
            sends=sends_before + len(exc.tries),
            sent_at=exc.tries[-1].at if exc.tries else None,
            retries=max(len(exc.tries) - 1, 0),
        )
        await asyncio.to_thread(
            self.outbox.record, outcome, run_ids, max_attempts=self.max_attempts, backoff=self.backoff
        )

    async def _deliver(
        self,
        client: GleapClient,
        batch: list[DueEvent],
        run_ids: Callable[[int], int],
        sends_before: int,
        recorded: set[int],
        halted: Callable[[], bool],
        failed: set[Stream],
    ) -> int:
        """Send ``batch`` (split on a refusal); returns the requests sent. ``failed``: the
        streams with an event not acknowledged in this pass, whose later events are held."""
        stop = halted()
        held = [event for event in batch if stop or stream(event) in failed]
        if held:  # marked but never sent: they get their mark back, and stay owed
            await asyncio.to_thread(self.outbox.restore_unknown, held)
            recorded.update(event.id for event in held)
            batch = [event for event in batch if not stop and stream(event) not in failed]
        if not batch:
            return 0
        try:
            answer = await client.track([event_body(event) for event in batch])
        except GleapAuthError as exc:
            if exc.maybe_applied:  # an earlier request may have been applied: recorded as unknown
                await self._record_refused(batch, exc, run_ids, sends_before)
                recorded.update(event.id for event in batch)
            raise
        if answer.halted:  # the breaker opened while it waited for the limiter: never sent
            await asyncio.to_thread(self.outbox.restore_unknown, batch)
            recorded.update(event.id for event in batch)
            return 0
        if self.on_answer is not None:
            self.on_answer(answer, len(batch))
        sent = max(len(answer.tries), 1)
        sends = sends_before + sent
        if answer.permanent and answer.status in SPLIT_STATUSES and len(batch) > 1:
            middle = len(batch) // 2
            log.info("a batch of %d events was refused (%s); splitting it", len(batch), answer.error)
            first = await self._deliver(client, batch[:middle], run_ids, sends, recorded, halted, failed)
            # The second half after the first is recorded: a user's later events wait for a refused one.
            second = await self._deliver(client, batch[middle:], run_ids, sends, recorded, halted, failed)
            return sent + first + second
        outcome = EventOutcome(
            tuple(batch),
            answer.status,
            answer.error,
            permanent=answer.permanent,
            maybe_applied=answer.maybe_applied,
            sends=sends,
            sent_at=answer.tries[-1].at if answer.tries else None,
            retries=answer.retries,
            rate_limited=answer.rate_limited,
        )
        failpoints.reach("before-event-record")
        await asyncio.to_thread(
            self.outbox.record, outcome, run_ids, max_attempts=self.max_attempts, backoff=self.backoff
        )
        recorded.update(event.id for event in batch)
        failpoints.reach("after-event-record")
        if answer.ok and self.on_acknowledged is not None:
            self.on_acknowledged()
        if not outcome.acknowledged:
            failed.update(stream(event) for event in batch)
        if not answer.ok:
            log.warning("track: %d event(s) refused: %s", len(batch), answer.error)
        return sent
