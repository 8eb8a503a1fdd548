"""The membership store: engine setup, migrations, and every query on it."""

from __future__ import annotations

import contextlib
import importlib.resources
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Transaction, event
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


def _upgrade_in(conn: Connection) -> None:
    """Migrate inside the caller's open transaction (a rehearsal rolls it back)."""
    command.upgrade(_alembic_config(conn), "head")


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


@dataclass(frozen=True)
class Outcome:
    """Gleap's answer to one call, which carried one or more audiences' values."""

    changes: tuple[PendingChange, ...]
    status: int  # 0 when no answer came
    error: str | None = None
    permanent: bool = False  # Gleap rejected the call itself (400/404/422...), not a passing fault
    retries: int = 0
    rate_limited: int = 0

    @property
    def acknowledged(self) -> bool:
        return 200 <= self.status < 300


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

# What a delivery may pick up: pending and not parked.
_DELIVERABLE = sa.and_(memberships.c.pending == sa.true(), memberships.c.parked_at.is_(None))


def pending_page_query(
    audience_id: int, audience_ids: Sequence[int], after: str, limit: int
) -> sa.Select[Any]:
    """Users after ``after`` with a deliverable change in ``audience_id``, with all their deliverable
    changes in ``audience_ids``; the primary key serves both the filter and the order."""
    users = (
        sa.select(memberships.c.user_id)
        .where(memberships.c.audience_id == audience_id, memberships.c.user_id > after, _DELIVERABLE)
        .order_by(memberships.c.user_id)
        .limit(limit)
        .subquery("next_users")
    )
    m = memberships.alias("m")
    return (
        sa.select(m.c.audience_id, m.c.user_id, m.c.desired)
        .where(
            m.c.pending == sa.true(),
            m.c.parked_at.is_(None),
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
        self._pinned: Connection | None = None

    # Every write goes through _write and every read through _read, so a
    # rehearsal (dry run) can route them all into one transaction it rolls back.

    @contextlib.contextmanager
    def _connection(self, begin: str) -> Iterator[Connection]:
        if self._pinned is not None:
            yield self._pinned
            return
        with self.engine.connect() as conn:
            yield conn.execution_options(sqlite_begin=begin)

    @contextlib.contextmanager
    def _transaction(self, conn: Connection, *, write: bool = False) -> Iterator[Transaction]:
        transaction = conn.begin_nested() if self._pinned is not None else conn.begin()
        with transaction:
            if write and self.fence is not None:
                self.fence(conn)
            yield transaction

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._connection("IMMEDIATE") as conn, self._transaction(conn, write=True):
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._connection("DEFERRED") as conn, self._transaction(conn):
            yield conn

    @contextlib.contextmanager
    def rehearsal(self) -> Iterator[Store]:
        """A view of this store whose writes are all rolled back at the end."""
        current, head = schema_revisions(self.engine)
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_begin="DEFERRED")
            outer = conn.begin()
            try:
                # A dry run against a new or older store sees the schema it
                # would get, and the rollback below takes that back too.
                if current != head:
                    _upgrade_in(conn)
                rehearsal = Store(self.engine, clock=self.clock)
                rehearsal._pinned = conn
                yield rehearsal
            finally:
                outer.rollback()

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
            pending = conn.execute(
                sa.select(sa.func.count())
                .select_from(memberships)
                .where(memberships.c.audience_id == audience_id, memberships.c.pending == sa.true())
            ).scalar_one()
            if status == "succeeded" and pending:
                status = "partial"
            conn.execute(
                sa.update(sync_runs)
                .where(sync_runs.c.id == run_id)
                .values(status=status, error=error, finished_at=self.clock(), pending_after=pending)
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

        The source is read completely into a staging table first; only then does
        one short write transaction apply the diff. A source that fails midway
        therefore leaves the snapshot untouched. When ``guard`` objects to the
        counts, the whole diff is rolled back and the reason returned.
        """
        name = diff.new_stage_name()
        held: str | None = None
        with self._connection("DEFERRED") as conn:
            try:
                # Staging writes only a TEMP table: no lock on the store is held
                # while the (possibly slow) source query streams in.
                with self._transaction(conn):
                    diff.create_stage(conn, name)
                    diff.load_stage(conn, name, batches)
                failpoints.reach("after-stage")
                if self._pinned is None:
                    conn.execution_options(sqlite_begin="IMMEDIATE")
                with self._transaction(conn, write=True) as transaction:
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
                if self._pinned is None:
                    conn.execution_options(sqlite_begin="DEFERRED")
                with self._transaction(conn):
                    diff.drop_stage(conn, name)
        if held is None and self._pinned is None and counts.entered + counts.left > ANALYZE_AFTER_CHANGES:
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
            rows = conn.execute(pending_page_query(audience_id, audience_ids, after, limit))
            return [PendingChange(r.audience_id, r.user_id, r.desired) for r in rows]

    def record(self, results: Sequence[Outcome], run_ids: dict[int, int], *, max_attempts: int = 5) -> None:
        """Store Gleap's answers in one transaction: acknowledged values, failures, the delivery log.

        A permanent failure counts towards ``max_attempts``; at the limit the
        change is parked. A transient one (Gleap unreachable, retries used up)
        stays pending as it was, for the next run.
        """
        if not results:
            return
        now = self.clock()
        acked: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        unreached: list[dict[str, Any]] = []
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
                    change.audience_id, dict.fromkeys(("sent", "failed", "retries", "rl"), 0)
                )
                tally["retries"] += result.retries
                tally["rl"] += result.rate_limited
                if result.acknowledged:
                    acked.append(row | {"t": now})
                    tally["sent"] += 1
                else:
                    (rejected if result.permanent else unreached).append(row | {"e": result.error, "t": now})
                    tally["failed"] += 1
        with self._write() as conn:
            if acked:
                # The value sent, not the current desired one, becomes acknowledged:
                # if the source changed meanwhile, the row stays pending. If the user
                # left and the row was dropped while the call was in flight, it comes
                # back as a non-member that Gleap has a value for.
                conn.execute(
                    sa.text(
                        "INSERT INTO memberships (audience_id, user_id, desired, acked, resend, changed_at, "
                        "acked_at, attempts, last_status) VALUES (:a, :u, false, :v, false, :t, :t, 0, :s) "
                        "ON CONFLICT (audience_id, user_id) DO UPDATE SET acked = excluded.acked, "
                        "resend = false, acked_at = excluded.acked_at, attempts = 0, "
                        "last_status = excluded.last_status, last_error = NULL, parked_at = NULL"
                    ),
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
            if rejected:
                conn.execute(
                    sa.text(
                        "UPDATE memberships SET attempts = attempts + 1, last_status = :s, last_error = :e, "
                        "parked_at = CASE WHEN attempts + 1 >= :max THEN :t ELSE NULL END "
                        "WHERE audience_id = :a AND user_id = :u AND desired = :v"
                    ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
                    [row | {"max": max_attempts} for row in rejected],
                )
            if unreached:
                conn.execute(
                    sa.text(
                        "UPDATE memberships SET last_status = :s, last_error = :e "
                        "WHERE audience_id = :a AND user_id = :u"
                    ),
                    unreached,
                )
            conn.execute(sa.insert(deliveries), log_rows)
            for audience_id, tally in tallies.items():
                conn.execute(
                    sa.update(sync_runs)
                    .where(sync_runs.c.id == run_ids[audience_id])
                    .values(
                        sent=sync_runs.c.sent + tally["sent"],
                        failed=sync_runs.c.failed + tally["failed"],
                        retries=sync_runs.c.retries + tally["retries"],
                        rate_limited=sync_runs.c.rate_limited + tally["rl"],
                    )
                )
        failpoints.reach("after-record")

    def pending_count(self, audience_ids: Sequence[int]) -> int:
        """Changes the next delivery would send (pending and not parked)."""
        with self._read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(memberships)
                    .where(_DELIVERABLE, memberships.c.audience_id.in_(audience_ids))
                ).scalar_one()
            )

    def due_count(self, audience_ids: Sequence[int]) -> int:
        """Changes a delivery could send right now: deliverable, and any per-user backoff elapsed."""
        due = memberships.c.next_attempt_at.is_(None) | (memberships.c.next_attempt_at <= self.clock())
        with self._read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(memberships)
                    .where(_DELIVERABLE, due, memberships.c.audience_id.in_(audience_ids))
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
            return conn.execute(query.values(parked_at=None, attempts=0)).rowcount

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
                sa.func.count().filter(memberships.c.parked_at.is_not(None)).label("parked"),
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
