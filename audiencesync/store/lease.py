"""The writer lease: one process at a time changes a store.

A row in ``leases`` names the holder and when its claim expires. The holder
renews it from a heartbeat thread every eighth of the TTL, and, while the store is
locked, tries again every few seconds, each try waiting only a little for the lock
(``lease_renewal.py``): a lock shorter than ~80% of the TTL never costs the lease. A
holder that dies stops renewing, so its claim runs out and the next process takes over. Every
write transaction checks that the lease is still ours (fencing), so a holder
that stalled past its expiry can't write over its successor's work.

Expiry is judged by the clocks of the hosts that run audiencesync: keep them
in sync (NTP) when several hosts share one store.

Each time a process takes the lease (a *term*: from an acquisition to the end of
``kept``) it writes a fresh holder token. A thread that belongs to one term (the
daemon's delivery thread, its refresh jobs) binds to it (``bind``): once the
process has taken the lease again, such a thread left over from an earlier term
fails the fence, as another process would, instead of writing beside the new
term's threads. And a bound thread may send to Gleap only while the term's lease
is surely held (``sure``): a holder that stalled past its expiry stops calling.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync.errors import LeaseLostError, StoreBusyError
from audiencesync.store.lease_renewal import (
    Cadence,
    Failing,
    LeaseUnrenewedError,
    bounded,
    expired,
    heartbeat,
    taken,
)
from audiencesync.store.schema import leases
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.store.writes import write_connection

log = logging.getLogger(__name__)

WRITER = "writer"
SEND_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class Holder:
    holder: str
    host: str
    pid: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    role: str = "sync"


def instance_id() -> str:
    """This process's PID namespace and boot: pids are only comparable within the same one.

    Two containers may share a host name and each have a pid 7; only a holder in
    our own namespace, since our own boot, can be judged dead by ``kill(pid, 0)``.
    """
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = "?"
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot = file.read().strip()
    except OSError:
        boot = "?"
    return f"pidns:{namespace} boot:{boot}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class WriterLease:
    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], datetime],
        *,
        ttl_seconds: float = 60.0,
        name: str = WRITER,
        role: str = "sync",
        instance: str | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.ttl = timedelta(seconds=ttl_seconds)
        self.name = name
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.role = role  # "daemon" for `run`: admin commands then ask it instead of waiting
        self.instance = instance if instance is not None else instance_id()
        # What the heartbeat writes into the row for `status` in other processes.
        self.health: Callable[[], tuple[str, datetime | None]] | None = None
        self.holder = self._new_token()
        self._in_term = False  # between an acquisition and the end of ``kept``
        self.valid_until: datetime | None = None  # as last written by this process, on its clock
        # The term a thread works for (``bind``); unbound threads act for the current one.
        self._bound: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f"lease-{id(self)}", default=None
        )
        self.stopping = threading.Event()  # the heartbeat is to end
        self.lost = threading.Event()
        self.loss: LeaseLostError | None = None  # why ``lost`` was set, this term
        self._losing = threading.Lock()
        self.failing: Failing | None = None  # renewals failing since the last that went through
        self.cadence = Cadence.of(ttl_seconds)
        # Set by the try_acquire that took the lease from another holder ("host pid N, why").
        self.took_over: str | None = None

    def _new_token(self) -> str:
        return f"{self.host}:{self.pid}:{uuid.uuid4().hex[:8]}"

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free, expired or already ours; else return who holds it.

        Outside a term, under a fresh holder token (a new term): a claim of this process's
        previous term is taken over at once, and that term's threads then fail the fence."""
        now = self.clock()
        self.took_over = None
        previous = self.holder
        if not self._in_term:
            self.holder = self._new_token()
        values = {
            "holder": self.holder,
            "host": self.host,
            "pid": self.pid,
            "acquired_at": now,
            "renewed_at": now,
            "expires_at": now + self.ttl,
            "role": self.role,
            "instance": self.instance,
        }
        with write_connection(self.engine) as conn, conn.begin():
            # ON CONFLICT: two processes starting at once on an empty table must
            # not both insert; the loser falls through to the conditional update.
            created = conn.execute(
                sa.text(
                    "INSERT INTO leases (name, holder, host, pid, acquired_at, renewed_at, expires_at, "
                    "role, instance) VALUES (:name, :holder, :host, :pid, :acquired_at, :renewed_at, "
                    ":expires_at, :role, :instance) "
                    "ON CONFLICT (name) DO NOTHING"
                ).bindparams(
                    sa.bindparam("acquired_at", type_=UtcDateTime),
                    sa.bindparam("renewed_at", type_=UtcDateTime),
                    sa.bindparam("expires_at", type_=UtcDateTime),
                ),
                {"name": self.name, **values},
            ).rowcount
            if created:
                self._begin_term(now)
                return None
            row = conn.execute(sa.select(leases).where(leases.c.name == self.name)).one()
            # A holder on this host whose process is gone (killed, crashed) need not
            # be waited out: nobody can renew its lease any more. Only believed of a
            # holder in our own PID namespace and boot: a container with the same
            # host name has pids our kernel view doesn't show.
            dead = (
                row.host == self.host
                and row.instance == self.instance
                and row.pid != self.pid
                and not _pid_alive(row.pid)
            )
            taken = conn.execute(
                sa.update(leases)
                .where(
                    leases.c.name == self.name,
                    sa.or_(
                        leases.c.holder.in_((self.holder, previous)),
                        leases.c.expires_at < now,
                        leases.c.holder == row.holder if dead else sa.false(),
                    ),
                )
                .values(**values)
            ).rowcount
            if taken:
                self._begin_term(now)
                if row.holder not in (self.holder, previous):
                    why = "whose process is gone" if dead else "which had expired"
                    log.warning("took over the store's lease from %s pid %s, %s", row.host, row.pid, why)
                    self.took_over = f"{row.host} pid {row.pid}, {why}"
                return None
            return Holder(
                row.holder, row.host, row.pid, row.acquired_at, row.renewed_at, row.expires_at, row.role
            )

    def _begin_term(self, now: datetime) -> None:
        self._in_term = True
        self.valid_until = now + self.ttl
        self.failing = None
        self.loss = None

    def bind(self) -> str:
        """This thread (and what it starts: asyncio tasks, ``to_thread``) works for the current
        term: its writes fail the fence once the lease is lost or taken again. Returns the term."""
        self._bound.set(self.holder)
        return self.holder

    @contextlib.contextmanager
    def bound(self) -> Iterator[str]:
        """``bind`` for the block only (a worker thread that outlives the term's work)."""
        token = self._bound.set(self.holder)
        try:
            yield self.holder
        finally:
            self._bound.reset(token)

    def current(self, term: str) -> bool:
        """``term`` is this process's current one."""
        return term == self.holder and self._in_term

    def sure(self, term: str, margin: float) -> bool:
        """As far as this process can tell without asking the store, ``term``'s lease is held for
        ``margin`` seconds more: after a stall (a frozen VM, a paused process) it is not, until
        the heartbeat renews it, and nothing bound to the term should reach Gleap meanwhile."""
        until = self.valid_until
        return (
            self.current(term)
            and not self.lost.is_set()
            and until is not None
            and self.clock() + timedelta(seconds=margin) < until
        )

    @property
    def send_margin(self) -> float:
        """How long before its expiry, unrenewed, the lease stops being sure enough to call
        Gleap: 5 s, or a tenth of the TTL when less; a request then has time to reach Gleap."""
        return min(SEND_MARGIN_SECONDS, self.ttl.total_seconds() / 10)

    def require(self, term: str, margin: float | None = None) -> None:
        """Raise unless ``term``'s lease is surely held for ``margin`` (``send_margin``)
        seconds more (``sure``): called before each request to Gleap.

        ``LeaseLostError`` when the term's lease is gone (lost, or expired unrenewed);
        ``LeaseUnrenewedError`` while it is only close to its expiry, the store not letting it be
        renewed (locked): the caller pauses its calls, and the lease is not lost for that."""
        if self.sure(term, self.send_margin if margin is None else margin):
            return
        if not self.current(term):
            raise LeaseLostError(
                "this thread's term of the store's lease has ended: no more calls to Gleap from it."
            )
        if self.lost.is_set():
            raise self.loss or LeaseLostError()
        now, until = self.clock(), self.valid_until
        if until is None or now >= until:
            raise self.lose(expired(until or now, now, self.failing, still_ours=False))
        raise LeaseUnrenewedError(until, self.failing)

    def lose(self, error: LeaseLostError) -> LeaseLostError:
        """Mark the term's lease lost, for the first reason found (returned)."""
        with self._losing:
            if self.loss is None:
                self.loss = error
            self.lost.set()
            return self.loss

    def acquire(
        self,
        wait_seconds: float = 0.0,
        *,
        poll_seconds: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        deadline = time.monotonic() + wait_seconds
        while True:
            holder = self.try_acquire()
            if holder is None:
                return
            if time.monotonic() >= deadline:
                raise StoreBusyError(
                    holder=f"{holder.host} pid {holder.pid}",
                    since=holder.acquired_at,
                    expires=holder.expires_at,
                    waited=wait_seconds,
                    daemon=holder.role == "daemon",
                )
            sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))

    def renew(self, *, timeout: float | None = None, health: dict[str, object] | None = None) -> None:
        """Push the expiry a TTL on, waiting at most ``timeout`` seconds for the store's lock.
        ``LeaseLostError`` when the row names another holder (or is gone)."""
        now = self.clock()
        values: dict[str, object] = {"renewed_at": now, "expires_at": now + self.ttl, **(health or {})}
        with write_connection(self.engine) as conn, bounded(conn, timeout):
            renewed = conn.execute(
                sa.update(leases)
                .where(leases.c.name == self.name, leases.c.holder == self.holder)
                .values(**values)
            ).rowcount
            if not renewed:
                row = conn.execute(sa.select(leases).where(leases.c.name == self.name)).one_or_none()
                raise self.lose(taken(row, self.valid_until))
        self.valid_until = now + self.ttl

    def release(self, *, timeout: float | None = None) -> None:
        self._in_term = False
        with write_connection(self.engine) as conn, bounded(conn, timeout):
            conn.execute(sa.delete(leases).where(leases.c.name == self.name, leases.c.holder == self.holder))

    def check(self, conn: Connection) -> None:
        """Fencing: raise unless this process still holds an unexpired lease. Call inside a write.

        On PostgreSQL the row is read FOR SHARE, and that row lock is held until the
        caller's write commits: a takeover's UPDATE of the row waits for it, so the
        check and the write are atomic. (Without it, a holder paused between check
        and commit could write after its successor took over.) SQLite's BEGIN
        IMMEDIATE already serialises every writer.

        A thread bound to an earlier term of this process (``bind``) fails it too, without
        ending the current term.
        """
        term = self._bound.get() or self.holder
        if term != self.holder:
            raise LeaseLostError("this thread's term of the store's lease has ended: it stops writing.")
        if self.lost.is_set():
            raise self.loss or LeaseLostError()
        query = sa.select(leases).where(leases.c.name == self.name)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(read=True)
        row = conn.execute(query).one_or_none()
        if row is None or row.holder != term:
            raise self.lose(taken(row, self.valid_until))
        now = self.clock()
        if row.expires_at < now:
            raise self.lose(expired(row.expires_at, now, self.failing, still_ours=True))

    @contextlib.contextmanager
    def held(self, wait_seconds: float = 0.0) -> Iterator[WriterLease]:
        """Acquire the lease (waiting up to ``wait_seconds``) and keep it for the block."""
        self.acquire(wait_seconds)
        with self.kept():
            yield self

    @contextlib.contextmanager
    def kept(self, *, release: Callable[[], bool] = lambda: True) -> Iterator[WriterLease]:
        """Renew the acquired lease in the background for the block; release it after,
        unless ``release()`` says no (work may still be running)."""
        self.stopping.clear()
        self.lost.clear()
        beat = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            self.stopping.set()
            beat.join()
            self._in_term = False  # the next acquisition is a new term, under a new token
            if release():
                with contextlib.suppress(sa.exc.SQLAlchemyError):
                    # Bounded: a store locked past the lease's end must not hold the stop up.
                    self.release(timeout=self.cadence.attempt)

    def _heartbeat(self) -> None:
        heartbeat(self)
