"""One sync cycle: refresh each audience's snapshot from its source, then deliver what is pending."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import IO

import httpx

from audiencesync.config import AudienceConfig, Config
from audiencesync.diff import DiffCounts
from audiencesync.errors import AudienceSyncError, GleapAuthError, MissingTokenError, SourceError
from audiencesync.gleap import IDENTIFY_PATH, GleapClient, identify_body
from audiencesync.sources import ReadStats, Sources
from audiencesync.store import Audience, Delivery, Guard, PendingChange, Store

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass
class AudienceReport:
    key: str
    mode: str
    status: str = "running"
    members: int = 0
    entered: int = 0
    left: int = 0
    sent: int = 0
    failed: int = 0
    pending: int = 0
    retries: int = 0
    rate_limited: int = 0
    skipped_rows: int = 0
    duplicate_rows: int = 0
    invalid_samples: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        text = (
            f"{self.key}: {self.status} ({self.mode}) members={self.members} entered={self.entered} "
            f"left={self.left} sent={self.sent} failed={self.failed} pending={self.pending} "
            f"retries={self.retries} rate_limited={self.rate_limited} skipped_rows={self.skipped_rows}"
        )
        if self.invalid_samples:
            text += f" invalid_ids=[{'; '.join(self.invalid_samples)}]"
        if self.error:
            text += f" error={self.error}"
        return text


@dataclass
class CycleReport:
    cycle_id: str
    audiences: list[AudienceReport]
    dry_run: bool = False
    calls: int = 0
    aborted: GleapAuthError | None = None

    @property
    def retries(self) -> int:
        return sum(a.retries for a in self.audiences)

    @property
    def complete(self) -> bool:
        """Everything refreshed and delivered: nothing failed, nothing left pending."""
        return self.aborted is None and all(
            a.status == "succeeded" or (self.dry_run and a.status == "planned") for a in self.audiences
        )


def identify_calls(changes: Iterable[PendingChange]) -> Iterator[tuple[str, list[PendingChange]]]:
    """Group pending changes (ordered by user) into one call per user."""
    for user_id, group in groupby(changes, key=lambda c: c.user_id):
        yield user_id, list(group)


class Syncer:
    """Runs cycles for one config against one store. Seams: the store, an httpx transport."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        sources: Sources | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        backoff_initial: float = 0.5,
        page_size: int = 500,
    ) -> None:
        self.config = config
        self.store = store
        self.sources = sources or Sources(config.sources)
        self.transport = transport
        self.backoff_initial = backoff_initial
        self.page_size = page_size

    def run_cycle(
        self,
        keys: Sequence[str] | None = None,
        *,
        full: bool = False,
        dry_run: bool = False,
        out: IO[str] | None = None,
        progress: Callable[[int], Progress] | None = None,
        allow_removals: bool = False,
    ) -> CycleReport:
        """Refresh then deliver the selected audiences (all when ``keys`` is None).

        ``out`` receives the dry run's calls as JSON lines. ``progress`` is called
        with the number of calls to make and returns a callback for each call done.
        ``allow_removals`` releases the mass-removal guard for this cycle.
        """
        selected = [self.config.audience(k) for k in keys] if keys else list(self.config.audiences)
        if not dry_run and self.config.gleap.api_token is None:
            raise MissingTokenError()
        report = CycleReport(cycle_id=str(uuid.uuid4()), audiences=[], dry_run=dry_run)
        if dry_run:
            with self.store.rehearsal() as rehearsal:
                self._cycle(rehearsal, selected, full, allow_removals, report, out, progress)
        else:
            interrupted = self.store.mark_interrupted()
            if interrupted:
                log.warning("%d run(s) of an earlier process were left open; marked interrupted", interrupted)
            self._cycle(self.store, selected, full, allow_removals, report, out, progress)
        for audience_report in report.audiences:
            log.info("%s", audience_report.summary())
        return report

    def _cycle(
        self,
        store: Store,
        selected: list[AudienceConfig],
        full: bool,
        allow_removals: bool,
        report: CycleReport,
        out: IO[str] | None,
        progress: Callable[[int], Progress] | None,
    ) -> None:
        runs: dict[int, tuple[Audience, int, AudienceReport]] = {}
        for config in selected:
            audience = store.ensure_audience(config.key, config.name)
            mode = "initial" if audience.refreshed_at is None else ("full" if full else "incremental")
            run_id = store.start_run(report.cycle_id, audience, mode)
            audience_report = AudienceReport(key=config.key, mode=mode)
            report.audiences.append(audience_report)
            runs[audience.id] = (audience, run_id, audience_report)
            guard = None if allow_removals else removal_guard(config)
            self._refresh(store, config, audience, run_id, full, guard, audience_report)

        audience_ids = list(runs)
        run_ids = {audience_id: run_id for audience_id, (_, run_id, _) in runs.items()}
        keys = {audience_id: audience.key for audience_id, (audience, _, _) in runs.items()}
        if report.dry_run:
            report.calls = self._print_calls(store, audience_ids, keys, out)
        else:
            total = store.pending_count(audience_ids)
            tick = progress(total) if progress is not None and total else None
            try:
                report.calls = asyncio.run(self._deliver(store, audience_ids, keys, run_ids, tick))
            except GleapAuthError as exc:
                report.aborted = exc

        for _, run_id, audience_report in runs.values():
            error: str | None
            if report.aborted is not None:
                status, error = "aborted", str(report.aborted)
            elif audience_report.status in ("failed", "held"):
                status, error = audience_report.status, audience_report.error
            else:
                status, error = "succeeded", None
            row = store.finish_run(run_id, status, error=error)
            audience_report.failed, audience_report.pending = row["failed"], row["pending_after"]
            audience_report.retries, audience_report.rate_limited = row["retries"], row["rate_limited"]
            # In a dry run nothing was sent: what is pending is what the printed calls would deliver.
            audience_report.sent = 0 if report.dry_run else row["sent"]
            audience_report.status = "planned" if report.dry_run and status == "succeeded" else row["status"]

    def _refresh(
        self,
        store: Store,
        config: AudienceConfig,
        audience: Audience,
        run_id: int,
        full: bool,
        guard: Guard | None,
        audience_report: AudienceReport,
    ) -> None:
        stats = ReadStats()
        try:
            refresh = store.refresh(
                audience, run_id, self.sources.read_ids(config, stats), full=full, guard=guard
            )
        except SourceError as exc:
            # The snapshot is untouched; pending changes from earlier cycles still go out.
            audience_report.status, audience_report.error = "failed", str(exc)
            log.error("%s", exc)
            return
        counts = refresh.counts
        if refresh.held is not None:
            audience_report.status, audience_report.error = "held", refresh.held
            log.error("audience %r held: %s", config.key, refresh.held)
        audience_report.members, audience_report.entered, audience_report.left = (
            counts.members,
            counts.entered,
            counts.left,
        )
        audience_report.skipped_rows = stats.skipped
        audience_report.duplicate_rows = stats.rows - stats.skipped - counts.members
        audience_report.invalid_samples = stats.invalid_samples
        store.update_run(
            run_id,
            source_rows=stats.rows,
            skipped_rows=stats.skipped,
            duplicate_rows=audience_report.duplicate_rows,
        )

    def _print_calls(
        self, store: Store, audience_ids: list[int], keys: dict[int, str], out: IO[str] | None
    ) -> int:
        calls = 0
        url = self.config.gleap.base_url + IDENTIFY_PATH
        for page in store.pending_pages(audience_ids, self.page_size):
            for user_id, changes in identify_calls(page):
                body = identify_body(user_id, {keys[c.audience_id]: c.value for c in changes})
                if out is not None:
                    out.write(json.dumps({"method": "POST", "url": url, "json": body}) + "\n")
                calls += 1
        return calls

    async def _deliver(
        self,
        store: Store,
        audience_ids: list[int],
        keys: dict[int, str],
        run_ids: dict[int, int],
        tick: Progress | None,
    ) -> int:
        """Send every pending change of these audiences; returns the number of calls made.

        Calls run concurrently (up to max_concurrency) through the shared rate
        limiter; answers are written to the store as soon as they arrive, so a
        crash can only re-send the calls whose answers were not yet recorded.
        """
        token = self.config.gleap.api_token
        assert token is not None
        answers: asyncio.Queue[Delivery | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.config.gleap.max_concurrency)
        calls = 0
        max_attempts = self.config.sync.max_attempts

        async def write_answers() -> None:
            done = False
            while not done:
                batch: list[Delivery] = []
                item = await answers.get()
                while True:
                    if item is None:
                        done = True
                        break
                    batch.append(item)
                    if answers.empty():
                        break
                    item = answers.get_nowait()
                await asyncio.to_thread(store.record, batch, run_ids, max_attempts=max_attempts)
                for _ in batch:
                    slots.release()
                if tick is not None:
                    tick(len(batch))

        async def send(client: GleapClient, user_id: str, changes: list[PendingChange]) -> None:
            try:
                answer = await client.identify(user_id, {keys[c.audience_id]: c.value for c in changes})
            except BaseException:
                slots.release()
                raise
            # The slot is freed by the writer once the answer is stored, so at
            # most max_concurrency calls are ever sent but not yet recorded:
            # that bounds what a crash can make the next run send again.
            answers.put_nowait(
                Delivery(
                    tuple(changes),
                    answer.status,
                    answer.error,
                    permanent=answer.permanent,
                    retries=answer.retries,
                    rate_limited=answer.rate_limited,
                )
            )
            if not answer.ok:
                log.warning("identify %s refused: %s", user_id, answer.error)

        client = GleapClient(
            self.config.gleap, token, transport=self.transport, backoff_initial=self.backoff_initial
        )
        try:
            async with client, asyncio.TaskGroup() as supervisor:
                supervisor.create_task(write_answers())
                try:
                    async with asyncio.TaskGroup() as senders:
                        # Keyset pages never repeat a user, so reading ahead while
                        # earlier calls are still in flight is safe.
                        pages = store.pending_pages(audience_ids, self.page_size)
                        while (page := await asyncio.to_thread(next, pages, None)) is not None:
                            for user_id, changes in identify_calls(page):
                                await slots.acquire()
                                senders.create_task(send(client, user_id, changes))
                                calls += 1
                finally:
                    # Whatever happened, the answers already received get recorded.
                    answers.put_nowait(None)
        except BaseExceptionGroup as group:
            raise _first_error(group) from None
        return calls


def removal_guard(audience: AudienceConfig) -> Guard:
    """Hold a cycle that would remove too much of an audience: a half-loaded or broken
    source must not send thousands of wrong ``false``s."""

    def guard(counts: DiffCounts) -> str | None:
        if not counts.left or counts.previous == 0:
            return None
        release = f"audiencesync sync --audience {audience.key} --allow-removals"
        if counts.members == 0:
            if audience.allow_empty:
                return None
            return (
                f"the source returned no rows, which would remove all {counts.previous} members. "
                f"Nothing was applied. Fix: check the source; if it is right, release it once with "
                f"`{release}`, or set allow_empty = true on the audience"
            )
        if counts.left > audience.max_removal_fraction * counts.previous:
            return (
                f"this cycle would remove {counts.left} of {counts.previous} members "
                f"({counts.left / counts.previous:.0%}, more than max_removal_fraction = "
                f"{audience.max_removal_fraction:g}). Nothing was applied. Fix: check the source; "
                f"if it is right, release it once with `{release}`"
            )
        return None

    return guard


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
