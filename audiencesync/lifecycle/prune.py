"""Retention: deleting delivery attempts and settled history older than a time, in short batches.

What goes, when it is older than ``before``: calls (with the values they
carried), membership changes, events Gleap acknowledged, and the finished
runs and admin requests that nothing left refers to. What stays, whatever its age: the current state
(audiences, memberships, leases), every change and call of a membership still
owed to Gleap or in trouble (pending, outcome unknown, failed or parked),
running runs, each audience's latest run (`status` shows it), and the prunes
rows. Everything at or after ``before`` stays, so an audience's members at any
instant from ``before`` on can still be rebuilt exactly, backwards from the
current state.

Each batch is its own short write transaction, so a running daemon's writers
wait for SQLite's lock at most one batch. No writer lease is needed to run
beside the daemon:
- every row deleted is one no writer changes any more: calls, call values and
  changes are only ever inserted; a run is updated only while it runs, and a
  request only until it is finished. The one update, a kept departure's
  ``entered_at`` blanked as its entry goes (prune_rules), is of a row no writer
  touches either;
- nothing new refers to what goes: new changes and calls name a running run,
  and a finished request names a run that has only just finished, while
  ``before`` is at least a day ago (``MIN_AGE``);
- whether a row must be kept is read again inside each batch's transaction;
- the lease fences writers that would overwrite a successor's state, and a
  prune writes no state, only deletes history (and blanks what pointed at it).
A prune's own row is written first, before anything is deleted, so the audit
can tell from ``prunes`` alone how far back it is exact even after an
interrupted prune. An interrupted prune leaves a consistent store (every batch
commits whole), and the next prune deletes what it left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Engine

from audiencesync import failpoints
from audiencesync.config.sections import MIN_AGE
from audiencesync.errors import PruneTimeError
from audiencesync.lifecycle import prune_rules
from audiencesync.lifecycle.prune_rules import Counts, Delete
from audiencesync.store import events as events_mod
from audiencesync.store.schema import (
    admin_requests,
    call_values,
    calls,
    events,
    membership_changes,
    prunes,
    sync_runs,
)
from audiencesync.store.writes import write_connection

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Rows per batch. Measured on SQLite with 1M rows in each table: a batch of 5,000
# holds the write lock for about 0.1 s (README, Retention); smaller batches cost
# more per row and wait as often.
BATCH_SIZE = 5_000
# SQLite's lock is not handed to whoever waits: a waiting writer's busy handler
# sleeps, up to 100 ms at a time, and a prune that began its next batch at once
# would take the lock again before it woke, for many batches in a row. Pausing
# this long after each batch lets every waiting writer in, so that none waits
# longer than one batch. PostgreSQL's deletes lock only their own rows.
SQLITE_PAUSE_SECONDS = 0.1


@dataclass(frozen=True)
class PruneRecord:
    """A row of ``prunes``: what one prune deleted so far, and up to when."""

    id: int
    before: datetime
    started_at: datetime
    finished_at: datetime | None  # None: interrupted, or still running
    by: str  # daemon | cli
    calls: int
    changes: int
    runs: int
    requests: int
    events: int = 0


@dataclass
class Result:
    prune_id: int
    before: datetime
    by: str
    deleted: Counts = field(default_factory=Counts)
    finished: bool = False  # False: stopped between batches; the next prune carries on
    batches: int = 0
    seconds: float = 0.0
    longest_batch_seconds: float = 0.0  # the longest one batch held its write transaction

    def summary(self) -> str:
        state = "pruned" if self.finished else "stopped pruning"
        return (
            f"{state} history before {self.before.isoformat()} (prune {self.prune_id}, by {self.by}): "
            f"{self.deleted.text()}; {self.batches} batch(es) in {self.seconds:.1f} s, "
            f"the longest holding the store for {self.longest_batch_seconds * 1000:.0f} ms"
        )


def check_before(before: datetime, now: datetime, option: str = "--before") -> None:
    """Refuse a time in the future or less than ``MIN_AGE`` ago."""
    if before > now - MIN_AGE:
        raise PruneTimeError(before, now, option)


class Pruner:
    """Prunes a store, counts what a prune would delete, and reads the prunes log. Seams: engine, clock."""

    def __init__(self, engine: Engine, clock: Clock, *, pause_seconds: float | None = None) -> None:
        self.engine = engine
        self.clock = clock
        if pause_seconds is None:
            pause_seconds = SQLITE_PAUSE_SECONDS if engine.dialect.name == "sqlite" else 0.0
        self.pause_seconds = pause_seconds  # after each batch

    def prune(
        self,
        before: datetime,
        *,
        by: str,
        batch_size: int = BATCH_SIZE,
        stop: threading.Event | None = None,
    ) -> Result:
        """Delete what is older than ``before`` and may go, one batch per transaction.

        Stops between batches when ``stop`` is set (the result then says not finished).
        """
        check_before(before, self.clock())
        started = time.monotonic()
        with write_connection(self.engine) as conn, conn.begin():
            prune_id: int = conn.execute(
                sa.insert(prunes).values(before=before, started_at=self.clock(), by=by).returning(prunes.c.id)
            ).scalar_one()
        result = Result(prune_id, before, by)
        for table, deletable, delete in prune_rules.STEPS:
            if not self._sweep(result, table, deletable(before), delete, batch_size, stop):
                break
        else:
            with write_connection(self.engine) as conn, conn.begin():
                conn.execute(
                    sa.update(prunes).where(prunes.c.id == prune_id).values(finished_at=self.clock())
                )
            result.finished = True
        result.seconds = time.monotonic() - started
        log.info("%s", result.summary())
        return result

    def _sweep(
        self,
        result: Result,
        table: sa.Table,
        deletable: sa.ColumnElement[bool],
        delete: Delete,
        batch_size: int,
        stop: threading.Event | None,
    ) -> bool:
        """One table, in batches by ascending id; False when told to stop first.

        Each batch's ids are found by a read (no lock); the write transaction then
        deletes those of them that may still go, so the lock is held only for the
        deletes. The next batch starts after the last id seen, so rows kept are
        read once, not once per batch.
        """
        after = 0
        while True:
            if stop is not None and stop.is_set():
                return False
            with self.engine.connect() as conn, conn.begin():
                ids = list(
                    conn.execute(
                        sa.select(table.c.id)
                        .where(table.c.id > after, deletable)
                        .order_by(table.c.id)
                        .limit(batch_size)
                    ).scalars()
                )
            if not ids:
                return True
            after = ids[-1]
            with write_connection(self.engine) as conn, conn.begin():
                held = time.monotonic()
                counts = delete(conn, ids, result.before)
                conn.execute(
                    sa.update(prunes)
                    .where(prunes.c.id == result.prune_id)
                    .values(
                        calls=prunes.c.calls + counts.calls,
                        changes=prunes.c.changes + counts.membership_changes,
                        runs=prunes.c.runs + counts.sync_runs,
                        requests=prunes.c.requests + counts.admin_requests,
                        events=prunes.c.events + counts.events,
                    )
                )
            result.longest_batch_seconds = max(result.longest_batch_seconds, time.monotonic() - held)
            result.deleted.add(counts)
            result.batches += 1
            failpoints.reach("prune-batch")
            if self.pause_seconds:
                (stop or threading.Event()).wait(self.pause_seconds)

    # --- reading only -------------------------------------------------------------

    def plan(self, before: datetime) -> Counts:
        """What ``prune(before)`` would delete now (a dry run). Reads only."""
        check_before(before, self.clock())
        deletable_calls = prune_rules.calls_deletable(before)

        def count(table: sa.FromClause, where: sa.ColumnElement[bool]) -> int:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar_one())

        with self.engine.connect() as conn, conn.begin():
            return Counts(
                calls=count(calls, deletable_calls),
                call_values=count(
                    call_values.join(calls, calls.c.id == call_values.c.call_id), deletable_calls
                ),
                membership_changes=count(membership_changes, prune_rules.changes_deletable(before)),
                sync_runs=count(sync_runs, prune_rules.runs_deletable(before, planned=True)),
                admin_requests=count(admin_requests, prune_rules.requests_deletable(before)),
                events=count(events, events_mod.deletable(before)),
            )

    def kept(self, before: datetime) -> tuple[int, int]:
        """(changes, calls) older than ``before`` kept because their membership is held."""
        with self.engine.connect() as conn, conn.begin():
            changes = conn.execute(
                sa.select(sa.func.count())
                .select_from(membership_changes)
                .where(membership_changes.c.at < before, ~prune_rules.changes_deletable(before))
            ).scalar_one()
            held_calls = conn.execute(
                sa.select(sa.func.count())
                .select_from(calls)
                .where(calls.c.at < before, ~prune_rules.calls_deletable(before))
            ).scalar_one()
        return int(changes), int(held_calls)

    def last(self, *, finished: bool = False) -> PruneRecord | None:
        """The latest prune (only those that finished, with ``finished``)."""
        query = sa.select(prunes).order_by(prunes.c.id.desc()).limit(1)
        if finished:
            query = query.where(prunes.c.finished_at.is_not(None))
        with self.engine.connect() as conn:
            row = conn.execute(query).one_or_none()
        return PruneRecord(**row._mapping) if row is not None else None

    def exact_from(self) -> datetime | None:
        """The latest ``before`` of any prune, finished or not: history is whole from there on."""
        with self.engine.connect() as conn:
            value: datetime | None = conn.execute(sa.select(sa.func.max(prunes.c.before))).scalar_one()
        return value
