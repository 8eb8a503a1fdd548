"""Retiring a key the config no longer has (`audiencesync retire KEY`): its state goes, its history stays.

- **State** is what the store still holds for Gleap: the key's ``memberships``
  (members, pending, unknown and parked changes) and its events not yet
  acknowledged. ``remove_state`` deletes it; Gleap keeps whatever it was told.
- **Unset in Gleap** first (``unset``): the rename's model (renames.py). In one
  transaction every row of the key says "not a member" (``desired = false``), and
  only the rows of users Gleap may hold the key for (acknowledged ``true``, or a call
  with no verdict) stay: each owes ``KEY: false`` (a trait: its ``missing`` value, or
  ``null``), which the normal pending rule and delivery send (``Deliverer``: rate
  limit, write-ahead unknown marks, retries, backoff, parking, breaker), and which
  ``outcomes`` deletes as Gleap acknowledges it. When no row is left, the state is
  gone. The transaction is idempotent, so a kill anywhere leaves either the store
  as it was or rows that the next ``retire KEY --unset-in-gleap`` carries on with,
  re-sending at most the calls whose answers were not recorded.
- **Purge** (``purge``) deletes the history too: its changes, events, runs and
  the call values logged under its runs (a call that carried nothing else goes
  with them), then its ``audiences`` row. In batches, each its own transaction:
  an interrupted purge is finished by the next.

No retirement makes Audience Entered/Exited events: a retired key is not its users
leaving it. Its events still owed are dropped with the state.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync.delivery.deliverer import Deliverer, Progress
from audiencesync.store.database import utc_now
from audiencesync.store.pending_since import since
from audiencesync.store.schema import (
    admin_requests,
    audience_counts,
    audiences,
    call_values,
    calls,
    events,
    membership_changes,
    memberships,
    sync_runs,
)
from audiencesync.store.store import Audience, Store
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.store.writes import fenced_write

# Rows per transaction when deleting (the state of a big audience, a purge).
BATCH_SIZE = 5_000

# The tables whose rows `retire` counts, in the order it shows them.
STATE_TABLES = ("memberships", "events")
HISTORY_TABLES = ("membership_changes", "call_values", "calls", "events", "sync_runs", "audiences")


@dataclass(frozen=True)
class Key:
    """A key's row in the store."""

    id: int
    key: str
    name: str
    kind: str
    missing: str | None = None  # a trait's value for users without one (canonical JSON)

    @property
    def unset(self) -> str:
        """What Gleap is sent to unset the key, as JSON: false, or a trait's missing value (or null)."""
        if self.kind == "audience":
            return "false"
        return self.missing if self.missing is not None else "null"


@dataclass
class Counts:
    """Rows deleted (or that would be) per table."""

    rows: dict[str, int] = field(default_factory=dict)

    def add(self, table: str, n: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + n

    def per_table(self) -> Iterator[tuple[str, int]]:
        return iter(self.rows.items())


@dataclass(frozen=True)
class Owed:
    """What the key still owes Gleap: rows left, of which parked and with an unknown outcome."""

    rows: int
    parked: int
    unknown: int


class Retirer:
    """Seams: the store's engine, a clock, and the writer lease's fence (raises when lost)."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = utc_now,
        fence: Callable[[Connection], None] | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.fence = fence
        self.batch_size = batch_size

    def find(self, key: str) -> Key | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    audiences.c.id, audiences.c.key, audiences.c.name, audiences.c.kind, audiences.c.missing
                ).where(audiences.c.key == key)
            ).one_or_none()
        return None if row is None else Key(int(row.id), row.key, row.name, row.kind, row.missing)

    def stored_keys(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(audiences.c.key).order_by(audiences.c.key)).scalars())

    # --- reading: the dry run, and the outcome --------------------------------------

    def owed(self, key: Key) -> Owed:
        """The rows left: after ``unset``, each one a ``KEY: false`` Gleap has not acknowledged."""
        m = memberships.c
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.count().filter(m.parked_at.is_not(None)),
                    sa.func.count().filter(m.unknown == sa.true()),
                ).where(m.audience_id == key.id)
            ).one()
        return Owed(int(row[0]), int(row[1]), int(row[2]))

    def plan(self, key: Key, *, unset: bool, purge: bool) -> tuple[Counts, int]:
        """What ``retire`` would delete per table, and how many users ``unset`` would send the
        key's false to (those Gleap may hold it for). Reads only."""
        counts = Counts()
        m = memberships.c
        with self.engine.connect() as conn:
            owed = 0
            if unset:
                owed = _count(conn, memberships, m.audience_id == key.id, _may_hold())
            counts.add("memberships", _count(conn, memberships, m.audience_id == key.id))
            counts.add(
                "events", _count(conn, events, events.c.audience_id == key.id, events.c.acked_at.is_(None))
            )
            if purge:
                counts.add("membership_changes", _count(conn, membership_changes, _changes_of(key.id)))
                counts.add("call_values", _count(conn, call_values, _values_of(key.id)))
                counts.add("calls", _count(conn, calls, _calls_only_of(key.id)))
                counts.add(
                    "events",
                    _count(conn, events, events.c.audience_id == key.id, events.c.acked_at.is_not(None)),
                )
                counts.add("sync_runs", _count(conn, sync_runs, sync_runs.c.audience_id == key.id))
                counts.add("audiences", 1)
        return counts, owed

    # --- writing ----------------------------------------------------------------------

    def prepare_unset(self, key: Key) -> int:
        """Every row says "not a member", and only those Gleap may hold the key for stay, owing its
        false with a fresh attempt budget; the events still owed go. One transaction, idempotent.
        Returns the rows owed."""
        now = self.clock()
        m = memberships.c
        with fenced_write(self.engine, self.fence) as conn:
            conn.execute(sa.delete(events).where(events.c.audience_id == key.id, events.c.acked_at.is_(None)))
            # Gleap never held the key for these: nothing to unset (a full resend owed is moot too).
            conn.execute(sa.delete(memberships).where(m.audience_id == key.id, sa.not_(_may_hold())))
            conn.execute(
                sa.update(memberships)
                .where(m.audience_id == key.id)
                .values(
                    pending_since=since(now),
                    desired=False,
                    value=None,
                    resend=False,
                    changed_at=sa.case(
                        (m.desired == sa.true(), sa.literal(now, type_=UtcDateTime)), else_=m.changed_at
                    ),
                    attempts=0,
                    failures=0,
                    next_attempt_at=None,
                    parked_at=None,
                )
            )
            return _count(conn, memberships, m.audience_id == key.id)

    def unset(
        self,
        key: Key,
        deliverer: Deliverer,
        store: Store,
        *,
        stop: threading.Event | None = None,
        tick: Progress | None = None,
    ) -> dict[str, Any]:
        """One delivery pass of the key's false to the users owed it, under a run of mode
        ``retire``; returns the closed run's row. Raises what ``Deliverer.drain`` raises (token
        refused, Gleap unavailable), after closing the run as aborted."""
        audience = Audience(key.id, key.key, key.name, None, key.kind)
        run_id = store.start_run(str(uuid.uuid4()), audience, "retire")
        try:
            asyncio.run(
                deliverer.drain([key.id], {key.id: key.key}, lambda _id: run_id, stop=stop, tick=tick)
            )
        except BaseException as exc:
            store.finish_run(run_id, "aborted", error=str(exc))
            raise
        return store.finish_run(run_id, "succeeded")

    def remove_state(self, key: Key) -> Counts:
        """Delete the key's memberships and its events not yet acknowledged, in batches."""
        counts = Counts()
        m = memberships.c
        users = (
            sa.select(m.user_id)
            .where(m.audience_id == key.id)
            .order_by(m.user_id)
            .limit(self.batch_size)
            .scalar_subquery()
        )
        counts.add(
            "memberships",
            self._batches(sa.delete(memberships).where(m.audience_id == key.id, m.user_id.in_(users))),
        )
        counts.add(
            "events", self._delete_by_id(events, events.c.audience_id == key.id, events.c.acked_at.is_(None))
        )
        return counts

    def purge(self, key: Key) -> Counts:
        """Delete the key's history and its row (after ``remove_state``), in batches."""
        counts = Counts()
        counts.add("membership_changes", self._delete_by_id(membership_changes, _changes_of(key.id)))
        counts.add("events", self._delete_by_id(events, events.c.audience_id == key.id))
        deleted_values, deleted_calls = self._purge_calls(key.id)
        counts.add("call_values", deleted_values)
        counts.add("calls", deleted_calls)
        with fenced_write(self.engine, self.fence) as conn:
            runs = sa.select(sync_runs.c.id).where(sync_runs.c.audience_id == key.id)
            conn.execute(
                sa.update(admin_requests).where(admin_requests.c.run_id.in_(runs)).values(run_id=None)
            )
            counts.add(
                "sync_runs",
                conn.execute(sa.delete(sync_runs).where(sync_runs.c.audience_id == key.id)).rowcount,
            )
            conn.execute(sa.delete(audience_counts).where(audience_counts.c.audience_id == key.id))
            counts.add(
                "audiences", conn.execute(sa.delete(audiences).where(audiences.c.id == key.id)).rowcount
            )
        return counts

    def _purge_calls(self, audience_id: int) -> tuple[int, int]:
        """The call values of the key (and those logged under its runs), and each call left with
        none: a batch of calls at a time."""
        values, emptied = 0, 0
        while True:
            with fenced_write(self.engine, self.fence) as conn:
                ids = list(
                    conn.execute(
                        sa.select(call_values.c.call_id)
                        .where(_values_of(audience_id))
                        .distinct()
                        .limit(self.batch_size)
                    ).scalars()
                )
                if not ids:
                    return values, emptied
                values += conn.execute(
                    sa.delete(call_values).where(call_values.c.call_id.in_(ids), _values_of(audience_id))
                ).rowcount
                left = sa.select(call_values.c.call_id).where(call_values.c.call_id == calls.c.id).exists()
                emptied += conn.execute(sa.delete(calls).where(calls.c.id.in_(ids), ~left)).rowcount

    def _delete_by_id(self, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
        ids = (
            sa.select(table.c.id).where(*where).order_by(table.c.id).limit(self.batch_size).scalar_subquery()
        )
        return self._batches(sa.delete(table).where(table.c.id.in_(ids)))

    def _batches(self, statement: sa.Delete) -> int:
        """Run a statement that deletes up to a batch until it deletes nothing; the rows deleted."""
        total = 0
        while True:
            with fenced_write(self.engine, self.fence) as conn:
                n = conn.execute(statement).rowcount
            total += n
            if not n:
                return total


def _may_hold() -> sa.ColumnElement[bool]:
    """Gleap may hold the key for the user: it acknowledged true (a trait: a value), or a call
    got no verdict (renames.py retires an old key by the same rule)."""
    acked_true = sa.func.coalesce(memberships.c.acked, sa.false()) == sa.true()  # never NULL: NOT works
    return sa.or_(acked_true, memberships.c.unknown == sa.true())


def _changes_of(audience_id: int) -> sa.ColumnElement[bool]:
    return membership_changes.c.audience_id == audience_id


def _values_of(audience_id: int) -> sa.ColumnElement[bool]:
    """The key's call values, and any logged under its runs (an old key of a rename rides its run)."""
    runs = sa.select(sync_runs.c.id).where(sync_runs.c.audience_id == audience_id)
    return sa.or_(call_values.c.audience_id == audience_id, call_values.c.run_id.in_(runs))


def _calls_only_of(audience_id: int) -> sa.ColumnElement[bool]:
    """Calls that carried the key's values and nothing else: a purge deletes them whole."""
    ours = sa.select(call_values.c.call_id).where(_values_of(audience_id))
    theirs = (
        sa.select(call_values.c.call_id)
        .where(call_values.c.call_id == calls.c.id, sa.not_(_values_of(audience_id)))
        .exists()
    )
    return sa.and_(calls.c.id.in_(ours), ~theirs)


def _count(conn: Connection, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())
