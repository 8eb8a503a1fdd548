"""Reading an audience's members from its source database, in batches."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from audiencesync import values
from audiencesync.config.loading import AudienceConfig, SourceConfig, display_url
from audiencesync.config.urls import sqlite_file
from audiencesync.errors import DriverMissingError, SourceError
from audiencesync.refresh import pushdown
from audiencesync.refresh.query_rows import query_rows
from audiencesync.refresh.source_watchdog import Stopped, TimedOut, Watchdog
from audiencesync.refresh.user_ids import (
    MAX_ID_LENGTH,
    SAMPLE_SIZE,
    ReadStats,
    checked_ids,
)
from audiencesync.store import drivers

log = logging.getLogger(__name__)

# Given a query's column names, the function that makes a row's value (canonical
# JSON, or None for no value); it raises values.UnsupportedValue to skip the row.
RowValue = Callable[[Sequence[Any]], str | None]
ValueReader = Callable[[list[str]], RowValue]


def trait_values(columns: list[str]) -> RowValue:
    """A trait's query gives its value in the column ``value`` (values.canonical)."""
    if "value" not in columns:
        raise ValueError(
            f"the query returned the columns {columns} but no 'value'. "
            "Fix: alias the trait's column, e.g. SELECT id AS user_id, plan AS value FROM ..."
        )
    index = columns.index("value")

    def value_of(row: Sequence[Any]) -> str | None:
        raw = row[index]
        return None if raw is None else values.encode(values.canonical(raw))

    return value_of


class Sources:
    """The configured source databases; engines are made on first use and kept."""

    def __init__(self, configs: Mapping[str, SourceConfig], *, batch_size: int = 10_000) -> None:
        self._configs = configs
        self._engines: dict[str, Engine] = {}
        self.batch_size = batch_size
        self._running: set[Watchdog] = set()
        self._lock = threading.Lock()
        self.cancelled = threading.Event()  # stopping: running queries were cancelled, new ones refused

    def cancel(self) -> None:
        """Cancel every running query (the process is stopping), and refuse new ones until ``resume()``.

        Thread-safe, and quick: it only asks each driver to interrupt its statement.
        The interrupted reads raise ``SourceError``; no snapshot is touched.
        """
        with self._lock:
            # Under the lock that read_ids registers under: a read is either
            # registered here (and cancelled) or sees the flag and never starts.
            self.cancelled.set()
            running = list(self._running)
        for watchdog in running:
            watchdog.cancel_until_done()

    def resume(self) -> None:
        self.cancelled.clear()

    def engine(self, name: str) -> Engine:
        """The source's engine; ``DriverMissingError`` when its driver is not installed."""
        if name not in self._engines:
            engine = drivers.create_engine(
                self._configs[name].url, where=f"[sources.{name}] url", pool_pre_ping=True
            )
            drivers.release_idle_sqlite_memory(engine)  # read once a refresh: no cache to keep
            self._engines[name] = engine
        return self._engines[name]

    def require_drivers(self, properties: Iterable[AudienceConfig]) -> None:
        """Refuse, before anything is read, properties whose source's driver is not installed:
        ``DriverMissingError`` naming the first of them, as a read of it would."""
        for audience in properties:
            try:
                self.engine(audience.source)
            except DriverMissingError as exc:
                where = f"{audience.kind} {audience.key!r} (source {audience.source!r})"
                raise DriverMissingError(
                    scheme=exc.scheme, module=exc.module, install=exc.install, where=where, broken=exc.broken
                ) from None

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()

    def read_ids(self, audience: AudienceConfig, stats: ReadStats) -> Iterator[list[str]]:
        """Yield batches of canonical user ids from the audience's query.

        Rows are streamed with a server-side cursor where the driver has one, so
        memory holds one batch at a time. Errors become ``SourceError``s naming
        the audience and the source (its URL with the password masked).
        """
        yield from self._read(audience, stats, None)  # type: ignore[misc]

    def read_values(
        self,
        audience: AudienceConfig,
        stats: ReadStats,
        reader: ValueReader = trait_values,
        *,
        ids_alone: bool = False,
    ) -> Iterator[list[tuple[str, str | None]]]:
        """Yield batches of (canonical user id, value JSON or None) from the query.

        ``reader`` makes each row's value from the columns (by default a trait's
        ``value``). A trait's row whose value is NULL is skipped: that user has no
        value (an audience's row stays, with no value).
        A row whose value can't be sent (``values.UnsupportedValue``) is skipped
        and counted, with samples, in ``stats``; the read goes on. Every check
        of ``read_ids`` holds (bad ids, timeouts, cancelling).

        ``ids_alone``: an audience whose query has no value columns (``reader`` gives
        ``values.no_value``) is read as ``read_ids`` reads it, ids alone rather than (id, None)
        pairs that the caller would take apart again (a million tuples in a first sync).
        """
        yield from self._read(audience, stats, reader, ids_alone)  # type: ignore[misc]

    def _read(
        self, audience: AudienceConfig, stats: ReadStats, reader: ValueReader | None, ids_alone: bool = False
    ) -> Iterator[list[str] | list[tuple[str, str | None]]]:
        source = self._configs[audience.source]
        _refuse_missing_file(audience, source)
        deadline = time.monotonic() + source.timeout_seconds
        try:
            engine = self.engine(source.name)
        except DriverMissingError as exc:
            raise SourceError(
                exc.problem, audience=audience.key, source=source.name, kind=audience.kind
            ) from None
        with self._guarded(audience, source, engine.connect) as conn:
            yield from self._stream(conn, audience, source, stats, deadline, reader, ids_alone)

    def pushable(self, audience: AudienceConfig, conn: Connection) -> bool:
        """Whether the audience's query can run inside the store ``conn`` is connected to
        (``pushdown``): its source is the store's own PostgreSQL database, pushdown is on,
        and the query returns ids alone, of a type whose text is the canonical id."""
        source = self._configs[audience.source]
        if not source.pushdown or audience.kind == "trait" or not pushdown.applies(source.url, conn):
            return False
        # Only planned (LIMIT 0), but under the source's timeout all the same.
        with Watchdog(conn, source.timeout_seconds):
            return pushdown.ids_only(conn, audience.query)

    def push_down(self, audience: AudienceConfig, conn: Connection, stage: str, stats: ReadStats) -> bool:
        """Load the audience's ids into ``stage`` by running its query inside the store, on
        ``conn``, where it is ``pushable``; returns False, having done nothing, elsewhere.

        Every guarantee of the streamed read holds: the same ids, blank and bad ids
        skipped and counted, the timeout, and cancelling; a failure raises the same
        ``SourceError``, and leaves ``conn``'s transaction usable.
        """
        if not self.pushable(audience, conn):
            return False
        source = self._configs[audience.source]
        with self._guarded(audience, source, lambda: contextlib.nullcontext(conn)):
            loaded = pushdown.load_stage(
                conn, stage, audience.query, max_length=MAX_ID_LENGTH, samples=SAMPLE_SIZE
            )
        stats.count_pushed(loaded.rows, loaded.blank, loaded.bad, loaded.samples)
        return True

    @contextlib.contextmanager
    def _guarded(
        self,
        audience: AudienceConfig,
        source: SourceConfig,
        connect: Callable[[], contextlib.AbstractContextManager[Connection]],
    ) -> Iterator[Connection]:
        """A connection to run the audience's query on, under its timeout and ``cancel()``;
        the query's failures become ``SourceError``s naming the audience and the source
        (its URL with the password masked)."""
        try:
            if self.cancelled.is_set():
                raise Stopped()
            with connect() as conn, Watchdog(conn, source.timeout_seconds) as watchdog:
                with self._lock:
                    if self.cancelled.is_set():
                        raise Stopped()
                    self._running.add(watchdog)
                try:
                    yield conn
                except SQLAlchemyError:
                    if self.cancelled.is_set():
                        raise Stopped() from None
                    if watchdog.fired:
                        raise TimedOut() from None
                    raise
                finally:
                    with self._lock:
                        self._running.discard(watchdog)
        except Stopped:
            raise SourceError(
                "the query was cancelled because audiencesync is stopping. The snapshot is untouched; "
                "the next run reads the source again",
                audience=audience.key,
                source=source.name,
                kind=audience.kind,
            ) from None
        except TimedOut:
            raise SourceError(
                f"the query ran past timeout_seconds = {source.timeout_seconds:g} and was cancelled. "
                f"Fix: make the query faster, or raise [sources.{source.name}] timeout_seconds",
                audience=audience.key,
                source=source.name,
                kind=audience.kind,
            ) from None
        except SQLAlchemyError as exc:
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise SourceError(
                f"the query failed on {display_url(source.url)}: {detail}",
                audience=audience.key,
                source=source.name,
                kind=audience.kind,
            ) from exc

    def check(self, audience: AudienceConfig) -> None:
        """Run the audience's query just far enough to see its columns and first row."""
        reader = trait_values if audience.kind == "trait" else None
        for _ in self._read(audience, ReadStats(), reader):
            break

    def _stream(
        self,
        conn: Connection,
        audience: AudienceConfig,
        source: SourceConfig,
        stats: ReadStats,
        deadline: float,
        reader: ValueReader | None = None,
        ids_alone: bool = False,
    ) -> Iterator[list[str] | list[tuple[str, str | None]]]:
        with query_rows(conn, audience.query, self.batch_size) as (columns, partitions):
            if "user_id" not in columns:
                raise SourceError(
                    f"the query returned the columns {columns} but no 'user_id'. "
                    "Fix: alias the id column, e.g. SELECT id AS user_id FROM ...",
                    audience=audience.key,
                    source=source.name,
                    kind=audience.kind,
                )
            index = columns.index("user_id")
            value_of: RowValue | None = None
            if reader is not None:
                try:
                    value_of = reader(columns)
                except ValueError as exc:
                    raise SourceError(
                        str(exc), audience=audience.key, source=source.name, kind=audience.kind
                    ) from None
            keep_none = audience.kind != "trait"  # an audience member with no fields is still a member
            if ids_alone and keep_none and value_of is values.no_value:
                value_of = None  # no value columns: ids alone, as read_ids gives them
            for partition in partitions:
                # Drivers that can't be cancelled are still stopped between batches.
                if self.cancelled.is_set():
                    raise Stopped()
                if time.monotonic() > deadline:
                    raise TimedOut()
                batch = _batch(partition, index, value_of, stats, keep_none)
                if batch:
                    yield batch


def _batch(
    partition: Sequence[Sequence[Any]],
    index: int,
    value_of: RowValue | None,
    stats: ReadStats,
    keep_none: bool,
) -> list[Any]:
    """One partition's rows as a batch, for a read of ids alone (``value_of`` None) and of
    (id, value) pairs alike: each id checked once (``checked_ids``), the rows it skips
    dropped, and every row counted in ``stats``."""
    ids = checked_ids([row[index] for row in partition], stats)
    if value_of is None:
        return ids if None not in ids else [i for i in ids if i is not None]
    if value_of is values.no_value and keep_none:
        # An audience with no field columns: no call per row (14% of a 1M-member read).
        return [(i, None) for i in ids if i is not None]
    return _with_values(partition, ids, value_of, stats, keep_none)


def _with_values(
    partition: Sequence[Sequence[Any]],
    ids: list[str | None],
    value_of: RowValue,
    stats: ReadStats,
    keep_none: bool,
) -> list[tuple[str, str | None]]:
    """(id, value) of the rows kept; a row whose value can't be sent is skipped and counted."""
    batch: list[tuple[str, str | None]] = []
    for row, user_id in zip(partition, ids, strict=True):
        if user_id is None:
            continue
        try:
            value = value_of(row)
        except values.UnsupportedValue as exc:
            stats.skip_value(user_id, exc)
            continue
        if value is None and not keep_none:
            stats.no_value += 1
            continue
        batch.append((user_id, value))
    return batch


def _refuse_missing_file(audience: AudienceConfig, source: SourceConfig) -> None:
    """sqlite3 would create a missing file and read it as an empty audience; refuse instead."""
    path = sqlite_file(source.url)
    if path is not None and not path.exists():
        raise SourceError(
            f"the source file {path} does not exist. Fix: check [sources.{source.name}] url "
            "(relative paths are taken from the config file's directory); audiencesync never "
            "creates a source",
            audience=audience.key,
            source=source.name,
            kind=audience.kind,
        )
