"""The membership store: every query on audiences, memberships and runs.

What a delivery pass asks of it (pages of due changes, the unknown marks, recording
Gleap's answers, the counts owed and due) is its mixin ``delivery_queries.DeliveryQueries``.
The runs' SQL lives in ``runs``, engines and migrations in ``database``,
the bookkeeping of Gleap's answers in ``outcomes``, and what `status` and
`failures` read in ``status``; their names are re-exported here for the
callers that think of them as the store's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync import failpoints
from audiencesync.errors import StoreError
from audiencesync.store import (
    diff,
    events as events_mod,
    runs,
    stage as stage_mod,
    status as status_mod,
)
from audiencesync.store.database import (
    create_engine as create_engine,
    empty_store as empty_store,
    engine_for as engine_for,
    fill_pool as fill_pool,
    require_head as require_head,
    schema_revisions as schema_revisions,
    upgrade as upgrade,
    utc_now as utc_now,
)
from audiencesync.store.delivery_queries import DeliveryQueries
from audiencesync.store.diff import DiffCounts
from audiencesync.store.outcomes import Backoff as Backoff, Outcome as Outcome, PendingChange as PendingChange
from audiencesync.store.pending import pending_page_query as pending_page_query
from audiencesync.store.schema import audiences, leases, memberships
from audiencesync.store.status import AudienceStatus as AudienceStatus, ParkedChange as ParkedChange
from audiencesync.store.writes import fenced_write

Clock = Callable[[], datetime]


# --- records ------------------------------------------------------------------


@dataclass(frozen=True)
class Audience:
    id: int
    key: str
    name: str
    refreshed_at: datetime | None
    kind: str = "audience"  # audience | trait


@dataclass(frozen=True)
class Refresh:
    counts: DiffCounts
    held: str | None  # why the diff was not applied, or None when it was


Guard = Callable[[DiffCounts], str | None]

ANALYZE_AFTER_CHANGES = 10_000


class Store(DeliveryQueries):
    """Every query on the store. Seams: the engine, a clock, and a fence run in each write.

    The fence (the writer lease's check) raises when this process may no
    longer write, which rolls the write back.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock = utc_now,
        fence: Callable[[Connection], None] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.fence = fence

    def _write(self) -> contextlib.AbstractContextManager[Connection]:
        return fenced_write(self.engine, self.fence)

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read transaction; on SQLite it never takes the write lock (WAL)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # --- audiences and runs ---

    def ensure_audience(
        self, key: str, name: str, *, kind: str = "audience", missing: str | None = None
    ) -> Audience:
        """The row of this audience or trait, made on first use; ``missing``: a trait's
        value (canonical JSON) for users without one, as configured now."""
        with self._write() as conn:
            row = conn.execute(sa.select(audiences).where(audiences.c.key == key)).one_or_none()
            if row is None:
                conn.execute(
                    sa.insert(audiences).values(
                        key=key, name=name, kind=kind, missing=missing, created_at=self.clock()
                    )
                )
                row = conn.execute(sa.select(audiences).where(audiences.c.key == key)).one()
            elif (row.name, row.kind, row.missing) != (name, kind, missing):
                if row.kind != kind:
                    raise StoreError(
                        f"the key {key!r} is a{'n' if row.kind == 'audience' else ''} {row.kind} in the "
                        f"store and a{'n' if kind == 'audience' else ''} {kind} in the config. "
                        "Fix: give the new one another key (a key names one property in Gleap)"
                    )
                conn.execute(
                    sa.update(audiences).where(audiences.c.id == row.id).values(name=name, missing=missing)
                )
        return Audience(id=row.id, key=row.key, name=name, refreshed_at=row.refreshed_at, kind=kind)

    def start_run(self, cycle_id: str, audience: Audience, mode: str) -> int:
        with self._write() as conn:
            return runs.start_run(conn, cycle_id, audience.id, mode, now=self.clock())

    def update_run(self, run_id: int, **values: Any) -> None:
        with self._write() as conn:
            runs.update_run(conn, run_id, **values)

    def add_field_conflicts(self, counts: dict[int, int]) -> None:
        """Count fields sent with an earlier audience's value into their runs (run id -> n)."""
        if any(counts.values()):
            with self._write() as conn:
                runs.add_field_conflicts(conn, counts)

    def finish_run(
        self, run_id: int, status: str, *, error: str | None = None, members: int | None = None
    ) -> dict[str, Any]:
        """Close a run; returns its row, ``partial`` when it left changes owed (see ``runs``).
        ``members``: the snapshot its refresh applied, if it applied one."""
        with self._write() as conn:
            return runs.finish_run(conn, run_id, status, error=error, now=self.clock(), members=members)

    def mark_interrupted(self) -> int:
        """Close runs a killed process left open; only safe under the writer lease (see ``runs``)."""
        with self._write() as conn:
            return runs.mark_interrupted(conn, now=self.clock())

    def last_run_status(self, audience_id: int) -> str | None:
        with self._read() as conn:
            return runs.last_status(conn, audience_id)

    # --- the diff ---

    def refresh(
        self,
        audience: Audience,
        run_id: int,
        batches: Iterable[list[str]] | Iterable[list[tuple[str, str | None]]],
        *,
        full: bool,
        guard: Guard | None = None,
        events: events_mod.EventNames | None = None,
        valued: bool = False,
        push: Callable[[Connection, str], object] | None = None,
    ) -> Refresh:
        """Make the audience's snapshot equal ``batches`` (the source's ids), recording each change.

        The source is read completely into a session-scoped TEMP table first,
        one short transaction per batch, so no transaction stays open while a
        slow source streams in (it would hold back VACUUM on PostgreSQL, and
        SQLite's lock is never taken for it). Only then does one write
        transaction apply the diff. A source that fails midway therefore leaves
        the snapshot untouched. When ``guard`` objects to the counts, the whole
        diff is rolled back and the reason returned. ``valued``: the batches are
        (user id, value JSON) pairs (``Sources.read_values``), not ids. With
        ``events``, each entry and exit also becomes an event in the outbox, in
        the same transaction. ``push`` loads the stage inside the store instead of
        ``batches`` (``Sources.push_down``: the query runs where the data is).
        """
        name = stage_mod.new_stage_name()
        held: str | None = None
        with self.engine.connect() as conn:
            try:
                with conn.begin():
                    stage_mod.create_stage(conn, name)
                if push is not None:
                    with conn.begin():
                        push(conn, name)
                for batch in batches:
                    with conn.begin():
                        if valued:
                            stage_mod.load_values(conn, name, batch)  # type: ignore[arg-type]
                        else:
                            stage_mod.load_batch(conn, name, batch)  # type: ignore[arg-type]
                    failpoints.reach("stage-batch")
                with conn.begin():
                    members = stage_mod.seal_for_apply(conn, name, valued=valued)
                failpoints.reach("after-stage")
                with conn.execution_options(sqlite_begin="IMMEDIATE").begin() as transaction:
                    if self.fence is not None:
                        self.fence(conn)
                    now = self.clock()
                    counts = diff.apply_stage(
                        conn,
                        name,
                        audience_id=audience.id,
                        run_id=run_id,
                        now=now,
                        full=full,
                        members=members,
                        valued=valued,
                    )
                    if events is not None:
                        events_mod.create_from_changes(
                            conn, audience_id=audience.id, run_id=run_id, names=events
                        )
                    failpoints.reach("before-commit")
                    held = guard(counts) if guard is not None else None
                    if held is not None:
                        transaction.rollback()
                    else:
                        conn.execute(
                            sa.update(audiences).where(audiences.c.id == audience.id).values(refreshed_at=now)
                        )
            finally:
                conn.execution_options(sqlite_begin="DEFERRED")
                if conn.in_transaction():
                    conn.rollback()
                with conn.begin():
                    stage_mod.drop_stage(conn, name)
        if held is None and counts.entered + counts.left + counts.changed > ANALYZE_AFTER_CHANGES:
            self._analyze()
        self.update_run(
            run_id, members=counts.members, entered=counts.entered, left=counts.left, changed=counts.changed
        )
        return Refresh(counts, held)

    def _analyze(self) -> None:
        """Refresh PostgreSQL's statistics after a big change.

        Without them, right after a bulk refresh, the planner sorts every pending
        row for each page of pending_pages (measured: 63 s per million rows,
        against 1.7 s after ANALYZE). SQLite is steered by an index hint instead.
        """
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as conn, conn.begin():
                conn.exec_driver_sql("ANALYZE memberships")

    # --- parked failures ---

    def parked(self, audience_key: str | None = None, limit: int | None = None) -> list[ParkedChange]:
        """Changes parked after repeated rejections, by audience and user (the first ``limit``)."""
        with self._read() as conn:
            return status_mod.parked_changes(conn, audience_key, limit)[:limit]

    def requeue(self, audience_key: str | None = None, user_id: str | None = None) -> int:
        """Un-park parked changes and events so the next run tries them again, with a fresh attempt
        budget. A change keeps its ``pending_since``: it has been owed since it was made."""
        query = sa.update(memberships).where(memberships.c.parked_at.is_not(None))
        if audience_key is not None:
            ids = sa.select(audiences.c.id).where(audiences.c.key == audience_key).scalar_subquery()
            query = query.where(memberships.c.audience_id == ids)
        if user_id is not None:
            query = query.where(memberships.c.user_id == user_id)
        with self._write() as conn:
            fresh = {"parked_at": None, "attempts": 0, "failures": 0, "next_attempt_at": None}
            changes = conn.execute(query.values(**fresh)).rowcount
            return changes + events_mod.requeue(conn, audience_key, user_id)

    # --- status -----------------------------------------------------------------

    def set_next_run(self, audience_key: str, when: datetime | None) -> None:
        with self._write() as conn:
            conn.execute(sa.update(audiences).where(audiences.c.key == audience_key).values(next_run_at=when))

    def status(self) -> list[AudienceStatus]:
        """Per audience: members, pending, parked, unknown, the last run and the next. Reads only."""
        with self._read() as conn:
            return status_mod.audience_status(conn)

    def lease_holder(self, name: str = "writer") -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(sa.select(leases).where(leases.c.name == name)).one_or_none()
            return dict(row._mapping) if row is not None else None

    def memberships_of(self, audience_key: str) -> dict[str, tuple[bool, bool | None]]:
        """user id -> (desired, acked) for one audience. For tests and small audits."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(memberships.c.user_id, memberships.c.desired, memberships.c.acked)
                .join(audiences, audiences.c.id == memberships.c.audience_id)
                .where(audiences.c.key == audience_key)
            )
            return {r.user_id: (r.desired, r.acked) for r in rows}
