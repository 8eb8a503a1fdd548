"""The membership store: engine setup, migrations, and every query on it."""

from __future__ import annotations

import contextlib
import importlib.resources
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, event
from sqlalchemy.exc import OperationalError

from audiencesync import diff, failpoints
from audiencesync.config import StoreConfig, display_url
from audiencesync.diff import DiffCounts
from audiencesync.errors import StoreError, StoreMissingError
from audiencesync.schema import (
    UtcDateTime,
    audiences,
    deliveries,
    leases,
    memberships,
    sync_runs,
    write_connection,
)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for another database or an in-memory one."""
    parsed = sa.make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None  # a URI filename: its own mode= decides
    return Path(database)


def create_engine(url: str, *, create: bool = False, busy_timeout_seconds: float = 30.0) -> Engine:
    """An engine for the store, with SQLite set up for one writer and many readers.

    A SQLite file that does not exist is refused unless ``create``: a typo in
    the URL must not start a new, empty store (and re-send every member).
    """
    path = sqlite_path(url)
    if path is not None and not create and not path.exists():
        raise StoreMissingError(str(path))
    engine = sa.create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine, busy_timeout_seconds)
    return engine


def engine_for(config: StoreConfig, *, create: bool = False) -> Engine:
    """The engine for a configured store (see ``create_engine``)."""
    return create_engine(config.url, create=create, busy_timeout_seconds=config.busy_timeout_seconds)


def _tune_sqlite(engine: Engine, busy_timeout_seconds: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see "begin").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A deferred transaction that reads then writes fails at once with
        # "database is locked" when another connection writes, busy_timeout or
        # not; IMMEDIATE takes the write lock up front and waits for it instead.
        # Everything else, readers above all, begins DEFERRED: in WAL mode a reader
        # then never takes the write lock, however slowly it drains its rows.
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")


# --- migrations ---------------------------------------------------------------


def _alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(importlib.resources.files("audiencesync.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the store's revision, the newest this version of audiencesync knows)."""
    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    assert head is not None
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise StoreError(
            f"cannot open the store at {display_url(engine.url.render_as_string(hide_password=False))}: "
            f"{str(exc.orig).strip()}. Fix: check [store] url and that the database is reachable."
        ) from None
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise StoreError(
            f"the store is at schema revision {current!r}, made by a newer audiencesync. "
            "Fix: upgrade audiencesync (pip install -U audiencesync); this version will not touch it."
        )
    return current, head


MIGRATION_LOCK_ID = 0x61756473796E63  # "audsync"


def upgrade(engine: Engine) -> bool:
    """Apply pending migrations. Returns whether anything was applied."""
    current, head = schema_revisions(engine)
    if current == head:
        return False
    with write_connection(engine) as conn, conn.begin():
        # Two processes starting on a new store must not both run the DDL. SQLite's
        # BEGIN IMMEDIATE already serialises them; PostgreSQL needs a lock. Alembic
        # reads the revision again inside, so the second one finds nothing to do.
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        command.upgrade(_alembic_config(conn), "head")
    return True


# --- records ------------------------------------------------------------------


@dataclass(frozen=True)
class Audience:
    id: int
    key: str
    name: str
    refreshed_at: datetime | None


@dataclass(frozen=True)
class PendingChange:
    audience_id: int
    user_id: str
    value: bool
    unknown: bool = False  # an earlier call's outcome is unknown (as read, before this call)
    failures: int = 0  # failed deliveries of this value so far


@dataclass(frozen=True)
class Outcome:
    """Gleap's answer to one call, which carried one or more audiences' values."""

    changes: tuple[PendingChange, ...]
    status: int  # 0 when no answer came
    error: str | None = None
    permanent: bool = False  # Gleap rejected the call itself (400/404/422...), not a passing fault
    retries: int = 0
    rate_limited: int = 0
    maybe_applied: bool = True  # no verdict, and the request may have reached Gleap

    @property
    def acknowledged(self) -> bool:
        return 200 <= self.status < 300

    @property
    def unknown(self) -> bool:
        """Gleap may or may not have applied this call."""
        return not self.acknowledged and not self.permanent and self.maybe_applied


@dataclass(frozen=True)
class Backoff:
    """How long a user whose delivery failed waits before the next try: doubling, capped."""

    seconds: float = 60.0
    max_seconds: float = 3600.0

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure in a row (1 for the first)."""
        return float(min(self.max_seconds, self.seconds * 2 ** min(failures - 1, 40)))


@dataclass(frozen=True)
class Refresh:
    counts: DiffCounts
    held: str | None  # why the diff was not applied, or None when it was


@dataclass(frozen=True)
class ParkedChange:
    audience: str
    user_id: str
    value: bool
    attempts: int
    last_status: int | None
    last_error: str | None
    parked_at: datetime


@dataclass(frozen=True)
class AudienceStatus:
    key: str
    name: str
    members: int
    pending: int  # owed to Gleap and not parked (waiting for a backoff included)
    parked: int
    unknown: int  # calls whose outcome is unknown; pending until a verdict comes
    oldest_pending_at: datetime | None  # when the oldest pending change was made
    refreshed_at: datetime | None
    next_run_at: datetime | None
    last_run: dict[str, Any] | None


Guard = Callable[[DiffCounts], str | None]

ANALYZE_AFTER_CHANGES = 10_000

# Owed to Gleap and not parked: what `status`, the summary and /metrics call pending.
_DELIVERABLE = sa.and_(memberships.c.pending == sa.true(), memberships.c.parked_at.is_(None))


def _due(table: sa.FromClause, now: datetime) -> sa.ColumnElement[bool]:
    """Deliverable now: pending, not parked, and past its backoff."""
    return sa.and_(
        table.c.pending == sa.true(),
        table.c.parked_at.is_(None),
        sa.or_(table.c.next_attempt_at.is_(None), table.c.next_attempt_at <= now),
    )


def pending_page_query(
    audience_id: int, audience_ids: Sequence[int], after: str, limit: int, now: datetime | None = None
) -> sa.Select[Any]:
    """Users after ``after`` with a due change in ``audience_id``, with all their due
    changes in ``audience_ids``; the primary key serves both the filter and the order."""
    now = now or utc_now()
    users = (
        sa.select(memberships.c.user_id)
        .where(
            memberships.c.audience_id == audience_id, memberships.c.user_id > after, _due(memberships, now)
        )
        .order_by(memberships.c.user_id)
        .limit(limit)
        .subquery("next_users")
    )
    m = memberships.alias("m")
    return (
        sa.select(m.c.audience_id, m.c.user_id, m.c.desired, m.c.unknown, m.c.failures)
        .where(
            _due(m, now),
            m.c.audience_id.in_(audience_ids),
            m.c.user_id.in_(sa.select(users.c.user_id)),
        )
        .order_by(m.c.user_id, m.c.audience_id)
    )


class Store:
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

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction: SQLite's lock taken up front, the lease checked first."""
        with write_connection(self.engine) as conn, conn.begin():
            if self.fence is not None:
                self.fence(conn)
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read transaction; on SQLite it never takes the write lock (WAL)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # --- audiences and runs ---

    def ensure_audience(self, key: str, name: str) -> Audience:
        with self._write() as conn:
            row = conn.execute(sa.select(audiences).where(audiences.c.key == key)).one_or_none()
            if row is None:
                conn.execute(sa.insert(audiences).values(key=key, name=name, created_at=self.clock()))
                row = conn.execute(sa.select(audiences).where(audiences.c.key == key)).one()
            elif row.name != name:
                conn.execute(sa.update(audiences).where(audiences.c.id == row.id).values(name=name))
        return Audience(id=row.id, key=row.key, name=name, refreshed_at=row.refreshed_at)

    def start_run(self, cycle_id: str, audience: Audience, mode: str) -> int:
        with self._write() as conn:
            run_id: int = conn.execute(
                sa.insert(sync_runs)
                .values(
                    cycle_id=cycle_id,
                    audience_id=audience.id,
                    mode=mode,
                    status="running",
                    started_at=self.clock(),
                )
                .returning(sync_runs.c.id)
            ).scalar_one()
        return run_id

    def update_run(self, run_id: int, **values: Any) -> None:
        with self._write() as conn:
            conn.execute(sa.update(sync_runs).where(sync_runs.c.id == run_id).values(**values))

    def finish_run(self, run_id: int, status: str, *, error: str | None = None) -> dict[str, Any]:
        """Close a run, counting what is still pending for its audience; returns the run's row.

        A run that would succeed but leaves changes pending or parked is recorded as ``partial``.
        """
        with self._write() as conn:
            audience_id = conn.execute(
                sa.select(sync_runs.c.audience_id).where(sync_runs.c.id == run_id)
            ).scalar_one()
            counts = conn.execute(
                sa.select(
                    sa.func.count().filter(_DELIVERABLE),
                    sa.func.count().filter(memberships.c.parked_at.is_not(None), memberships.c.pending),
                    sa.func.count().filter(memberships.c.unknown == sa.true()),
                ).where(memberships.c.audience_id == audience_id)
            ).one()
            pending, parked, unknown = (int(n or 0) for n in counts)
            if status == "succeeded" and (pending or parked):
                status = "partial"
            conn.execute(
                sa.update(sync_runs)
                .where(sync_runs.c.id == run_id)
                .values(
                    status=status,
                    error=error,
                    finished_at=self.clock(),
                    pending_after=pending,
                    parked_after=parked,
                    unknown_after=unknown,
                )
            )
            return dict(conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id)).one()._mapping)

    def mark_interrupted(self) -> int:
        """Close runs a killed process left open; their unacknowledged changes are still pending.

        Only safe under the writer lease: any run still open then belongs to a dead process.
        """
        with self._write() as conn:
            return conn.execute(
                sa.update(sync_runs)
                .where(sync_runs.c.status == "running")
                .values(status="interrupted", finished_at=self.clock(), error="the process stopped mid-run")
            ).rowcount

    # --- the diff ---

    def refresh(
        self,
        audience: Audience,
        run_id: int,
        batches: Iterable[list[str]],
        *,
        full: bool,
        guard: Guard | None = None,
    ) -> Refresh:
        """Make the audience's snapshot equal ``batches`` (the source's ids), recording each change.

        The source is read completely into a session-scoped TEMP table first,
        one short transaction per batch, so no transaction stays open while a
        slow source streams in (it would hold back VACUUM on PostgreSQL, and
        SQLite's lock is never taken for it). Only then does one write
        transaction apply the diff. A source that fails midway therefore leaves
        the snapshot untouched. When ``guard`` objects to the counts, the whole
        diff is rolled back and the reason returned.
        """
        name = diff.new_stage_name()
        held: str | None = None
        with self.engine.connect() as conn:
            try:
                with conn.begin():
                    diff.create_stage(conn, name)
                for batch in batches:
                    with conn.begin():
                        diff.load_batch(conn, name, batch)
                    failpoints.reach("stage-batch")
                with conn.begin():
                    diff.analyze_stage(conn, name)
                failpoints.reach("after-stage")
                with conn.execution_options(sqlite_begin="IMMEDIATE").begin() as transaction:
                    if self.fence is not None:
                        self.fence(conn)
                    now = self.clock()
                    counts = diff.apply_stage(
                        conn, name, audience_id=audience.id, run_id=run_id, now=now, full=full
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
                    diff.drop_stage(conn, name)
        if held is None and counts.entered + counts.left > ANALYZE_AFTER_CHANGES:
            self._analyze()
        self.update_run(run_id, members=counts.members, entered=counts.entered, left=counts.left)
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

    # --- delivery ---

    def pending_page(
        self, audience_id: int, audience_ids: Sequence[int], after: str, limit: int
    ) -> list[PendingChange]:
        """The next ``limit`` users after ``after`` with a deliverable change in ``audience_id``,
        with all their deliverable changes in ``audience_ids``, ordered by user.

        Keyset pagination by user id over the primary key: rows acknowledged or
        failed meanwhile never make a page repeat or skip anyone.
        """
        with self._read() as conn:
            rows = conn.execute(pending_page_query(audience_id, audience_ids, after, limit, self.clock()))
            return [PendingChange(r.audience_id, r.user_id, r.desired, r.unknown, r.failures) for r in rows]

    def mark_unknown(self, changes: Sequence[PendingChange]) -> None:
        """Write-ahead for calls about to go out: until a verdict is stored, Gleap may hold either value."""
        if not changes:
            return
        with self._write() as conn:
            conn.execute(
                sa.text("UPDATE memberships SET unknown = true WHERE audience_id = :a AND user_id = :u"),
                [{"a": c.audience_id, "u": c.user_id} for c in changes],
            )

    def restore_unknown(self, changes: Sequence[PendingChange]) -> None:
        """Calls marked but never sent: give the rows back the mark they had."""
        if not changes:
            return
        with self._write() as conn:
            conn.execute(
                sa.text("UPDATE memberships SET unknown = :k WHERE audience_id = :a AND user_id = :u"),
                [{"a": c.audience_id, "u": c.user_id, "k": c.unknown} for c in changes],
            )

    def record(
        self,
        results: Sequence[Outcome],
        run_ids: dict[int, int],
        *,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
    ) -> None:
        """Store Gleap's answers in one transaction: acknowledged values, failures, the delivery log.

        - 2xx: the value sent is acknowledged, and the outcome is known again.
        - A verdict (a 4xx but 408/429): the call was not applied, so the row's
          unknown mark is what it was before; it counts towards ``max_attempts``,
          and at the limit the change is parked.
        - No verdict (timeout, dropped answer, 5xx, retries used up): Gleap may
          have applied it, so the row stays marked unknown (and pending).
        Every failure pushes the user's next attempt back (``backoff``).
        """
        if not results:
            return
        backoff = backoff or Backoff()
        now = self.clock()
        acked: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        log_rows: list[dict[str, Any]] = []
        tallies: dict[int, dict[str, int]] = {}
        for result in results:
            for change in result.changes:
                row = {"a": change.audience_id, "u": change.user_id, "v": change.value, "s": result.status}
                log_rows.append(
                    {
                        "run_id": run_ids[change.audience_id],
                        "audience_id": change.audience_id,
                        "user_id": change.user_id,
                        "value": change.value,
                        "status": result.status,
                        "error": result.error,
                        "at": now,
                    }
                )
                tally = tallies.setdefault(
                    change.audience_id, dict.fromkeys(("sent", "failed", "unknown", "retries", "rl"), 0)
                )
                tally["retries"] += result.retries
                tally["rl"] += result.rate_limited
                if result.acknowledged:
                    acked.append(row | {"t": now})
                    tally["sent"] += 1
                    continue
                tally["failed"] += 1
                tally["unknown"] += result.unknown
                failed.append(
                    row
                    | {
                        "e": result.error,
                        "t": now,
                        "k": change.unknown or result.unknown,
                        "verdict": result.permanent,
                        "next": now + timedelta(seconds=backoff.delay(change.failures + 1)),
                        "max": max_attempts,
                    }
                )
        with self._write() as conn:
            if acked:
                # The value sent, not the current desired one, becomes acknowledged:
                # if the source changed meanwhile, the row stays pending. If the user
                # left and the row was dropped while the call was in flight, it comes
                # back as a non-member that Gleap has a value for.
                conn.execute(
                    sa.text(
                        "INSERT INTO memberships (audience_id, user_id, desired, acked, resend, unknown, "
                        "changed_at, acked_at, attempts, failures, last_status) "
                        "VALUES (:a, :u, false, :v, false, false, :t, :t, 0, 0, :s) "
                        "ON CONFLICT (audience_id, user_id) DO UPDATE SET acked = excluded.acked, "
                        "resend = false, unknown = false, acked_at = excluded.acked_at, attempts = 0, "
                        "failures = 0, next_attempt_at = NULL, last_status = excluded.last_status, "
                        "last_error = NULL, parked_at = NULL"
                    ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
                    acked,
                )
                leavers = [{"a": row["a"], "u": row["u"]} for row in acked if not row["v"]]
                if leavers:
                    conn.execute(
                        sa.text(
                            "DELETE FROM memberships WHERE audience_id = :a AND user_id = :u "
                            "AND desired = false AND pending = false"
                        ),
                        leavers,
                    )
            if failed:
                # A failure is about the value sent: if the source changed it meanwhile,
                # the new value starts with a clean slate (only the mark is kept).
                conn.execute(
                    sa.text(
                        "UPDATE memberships SET unknown = :k, last_status = :s, last_error = :e, "
                        "failures = CASE WHEN desired = :v THEN failures + 1 ELSE failures END, "
                        "next_attempt_at = CASE WHEN desired = :v THEN :next ELSE next_attempt_at END, "
                        "attempts = CASE WHEN desired = :v AND :verdict THEN attempts + 1 ELSE attempts END, "
                        "parked_at = CASE WHEN desired = :v AND :verdict AND attempts + 1 >= :max THEN :t "
                        "ELSE parked_at END "
                        "WHERE audience_id = :a AND user_id = :u"
                    ).bindparams(
                        sa.bindparam("t", type_=UtcDateTime),
                        sa.bindparam("next", type_=UtcDateTime),
                        sa.bindparam("verdict", type_=sa.Boolean),
                        sa.bindparam("k", type_=sa.Boolean),
                        sa.bindparam("v", type_=sa.Boolean),
                    ),
                    failed,
                )
            conn.execute(sa.insert(deliveries), log_rows)
            for audience_id, tally in tallies.items():
                conn.execute(
                    sa.update(sync_runs)
                    .where(sync_runs.c.id == run_ids[audience_id])
                    .values(
                        sent=sync_runs.c.sent + tally["sent"],
                        failed=sync_runs.c.failed + tally["failed"],
                        unknown=sync_runs.c.unknown + tally["unknown"],
                        retries=sync_runs.c.retries + tally["retries"],
                        rate_limited=sync_runs.c.rate_limited + tally["rl"],
                    )
                )
        failpoints.reach("after-record")

    def pending_count(self, audience_ids: Sequence[int]) -> int:
        """Changes owed to Gleap and not parked (those waiting out a backoff included)."""
        return self._count(_DELIVERABLE, audience_ids)

    def due_count(self, audience_ids: Sequence[int]) -> int:
        """Changes a delivery pass would send now: pending, not parked, past their backoff."""
        return self._count(_due(memberships, self.clock()), audience_ids)

    def _count(self, condition: sa.ColumnElement[bool], audience_ids: Sequence[int]) -> int:
        with self._read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(memberships)
                    .where(condition, memberships.c.audience_id.in_(audience_ids))
                ).scalar_one()
            )

    # --- parked failures ---

    def parked(self, audience_key: str | None = None) -> list[ParkedChange]:
        query = (
            sa.select(
                audiences.c.key,
                memberships.c.user_id,
                memberships.c.desired,
                memberships.c.attempts,
                memberships.c.last_status,
                memberships.c.last_error,
                memberships.c.parked_at,
            )
            .join(audiences, audiences.c.id == memberships.c.audience_id)
            .where(memberships.c.parked_at.is_not(None), memberships.c.pending == sa.true())
            .order_by(audiences.c.key, memberships.c.user_id)
        )
        if audience_key is not None:
            query = query.where(audiences.c.key == audience_key)
        with self._read() as conn:
            return [ParkedChange(*row) for row in conn.execute(query)]

    def requeue(self, audience_key: str | None = None, user_id: str | None = None) -> int:
        """Un-park failed changes so the next run tries them again, with a fresh attempt budget."""
        query = sa.update(memberships).where(memberships.c.parked_at.is_not(None))
        if audience_key is not None:
            ids = sa.select(audiences.c.id).where(audiences.c.key == audience_key).scalar_subquery()
            query = query.where(memberships.c.audience_id == ids)
        if user_id is not None:
            query = query.where(memberships.c.user_id == user_id)
        with self._write() as conn:
            return conn.execute(
                query.values(parked_at=None, attempts=0, failures=0, next_attempt_at=None)
            ).rowcount

    # --- status -----------------------------------------------------------------

    def set_next_run(self, audience_key: str, when: datetime | None) -> None:
        with self._write() as conn:
            conn.execute(sa.update(audiences).where(audiences.c.key == audience_key).values(next_run_at=when))

    def status(self) -> list[AudienceStatus]:
        """Per audience: members, pending, parked, the last run and the next. Reads only, never waits."""
        counts = (
            sa.select(
                memberships.c.audience_id,
                sa.func.count().filter(memberships.c.desired == sa.true()).label("members"),
                sa.func.count().filter(_DELIVERABLE).label("pending"),
                sa.func.count()
                .filter(memberships.c.parked_at.is_not(None), memberships.c.pending == sa.true())
                .label("parked"),
                sa.func.count().filter(memberships.c.unknown == sa.true()).label("unknown"),
                sa.func.min(memberships.c.changed_at).filter(_DELIVERABLE).label("oldest_pending_at"),
            )
            .group_by(memberships.c.audience_id)
            .subquery()
        )
        last_ids = (
            sa.select(sync_runs.c.audience_id, sa.func.max(sync_runs.c.id).label("run_id"))
            .group_by(sync_runs.c.audience_id)
            .subquery()
        )
        query = (
            sa.select(
                audiences,
                sa.func.coalesce(counts.c.members, 0).label("members"),
                sa.func.coalesce(counts.c.pending, 0).label("pending"),
                sa.func.coalesce(counts.c.parked, 0).label("parked"),
                sa.func.coalesce(counts.c.unknown, 0).label("unknown"),
                counts.c.oldest_pending_at,
                last_ids.c.run_id,
            )
            .outerjoin(counts, counts.c.audience_id == audiences.c.id)
            .outerjoin(last_ids, last_ids.c.audience_id == audiences.c.id)
            .order_by(audiences.c.key)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
            run_rows = {
                r.id: dict(r._mapping)
                for r in conn.execute(
                    sa.select(sync_runs).where(sync_runs.c.id.in_([r.run_id for r in rows]))
                )
            }
        return [
            AudienceStatus(
                key=r.key,
                name=r.name,
                members=r.members,
                pending=r.pending,
                parked=r.parked,
                unknown=r.unknown,
                oldest_pending_at=r.oldest_pending_at,
                refreshed_at=r.refreshed_at,
                next_run_at=r.next_run_at,
                last_run=run_rows.get(r.run_id),
            )
            for r in rows
        ]

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
