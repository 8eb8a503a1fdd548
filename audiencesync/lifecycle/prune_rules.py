"""What retention may delete, and how one batch deletes it: the rules of a prune, table by table.

Apart from ``prune.py`` (which runs a prune in batches, and reads the
prunes log) because these rules are the contract of retention: each
``*_deletable`` condition says which rows of a table may go before a time,
and is read both by a prune (inside each batch's transaction) and by its dry
run. The module docstring of ``prune`` says why each rule is safe beside a
running daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync.store import events as events_mod
from audiencesync.store.schema import (
    admin_requests,
    call_values,
    calls,
    events,
    membership_changes,
    memberships,
    sync_runs,
)

# A membership whose history is kept whatever its age: owed to Gleap (pending,
# outcome unknown, a resend), parked, or with Gleap's last refusal on record.
HELD = sa.or_(
    memberships.c.pending == sa.true(),
    memberships.c.parked_at.is_not(None),
    memberships.c.last_error.is_not(None),
)


@dataclass
class Counts:
    """Rows per table: deleted by a prune, or that a dry run would delete."""

    calls: int = 0
    call_values: int = 0
    membership_changes: int = 0
    sync_runs: int = 0
    admin_requests: int = 0
    events: int = 0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def per_table(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.per_table())

    def text(self) -> str:
        return " ".join(f"{table}={n}" for table, n in self.per_table())


# --- what may go -----------------------------------------------------------------


def calls_deletable(before: datetime) -> sa.ColumnElement[bool]:
    v = call_values.alias("held_v")  # an alias: the DELETE of call_values must not correlate with it
    held = (
        sa.select(sa.literal(1))
        .select_from(v.join(memberships, memberships.c.audience_id == v.c.audience_id))
        .where(v.c.call_id == calls.c.id, memberships.c.user_id == calls.c.user_id, HELD)
        .exists()
    )
    return sa.and_(calls.c.at < before, ~held)


def changes_deletable(before: datetime) -> sa.ColumnElement[bool]:
    held = (
        sa.select(sa.literal(1))
        .where(
            memberships.c.audience_id == membership_changes.c.audience_id,
            memberships.c.user_id == membership_changes.c.user_id,
            HELD,
        )
        .exists()
    )
    return sa.and_(membership_changes.c.at < before, ~held)


def requests_deletable(before: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(admin_requests.c.state.in_(("done", "failed")), admin_requests.c.finished_at < before)


def runs_deletable(before: datetime, *, planned: bool = False) -> sa.ColumnElement[bool]:
    """Finished before ``before``, not an audience's latest, and referred to by nothing left.

    ``planned``: what a dry run counts, where "left" means what the prune would keep.
    During a prune, any row still there keeps its run (a row kept for a reason that
    arose meanwhile must not lose its run: the foreign key forbids it).
    """

    def referred(table: sa.Table, column: sa.Column[Any], deletable: sa.ColumnElement[bool]) -> Any:
        query = sa.select(sa.literal(1)).select_from(table).where(column == sync_runs.c.id)
        return query.where(~deletable).exists() if planned else query.exists()

    if planned:
        kept_call = sa.select(sa.literal(1)).where(
            calls.c.id == call_values.c.call_id, ~calls_deletable(before)
        )
        by_value = sa.select(sa.literal(1)).where(call_values.c.run_id == sync_runs.c.id, kept_call.exists())
    else:
        by_value = sa.select(sa.literal(1)).where(call_values.c.run_id == sync_runs.c.id)
    r = sync_runs.alias("latest_r")  # an alias: within a DELETE of sync_runs it must not correlate
    latest = sa.select(sa.func.max(r.c.id)).group_by(r.c.audience_id)
    return sa.and_(
        sync_runs.c.finished_at < before,
        sync_runs.c.status != "running",
        sync_runs.c.id.not_in(latest),
        ~referred(membership_changes, membership_changes.c.run_id, changes_deletable(before)),
        ~by_value.exists(),
        ~referred(admin_requests, admin_requests.c.run_id, requests_deletable(before)),
        ~referred(events, events.c.run_id, events_mod.deletable(before)),
    )


# --- how it goes: one batch -------------------------------------------------------

Delete = Callable[[Connection, Sequence[int], datetime], Counts]


def delete_calls(conn: Connection, ids: Sequence[int], before: datetime) -> Counts:
    # The values first (the foreign key), then the calls left without any: exactly
    # those whose values went, the held ones keeping theirs.
    deletable = sa.select(calls.c.id).where(calls.c.id.in_(ids), calls_deletable(before))
    values = conn.execute(sa.delete(call_values).where(call_values.c.call_id.in_(deletable))).rowcount
    orphan = ~sa.select(sa.literal(1)).where(call_values.c.call_id == calls.c.id).exists()
    gone = conn.execute(sa.delete(calls).where(calls.c.id.in_(ids), orphan)).rowcount
    return Counts(calls=gone, call_values=values)


def delete_changes(conn: Connection, ids: Sequence[int], before: datetime) -> Counts:
    c = membership_changes.c
    where = sa.and_(c.id.in_(ids), changes_deletable(before))
    # RETURNING: the entries this very statement deleted, whatever a daemon commits meanwhile.
    deleted = conn.execute(
        sa.delete(membership_changes).where(where).returning(c.audience_id, c.user_id, c.id, c.change)
    ).all()
    entries = [
        {"b_a": row.audience_id, "b_u": row.user_id, "b_id": row.id}
        for row in deleted
        if row.change == "entered"
    ]
    if entries:
        conn.execute(FORGET_ENTRY_TIME, entries)
    return Counts(membership_changes=len(deleted))


# A departure keeps the time of the entry it closes (entered_at, migration 0015) while that
# entry is stored: the audit shows it as the ex-member's `since`, empty once the entry is gone,
# as when it looked the entry up. The departure closing an entry is the user's first one after
# it (entries and departures alternate).
_later = membership_changes.alias("later")
FORGET_ENTRY_TIME = (
    sa.update(membership_changes)
    .where(
        membership_changes.c.id
        == sa.select(sa.func.min(_later.c.id))
        .where(
            _later.c.audience_id == sa.bindparam("b_a"),
            _later.c.user_id == sa.bindparam("b_u"),
            _later.c.id > sa.bindparam("b_id"),
            _later.c.change == "left",
        )
        .scalar_subquery()
    )
    .values(entered_at=None)
)


def delete_requests(conn: Connection, ids: Sequence[int], before: datetime) -> Counts:
    where = sa.and_(admin_requests.c.id.in_(ids), requests_deletable(before))
    return Counts(admin_requests=conn.execute(sa.delete(admin_requests).where(where)).rowcount)


def delete_events(conn: Connection, ids: Sequence[int], before: datetime) -> Counts:
    where = sa.and_(events.c.id.in_(ids), events_mod.deletable(before))
    return Counts(events=conn.execute(sa.delete(events).where(where)).rowcount)


def delete_runs(conn: Connection, ids: Sequence[int], before: datetime) -> Counts:
    where = sa.and_(sync_runs.c.id.in_(ids), runs_deletable(before))
    return Counts(sync_runs=conn.execute(sa.delete(sync_runs).where(where)).rowcount)


# In this order: runs go last, once what referred to them is gone.
STEPS: tuple[tuple[sa.Table, Callable[[datetime], sa.ColumnElement[bool]], Delete], ...] = (
    (calls, calls_deletable, delete_calls),
    (membership_changes, changes_deletable, delete_changes),
    (admin_requests, requests_deletable, delete_requests),
    (events, events_mod.deletable, delete_events),
    (sync_runs, runs_deletable, delete_runs),
)
