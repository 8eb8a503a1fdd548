"""The store's database: engines set up for one writer and many readers, and schema migrations."""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, event, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import QueuePool, StaticPool

from audiencesync.config.loading import StoreConfig, display_url
from audiencesync.config.urls import sqlite_file
from audiencesync.errors import StoreError, StoreMissingError, brief
from audiencesync.store import drivers
from audiencesync.store.schema import leases
from audiencesync.store.writes import write_connection

log = logging.getLogger(__name__)


def utc_now() -> datetime:
    return datetime.now(UTC)


# Prepared statements the sqlite3 module keeps per connection (its default: 128). The store's
# are large, ~14 KB each (an UPDATE of memberships carries the triggers that keep the counters),
# and a connection kept them all: 5 pooled connections filled towards 9 MB over the first hours
# as each met the rarer statements (issue 22). The hot ones (a delivery pass's, a refresh's)
# stay cached; a rare one is prepared again, well under a millisecond.
SQLITE_CACHED_STATEMENTS = 32


def create_engine(
    url: str, *, create: bool = False, busy_timeout_seconds: float = 30.0, pool_size: int | None = None
) -> Engine:
    """An engine for the store, with SQLite set up for one writer and many readers.

    A SQLite file that does not exist is refused unless ``create``: a typo in
    the URL must not start a new, empty store (and re-send every member).
    A driver that is not installed is a ``DriverMissingError``. ``pool_size``:
    the connections the pool keeps (SQLAlchemy's default, 5, when None), handed
    out last in, first out; see ``fill_pool``.
    """
    path = sqlite_file(url)
    if path is not None and not create and not path.exists():
        raise StoreMissingError(str(path))
    if path is not None and create:
        _create_private(path)
    # The backend read as sqlite_file reads it (make_url), before the engine exists to say so.
    sqlite = make_url(url).get_backend_name() == "sqlite"
    connect_args = {"cached_statements": SQLITE_CACHED_STATEMENTS} if sqlite else {}
    # Last in, first out: the few connections in use most of the time take nearly all the work,
    # and the rest, kept for the moments every thread waits on the store, stay idle. Handed out
    # in turn (SQLAlchemy's default), each of a daemon's 9 connections came to prepare and keep
    # every statement the store runs (the sqlite3 module keeps 32 per connection): on SQLite
    # 1.8-3.7 MB of statements against 0.6-0.8 MB, growing at each kind of outage (issue 22).
    sizing = {} if pool_size is None else {"pool_size": pool_size, "pool_use_lifo": True}
    engine = drivers.create_engine(
        url, where="[store] url", pool_pre_ping=True, connect_args=connect_args, **sizing
    )
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine, busy_timeout_seconds)
    return engine


def _create_private(path: Path) -> None:
    """Create a new SQLite store's file empty (SQLite takes it for an empty database), readable
    by its owner alone whatever the umask: the store holds emails and names. SQLite gives its
    -wal, -shm and journal files the mode of the store's own. A file that exists keeps the mode
    its owner gave it; a path that cannot be created is left for SQLite to report."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    try:
        os.fchmod(fd, 0o600)  # 0o600 even under a umask that takes the owner's bits away
    finally:
        os.close(fd)


def engine_for(config: StoreConfig, *, create: bool = False, pool_size: int | None = None) -> Engine:
    """The engine for a configured store (see ``create_engine``)."""
    return create_engine(
        config.url, create=create, busy_timeout_seconds=config.busy_timeout_seconds, pool_size=pool_size
    )


def fill_pool(engine: Engine) -> int:
    """Open every connection the engine's pool keeps, now, and return how many are open.

    A long-running process whose threads all wait on the store at once (a store lock holds the
    heartbeat, the delivery pass and every refresh) would otherwise open its last connections
    only then, in the middle of its life; those past the pool's size are overflow, closed as
    each is handed back. The memory new connections take (SQLite reads the store's schema into
    each) came back fragmented: a 40 s lock, 8 connections out at once against a pool of 5, left
    the daemon's RSS 1.1 MB higher for good (issue 22). Opened up front and kept, the pool's
    memory is spent during the warm-up, once. Each connection reads a
    table, so that SQLite loads its schema now too. A connection that can't be opened now is
    opened when it is needed, as before: the warning says why.
    """
    pool = engine.pool
    if not isinstance(pool, QueuePool):  # a pool that keeps no set number (one connection, or none)
        return 0
    with contextlib.ExitStack() as held:
        # Held until the pool has them all open (in it or out): one handed back before the next
        # checkout would be taken again. Those other threads have out count as open, and one they
        # hand back meanwhile is taken here rather than a new one opened. The bound is only there
        # for threads that keep handing theirs back.
        for _ in range(2 * pool.size()):
            if pool.checkedin() + pool.checkedout() >= pool.size():
                break
            try:
                conn = held.enter_context(engine.connect())
                conn.execute(sa.select(sa.func.count()).select_from(leases))
            except sa.exc.SQLAlchemyError as exc:
                log.warning("could not open the store's connections ahead of need: %s", brief(exc))
                break
    return pool.checkedin() + pool.checkedout()  # checked out: every thread's, any overflow


def empty_store() -> Engine:
    """A new, empty store in memory at the newest schema: what a dry run plans against when the
    real store does not exist yet. One connection, usable from any thread (the CLI runs the work
    on a worker thread)."""
    engine = sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    _tune_sqlite(engine, 30.0)
    upgrade(engine)
    return engine


def _tune_sqlite(engine: Engine, busy_timeout_seconds: float) -> None:
    drivers.release_idle_sqlite_memory(engine)

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


def _alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(importlib.resources.files("audiencesync.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _known_revisions() -> tuple[str, frozenset[str]]:
    """(the head, every revision) of the migrations this audiencesync ships. Read once per
    process: alembic compiles every script to learn them (~40 ms, on every command and pass),
    and the installed scripts are those of the code running, so they cannot change under it."""
    script = ScriptDirectory.from_config(_alembic_config())
    head = script.get_current_head()
    assert head is not None
    return head, frozenset(rev.revision for rev in script.walk_revisions())


def schema_revisions(engine: Engine) -> tuple[str | None, str]:
    """(the store's revision, the newest this version of audiencesync knows)."""
    head, known = _known_revisions()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except OperationalError as exc:
        raise StoreError(
            f"cannot open the store at {display_url(engine.url.render_as_string(hide_password=False))}: "
            f"{str(exc.orig).strip()}. Fix: check [store] url and that the database is reachable."
        ) from None
    if current is not None and current not in known:
        raise StoreError(
            f"the store is at schema revision {current!r}, made by a newer audiencesync. "
            "Fix: upgrade audiencesync (pip install -U audiencesync); this version will not touch it."
        )
    return current, head


MIGRATION_LOCK_ID = 0x61756473796E63  # "audsync"


def require_head(engine: Engine, reader: str) -> None:
    """For a command that only reads (``audit``, a dry run): it can't read another schema than
    its own, and must not migrate the store itself."""
    current, head = schema_revisions(engine)
    if current != head:
        raise StoreError(
            f"the store is at schema revision {current or 'none'}, not this audiencesync's ({head}); "
            f"{reader} only reads, so it does not migrate it. Fix: run `audiencesync db upgrade` "
            "(a real sync does it by itself)."
        )


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
