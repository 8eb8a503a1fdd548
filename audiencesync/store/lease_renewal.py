"""How the writer lease is renewed through a locked store, and what its loss is called.

The store can be locked for a while with nothing wrong: another process's long write
transaction on SQLite, a row or table lock on PostgreSQL, this process's own large diff
being applied. A renewal that waits for such a lock must neither wait so long that the lease
runs out meanwhile (a busy timeout of 30 s against a 60 s lease did, once), nor give up and
then wait a whole interval before its next try. So the heartbeat renews every eighth of the
TTL, each attempt waits at most a tenth of it for the store's lock (5 s at most), and after
a failed attempt it tries again within a twentieth (2 s at most). A lock of up to ~80% of the
TTL, whenever it starts, then ends with a renewal before the expiry: the last renewal was at
most an eighth before the lock began, and the first after it at most a twentieth after.

Only when the lease's expiry passes with the renewals still failing is the lease lost, and
the loss says so; a takeover is named only when the row names another holder.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync.errors import LeaseLostError, StoreError, iso_time
from audiencesync.store.schema import leases

if TYPE_CHECKING:
    from audiencesync.store.lease import WriterLease

log = logging.getLogger(__name__)

RENEWALS_PER_TTL = 8
ATTEMPT_SECONDS = 5.0  # at most, for one renewal to wait for the store's lock
RETRY_SECONDS = 2.0  # at most, between a failed renewal and the next try

# What holds a store locked against the lease's renewal: named by the fixes here and by
# attention's store_unwritable (alerts/store_unwritable.py), in the same words.
LOCK_CULPRITS = (
    "on SQLite, another process's long write transaction on the file; on PostgreSQL, a lock on "
    "the leases table or row: see pg_locks"
)
FIX_LOCK = (
    f"Fix: find what held the store locked that long ({LOCK_CULPRITS}), or raise [sync] "
    "lease_seconds above the longest such lock. The daemon takes the lease back by itself once "
    "the store answers."
)


@dataclass(frozen=True)
class Cadence:
    interval: float  # between two renewals that went through
    attempt: float  # the most one renewal waits for the store's lock
    retry: float  # between a failed renewal and the next
    probe: float  # between two readings of the daemon's health for the row

    @classmethod
    def of(cls, ttl: float) -> Cadence:
        return cls(
            interval=ttl / RENEWALS_PER_TTL,
            attempt=min(ATTEMPT_SECONDS, ttl / 10),
            retry=min(RETRY_SECONDS, ttl / 20),
            # As often as renewals went before: the probe reads the store, and costs more.
            probe=ttl / 3,
        )


@contextlib.contextmanager
def bounded(conn: Connection, seconds: float | None) -> Iterator[Connection]:
    """A transaction on ``conn`` that waits at most ``seconds`` for a lock (None: the store's own
    wait). SQLite: the connection's busy timeout, put back after (the connection is pooled);
    PostgreSQL: ``lock_timeout`` and ``statement_timeout`` for this transaction alone."""
    if seconds is None:
        with conn.begin():
            yield conn
        return
    ms = max(1, int(seconds * 1000))
    if conn.dialect.name != "sqlite":
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
                # A little longer: a lock is what it waits for, and then the error says so.
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms + 500}")
            yield conn
        return
    # Set on the driver's connection before BEGIN IMMEDIATE (the "begin" event), which is what waits.
    raw: Any = conn.connection.driver_connection
    (previous,) = raw.execute("PRAGMA busy_timeout").fetchone()
    raw.execute(f"PRAGMA busy_timeout = {ms}")
    try:
        with conn.begin():
            yield conn
    finally:
        try:
            raw.execute(f"PRAGMA busy_timeout = {int(previous)}")
        except Exception:
            # Never hand the pool back a connection whose writes give up this soon.
            conn.invalidate()


def reason(exc: BaseException) -> str:
    """Why a renewal failed, as the database said it ("database is locked")."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@dataclass
class Failing:
    """Renewals failing since ``since`` (the lease's clock), the last for ``reason``."""

    since: datetime
    reason: str
    warned: float  # time.monotonic() of the last warning logged about it


class LeaseUnrenewedError(StoreError):
    """The lease is still held, but not surely for long enough to call Gleap: the store has not
    let it be renewed lately. Calls pause until it is; the lease is not lost for that."""

    def __init__(self, until: datetime, failing: Failing | None) -> None:
        why = f" (renewals failing since {iso_time(failing.since)}: {failing.reason})" if failing else ""
        super().__init__(
            f"the store's lease has not been renewed lately{why} and expires at {iso_time(until)} "
            "unless it is: no calls to Gleap until it is renewed. Fix: none needed if the store is "
            "only locked for a moment; the heartbeat keeps trying. Otherwise "
            + FIX_LOCK.removeprefix("Fix: ")
        )


def expired(until: datetime, now: datetime, failing: Failing | None, *, still_ours: bool) -> LeaseLostError:
    """The lease ran out on this process unrenewed, and no other holder is known to have taken it
    (``still_ours``: its row, read just now, still names this process)."""
    if failing is not None:
        what = (
            f"the store's lease expired at {iso_time(until)}: it could not be renewed for "
            f"{(now - failing.since).total_seconds():.0f} s ({failing.reason})"
        )
        fix = FIX_LOCK
    else:
        what = (
            f"the store's lease expired at {iso_time(until)} unrenewed: this process did not renew it "
            "in time (it stalled)"
        )
        fix = "Fix: check for long pauses (swap, a suspended VM) or a clock jump on this host."
    nobody = "; no other process has taken it" if still_ours else ""
    return LeaseLostError(f"{what}{nobody}. This process stopped writing and calling Gleap. {fix}")


def taken(row: Any, until: datetime | None) -> LeaseLostError:
    """Another holder's row, read where this process expected its own."""
    if row is None:
        return LeaseLostError(
            "the store's lease row is gone (deleted by hand?): this process stopped writing and "
            "calling Gleap. Fix: none needed; the daemon takes the lease again when it stands by."
        )
    after = ""
    if until is not None and row.acquired_at >= until:  # else it judged this process dead (same host)
        after = f", after this process's expired at {iso_time(until)}"
    return LeaseLostError(
        f"another process took over the store's lease: {row.host} pid {row.pid} holds it since "
        f"{iso_time(row.acquired_at)}{after}. This process stopped writing and calling Gleap. "
        "Fix: check for long pauses (swap, a suspended VM), a clock jump, or a store this host "
        "could not write to for longer than [sync] lease_seconds."
    )


class HealthProbe:
    """The daemon's health for the lease row, read on a thread of its own: a probe that waits for a
    lock on a table it reads must not hold the renewal up (the row then keeps its last health)."""

    def __init__(self, probe: Callable[[], tuple[str, datetime | None]], every: float) -> None:
        self._probe = probe
        self._every = every
        self._last = -every  # monotonic time of the last reading started
        self._done = threading.Event()
        self._result: dict[str, object] = {}
        self._running = False

    def take(self, wait: float) -> dict[str, object]:
        """Columns for the renewal's UPDATE: a fresh reading when one is due and arrives within
        ``wait`` seconds, else none."""
        if not self._running and time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self._running = True
            self._done.clear()
            threading.Thread(target=self._read, name="lease-health", daemon=True).start()
        if not self._running or not self._done.wait(wait):
            return {}
        self._running = False
        return self._result

    def _read(self) -> None:
        try:
            health, progress_at = self._probe()
            self._result = {"health": health, "progress_at": progress_at}
        except Exception as exc:  # a failing health probe must never stop the renewal
            self._result = {"health": f"unknown: {exc}"}
        self._done.set()


def heartbeat(lease: WriterLease) -> None:
    """The heartbeat thread of a term: renew until ``lease.stopping``, or until the lease is lost."""
    cadence = lease.cadence
    probe = HealthProbe(lease.health, cadence.probe) if lease.health is not None else None
    wait = cadence.interval
    while not lease.stopping.wait(wait):
        now, until = lease.clock(), lease.valid_until
        if until is not None and now >= until:
            _expire(lease, now, until)
            return
        # Never wait for the lock past the expiry: past it the lease is lost, and says why.
        left = (until - now).total_seconds() if until is not None else cadence.attempt
        timeout = max(0.05, min(cadence.attempt, left))
        try:
            health = probe.take(timeout / 2) if probe is not None and lease.failing is None else None
            lease.renew(timeout=timeout, health=health)
        except LeaseLostError as exc:  # the row names another holder
            log.warning("%s", exc)
            return
        except Exception as exc:
            # The store is locked or unreachable for now: try again soon, well before the
            # expiry, rather than a whole interval later. The heartbeat must never die of it.
            _failed(lease, exc)
            wait = cadence.retry
            continue
        if lease.failing is not None:
            log.info(
                "renewed the store's lease again, after %.0f s of failed renewals",
                (now - lease.failing.since).total_seconds(),
            )
            lease.failing = None
        wait = cadence.interval


def _failed(lease: WriterLease, exc: Exception) -> None:
    now, until = lease.clock(), lease.valid_until
    failing = lease.failing
    if failing is None:
        failing = lease.failing = Failing(now, reason(exc), warned=time.monotonic())
    else:
        failing.reason = reason(exc)
        if time.monotonic() - failing.warned < lease.cadence.probe:  # a warning per third of the TTL
            log.debug("could not renew the store's lease: %s", failing.reason)
            return
        failing.warned = time.monotonic()
    since = (now - failing.since).total_seconds()
    log.warning(
        "could not renew the store's lease%s: %s. Trying again every %g s; it expires at %s unless renewed",
        f" (failing for {since:.0f} s)" if since >= 1 else "",
        failing.reason,
        lease.cadence.retry,
        iso_time(until) if until is not None else "?",
    )


def _expire(lease: WriterLease, now: datetime, until: datetime) -> None:
    """The expiry passed unrenewed: the lease is lost. Called a takeover only when its row (read
    when the store lets it be) names another holder."""
    row: Any = None
    try:
        with lease.engine.connect() as conn, bounded(conn, lease.cadence.attempt):
            row = conn.execute(sa.select(leases).where(leases.c.name == lease.name)).one_or_none()
        readable = True
    except Exception:
        readable = False
    if readable and (row is None or row.holder != lease.holder):
        error = taken(row, until)
    else:
        error = expired(until, now, lease.failing, still_ours=readable)
    log.warning("%s", lease.lose(error))
