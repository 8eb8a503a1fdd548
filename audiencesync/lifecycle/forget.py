"""Forgetting users for privacy requests: every row the store holds about them, in short batches.

``PER_USER_TABLES`` is the one list of the tables that hold a user's rows; a
table added with a ``user_id`` column is one more line there (a test fails
until it is). With ``in_gleap`` each user's contact is deleted in Gleap first,
and only the users Gleap acknowledged (2xx, or 404: already gone) lose their
rows; a user whose outcome is unknown keeps them, so that asking again is safe.

Nothing here logs or keeps a forgotten id: logs carry counts only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync.errors import GleapAuthError, MissingTokenError
from audiencesync.gleap.client import GleapClient
from audiencesync.store.schema import (
    call_values,
    calls,
    contact_fields,
    events,
    membership_changes,
    memberships,
)
from audiencesync.store.writes import write_connection

log = logging.getLogger(__name__)

# Users per transaction: a batch deletes their rows of every table at once, so a
# running daemon waits at most one batch for the store.
BATCH_SIZE = 500


@dataclass(frozen=True)
class UserRows:
    """A table whose rows belong to a user (by its ``user_id``), and the tables hanging off them."""

    table: sa.Table
    # (child table, its column that refers to this table's ``id``): deleted first (the foreign key).
    children: tuple[tuple[sa.Table, sa.Column[Any]], ...] = ()


# Every table that holds a user's rows. One line per table.
PER_USER_TABLES: tuple[UserRows, ...] = (
    UserRows(memberships),
    UserRows(membership_changes),
    UserRows(calls, children=((call_values, call_values.c.call_id),)),
    UserRows(events),
    UserRows(contact_fields),
)

# Tables with a user_id that `forget` leaves alone, and why.
NOT_PER_USER: dict[str, str] = {
    "forget_users": "the work list of a forget queued for the daemon; emptied as it is carried out",
}


def table_names() -> list[str]:
    """Every table `forget` deletes from, in the order its counts are shown."""
    return [
        name for entry in PER_USER_TABLES for name in (entry.table.name, *(c.name for c, _ in entry.children))
    ]


def delete_users(conn: Connection, user_ids: Sequence[str]) -> dict[str, int]:
    """Delete these users' rows from every per-user table; the rows deleted per table."""
    counts = dict.fromkeys(table_names(), 0)
    if not user_ids:
        return counts
    for entry in PER_USER_TABLES:
        theirs = entry.table.c.user_id.in_(user_ids)
        for child, column in entry.children:
            parents = sa.select(entry.table.c.id).where(theirs)
            counts[child.name] = conn.execute(sa.delete(child).where(column.in_(parents))).rowcount
        counts[entry.table.name] = conn.execute(sa.delete(entry.table).where(theirs)).rowcount
    return counts


def known_users(conn: Connection, user_ids: Sequence[str]) -> set[str]:
    """Those of these users the store holds any row of."""
    if not user_ids:
        return set()
    found = sa.union(
        *(sa.select(e.table.c.user_id).where(e.table.c.user_id.in_(user_ids)) for e in PER_USER_TABLES)
    )
    return set(conn.execute(found).scalars())


@dataclass(frozen=True)
class Kept:
    """A user whose rows stay: Gleap did not acknowledge the deletion."""

    user_id: str
    outcome: str  # unknown (no verdict: Gleap may have deleted it) | refused (a 4xx) | not_attempted
    detail: str | None = None


@dataclass
class Forgotten:
    """What one or more batches did."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(table_names(), 0))
    asked: int = 0  # distinct ids asked, per batch
    found: int = 0  # of them, users the store held rows of
    kept: list[Kept] = field(default_factory=list)
    refused: GleapAuthError | None = None  # Gleap refused the token: nothing after it was tried

    def add(self, other: Forgotten) -> None:
        for name, count in other.counts.items():
            self.counts[name] = self.counts.get(name, 0) + count
        self.asked += other.asked
        self.found += other.found
        self.kept.extend(other.kept)
        self.refused = self.refused or other.refused

    @property
    def complete(self) -> bool:
        return not self.kept and self.refused is None

    def rows(self) -> Iterator[tuple[str, int]]:
        yield from self.counts.items()


# Called in the batch's transaction, after its deletes: the daemon settles its request there.
Settle = Callable[[Connection, Forgotten], None]


def batches(user_ids: Iterable[str], size: int) -> Iterator[list[str]]:
    """Distinct ids (first seen first), ``size`` at a time, read as they come."""
    batch: dict[str, None] = {}
    for user_id in user_ids:
        batch[user_id] = None
        if len(batch) >= size:
            yield list(batch)
            batch = {}
    if batch:
        yield list(batch)


class Forgetter:
    """Seams: the engine, the lease's fence (run in each write), and a Gleap client factory."""

    def __init__(
        self,
        engine: Engine,
        *,
        fence: Callable[[Connection], None] | None = None,
        client: Callable[[], GleapClient] | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.engine = engine
        self.fence = fence
        self.client = client
        self.batch_size = batch_size

    def forget(self, user_ids: Iterable[str], *, in_gleap: bool = False) -> Forgotten:
        """Forget these users, a batch at a time; stops at a refused token (``refused``)."""
        total = Forgotten()
        for batch in batches(user_ids, self.batch_size):
            if total.refused is not None:
                total.kept.extend(Kept(u, "not_attempted") for u in batch)
                total.asked += len(batch)
                continue
            total.add(self.forget_batch(batch, in_gleap=in_gleap))
        return total

    def forget_batch(
        self, user_ids: Sequence[str], *, in_gleap: bool = False, settle: Settle | None = None
    ) -> Forgotten:
        """One batch: Gleap's deletions first (when asked), then one transaction for the store."""
        user_ids = list(dict.fromkeys(user_ids))
        done = Forgotten(asked=len(user_ids))
        acknowledged = user_ids
        if in_gleap and user_ids:
            if self.client is None:
                raise MissingTokenError(MissingTokenError.STORE_ONLY)
            acknowledged, done.kept, done.refused = asyncio.run(self._delete_in_gleap(user_ids))
        with write_connection(self.engine) as conn, conn.begin():
            if self.fence is not None:
                self.fence(conn)
            done.found = len(known_users(conn, user_ids))
            done.counts = delete_users(conn, acknowledged)
            if settle is not None:
                settle(conn, done)
        log.info(
            "forgot %d user(s) (%d had rows, %d row(s) deleted), kept %d",
            len(acknowledged),
            done.found,
            sum(done.counts.values()),
            len(done.kept),
        )
        return done

    async def _delete_in_gleap(
        self, user_ids: Sequence[str]
    ) -> tuple[list[str], list[Kept], GleapAuthError | None]:
        """Delete each contact in Gleap, ``max_concurrency`` at a time: (acknowledged, kept, refused)."""
        assert self.client is not None
        acknowledged: list[str] = []
        kept: list[Kept] = []
        refused: GleapAuthError | None = None
        client = self.client()
        slots = asyncio.Semaphore(client.config.max_concurrency)

        async def delete(user_id: str) -> None:
            nonlocal refused
            async with slots:
                if refused is not None or client.breaker.is_open:
                    kept.append(Kept(user_id, "not_attempted"))
                    return
                try:
                    answer = await client.delete_contact(user_id)
                except GleapAuthError as exc:
                    refused = refused or exc
                    # An earlier attempt with no verdict may have deleted the contact all the same.
                    if exc.maybe_applied:
                        detail = f"an attempt got no verdict, then the token was refused (HTTP {exc.status})"
                        kept.append(Kept(user_id, "unknown", detail))
                    else:
                        kept.append(Kept(user_id, "not_attempted"))
                    return
            if answer.ok or answer.status == 404:  # 404: already gone, as a privacy request wants
                acknowledged.append(user_id)
            elif answer.permanent and not answer.maybe_applied:
                kept.append(Kept(user_id, "refused", answer.error))
            else:  # never sent (no connection): certainly not deleted, so not attempted
                kept.append(
                    Kept(user_id, "unknown" if answer.maybe_applied else "not_attempted", answer.error)
                )

        async with client, asyncio.TaskGroup() as group:
            for user_id in user_ids:
                group.create_task(delete(user_id))
        # In the order asked, not of the answers: the same run prints the same lines.
        order = {user_id: n for n, user_id in enumerate(user_ids)}
        return acknowledged, sorted(kept, key=lambda k: order[k.user_id]), refused
