"""Questions an analyst asks of the store: who was in an audience when, what happened to a user,
who entered and left between two instants, and what each run did.

Read-only, and each function reads through the caller's connection, so that
one transaction (one snapshot) answers a whole command: a prune committing
meanwhile can't make the horizon checked and the rows read disagree. These
queries never wait for a running sync (WAL on SQLite, MVCC on PostgreSQL).
Held and dry-run cycles leave no trace here, because they apply nothing.

The order of a user's changes is the order of their ids: a single writer
(the lease) appends them, so ids follow time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync.errors import HistoryPrunedError, UnknownAudienceError
from audiencesync.store.schema import (
    audiences,
    events as events_table,
    membership_changes,
    memberships,
    prunes,
)
from audiencesync.store.schema_views import call_log_view, membership_history_view, run_history_view

# The PostgreSQL sort memory of an audit's transaction (snapshot).
WORK_MEM = "64MB"

# Rows come from the database a batch at a time: a million members never sit in memory.
BATCH = 10_000
STREAM = {"stream_results": True, "yield_per": BATCH}


def _stream(conn: Connection, query: sa.Executable) -> Iterator[Sequence[Any]]:
    # The size given to partitions() too: without it, options passed to execute() alone
    # left SQLAlchemy to fetchall() a PostgreSQL server-side cursor (seen in a profile).
    for partition in conn.execute(query.execution_options(**STREAM)).partitions(BATCH):
        yield from partition


@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """One read-only transaction, for a whole command: it reads the horizon, then its rows, and
    both must see the same store. SQLite's read transaction is a snapshot already; PostgreSQL's
    is one at REPEATABLE READ. There, for this transaction only:

    - ``jit = off``: the planner's estimates over the views are far off while a table has no
      statistics (the tiny audiences table can go long without autovacuum analyzing it), and
      then JIT compiled a one-user timeline for 0.9 s to run it in 1 ms;
    - ``TIME ZONE 'UTC'``: psycopg reads timestamps of a UTC session several times faster
      (the times are UTC whatever the session says);
    - ``work_mem``: the members at an instant sort the departures since it in memory (290,000
      of them after cycle 1 of bench/audit_bench.py: 22 MB, 0.3 s, where the default 4 MB
      spilled them to disk, 0.6 s). One sort per command, in a read-only transaction.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL jit = off")
                conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
                conn.exec_driver_sql(f"SET LOCAL work_mem = '{WORK_MEM}'")
            yield conn


# --- audiences and the horizon ----------------------------------------------------------


@dataclass(frozen=True)
class AuditedAudience:
    key: str
    id: int | None  # None: configured, but no sync has stored it yet
    configured: bool


def audience(conn: Connection, key: str, configured: Collection[str]) -> AuditedAudience:
    """The audience an audit names, from the store first: one that was synced and then removed
    from the config still has its history here, and stays auditable."""
    stored = dict(conn.execute(sa.select(audiences.c.key, audiences.c.id)).all())
    if key in stored or key in configured:
        return AuditedAudience(key, stored.get(key), key in configured)
    raise UnknownAudienceError(
        key, configured=list(configured), stored_only=sorted(set(stored) - set(configured))
    )


def check_horizon(conn: Connection, at: datetime) -> None:
    """Refuse an instant before the latest prune's ``before``: the changes that came earlier may
    be gone, so no answer about that time is exact. Every prunes row counts, an unfinished one
    too (it may have deleted part of its range before it stopped)."""
    latest = conn.execute(
        sa.select(prunes.c.id, prunes.c.before, prunes.c.started_at, prunes.c.by)
        .order_by(prunes.c.before.desc(), prunes.c.id.desc())
        .limit(1)
    ).one_or_none()
    if latest is not None and at < latest.before:
        raise HistoryPrunedError(
            asked=at, before=latest.before, prune_id=latest.id, pruned_at=latest.started_at, by=latest.by
        )


# --- members at an instant --------------------------------------------------------------

MEMBER_COLUMNS = ("user_id", "since")


def members(conn: Connection, audience_id: int, at: datetime | None = None) -> Iterator[Sequence[Any]]:
    """(user_id, since) of each member at ``at`` (now when None), streamed in user id order.

    Rebuilt backward from the current state, so that it needs only the changes
    after ``at`` (a prune keeps those): a member now whose membership began no later
    than ``at`` (``memberships.changed_at``: a member's entry) was a member then, and
    so was everyone with a departure after ``at`` that closed an entry no later than
    ``at`` (``entered_at``, migration 0015): ``entered_at <= at < departure``. A user's
    memberships don't overlap, so at most one of those rows is theirs. ``since`` is
    when the member entered; NULL when that entry was pruned (a prune blanks
    ``entered_at`` as it deletes the entry, and the entry was then before ``at``).

    Each half reads one index range (the departures from the index alone); SQLite and
    PostgreSQL each sort the departures by user and merge them with the members,
    who come in user order from the primary key.
    """
    m = memberships
    current = sa.select(m.c.user_id, m.c.changed_at.label("since")).where(
        m.c.audience_id == audience_id, m.c.desired == sa.true()
    )
    if at is None:
        return _stream(conn, current.order_by(m.c.user_id))
    check_horizon(conn, at)
    c = membership_changes
    departed = sa.select(c.c.user_id, c.c.entered_at.label("since")).where(
        c.c.audience_id == audience_id,
        c.c.at > at,
        c.c.change == "left",
        sa.or_(c.c.entered_at.is_(None), c.c.entered_at <= at),
    )
    halves: list[sa.Select[Any]] = [current.where(m.c.changed_at <= at), departed]
    if conn.dialect.name == "postgresql":
        # Each half ordered in a subquery of its own: PostgreSQL then merges the two (Merge
        # Append), reading the members in order from an index and sorting the departures
        # alone. A plain UNION ALL ... ORDER BY it sorts whole, a million rows (2.3 s against
        # 0.9 s after cycle 1 of bench/audit_bench.py, EXPLAIN ANALYZE). SQLite merges the plain
        # form already (EXPLAIN QUERY PLAN: MERGE (UNION ALL), the departures' temp B-tree).
        ordered = [
            half.order_by(half.selected_columns.user_id).subquery(f"half{i}") for i, half in enumerate(halves)
        ]
        halves = [sa.select(half.c.user_id, half.c.since) for half in ordered]
    return _stream(conn, sa.union_all(*halves).order_by("user_id"))


# --- who entered and who left between two instants --------------------------------------

DIFF_COLUMNS = ("user_id", "change", "at")


def _net_changes(conn: Connection, audience_id: int, start: datetime, end: datetime) -> sa.Subquery:
    """Per user changed in (start, end]: the first and the last of those changes. Changes
    alternate (entered, left, entered...), so the two agree exactly when membership differs."""
    check_horizon(conn, start)
    c = membership_changes
    window = (
        sa.select(c.c.user_id, sa.func.min(c.c.id).label("first_id"), sa.func.max(c.c.id).label("last_id"))
        .where(
            c.c.audience_id == audience_id,
            c.c.at > start,
            c.c.at <= end,
            c.c.change.in_(("entered", "left")),  # a new value ('changed') is no change of membership
        )
        .group_by(c.c.user_id)
        .subquery("changed")
    )
    first, last = membership_changes.alias("first_change"), membership_changes.alias("last_change")
    return (
        sa.select(window.c.user_id, last.c.change, last.c.at)
        .join(first, first.c.id == window.c.first_id)
        .join(last, last.c.id == window.c.last_id)
        .where(first.c.change == last.c.change)
        .subquery("net")
    )


def diff(conn: Connection, audience_id: int, start: datetime, end: datetime) -> Iterator[Sequence[Any]]:
    """(user_id, entered|left, when) of each user whose membership at ``end`` differs from that at
    ``start``, entered first, each by user id; ``when`` is the last change in between."""
    net = _net_changes(conn, audience_id, start, end)
    return _stream(conn, sa.select(net).order_by(net.c.change, net.c.user_id))


# --- a user's timeline ------------------------------------------------------------------

# Most telling first: a table on a narrow terminal keeps the first columns (see cli_audit).
TIMELINE_COLUMNS = (
    "at",
    "audience",
    "event",  # entered | left | changed (a new value) | call
    "value",  # a change: what it means for Gleap (entered: true); a call: the value it carried
    "data",  # the JSON value: a trait's (or contact fields) of a change, or that a call carried
    "result",  # a change: its delivery_state; a call: its outcome
    "status",  # a call: Gleap's HTTP status (0: no answer); a change: the membership's last one
    "attempt",
    "error",  # a call: Gleap's text or what went wrong; a change: the membership's last error
    "run_id",
    "acknowledged_at",
    "call_id",
)


def timeline(conn: Connection, user_id: str, audience_key: str | None = None) -> list[tuple[Any, ...]]:
    """Every change of a user in each audience, every call that carried one, and each
    Audience Entered/Exited event (``track``: its name, state, last answer and how many
    requests carried it, at the time of the last), in time order.

    Read from the views, so that a change's delivery state is the one
    ``membership_history`` gives. Each call comes after the change it carried: the
    last earlier change of the same audience (the view's rule for acknowledged).
    """
    h, log = membership_history_view, call_log_view
    changes = sa.select(
        h.c.at,
        h.c.audience_key.label("audience"),
        h.c.change.label("event"),
        (h.c.change != "left").label("value"),
        h.c.value.label("data"),
        h.c.delivery_state.label("result"),
        h.c.last_status.label("status"),
        sa.null().label("attempt"),
        h.c.last_error.label("error"),
        h.c.run_id,
        h.c.acknowledged_at,
        sa.null().label("call_id"),
    ).where(h.c.user_id == user_id)
    calls = sa.select(
        log.c.at,
        log.c.audience_key.label("audience"),
        sa.literal("call").label("event"),
        log.c.value,
        log.c.data,
        log.c.outcome.label("result"),
        log.c.status,
        log.c.attempt,
        log.c.error,
        log.c.run_id,
        sa.null().label("acknowledged_at"),
        log.c.call_id,
    ).where(log.c.user_id == user_id)
    e = events_table
    tracked = (
        sa.select(
            sa.func.coalesce(e.c.sent_at, e.c.at).label("at"),
            audiences.c.key.label("audience"),
            sa.literal("track").label("event"),
            e.c.name.label("value"),
            sa.null().label("data"),
            sa.case(
                (e.c.acked_at.is_not(None), "acknowledged"),
                (e.c.parked_at.is_not(None), "parked"),
                (e.c.unknown, "unknown"),
                (e.c.failures > 0, "failed"),
                else_="pending",
            ).label("result"),
            e.c.last_status.label("status"),
            e.c.sends.label("attempt"),
            e.c.last_error.label("error"),
            e.c.run_id,
            e.c.acked_at.label("acknowledged_at"),
            sa.null().label("call_id"),
        )
        .join(audiences, audiences.c.id == e.c.audience_id)
        .where(e.c.user_id == user_id)
    )
    if audience_key is not None:
        changes = changes.where(h.c.audience_key == audience_key)
        calls = calls.where(log.c.audience_key == audience_key)
        tracked = tracked.where(audiences.c.key == audience_key)
    events = [tuple(row) for query in (changes, calls, tracked) for row in conn.execute(query)]
    # A change is stored before the call that carries it goes out, even within one clock tick.
    return sorted(events, key=lambda e: (e[0], e[2] == "call", e[-1] or 0, e[1]))


# --- runs -------------------------------------------------------------------------------

# The view's columns, the most telling first (a table cut to the terminal keeps those), the
# counters in the view's order, and what the table can best lose last.
_RUN_FIRST = ("run_id", "audience_key", "started_at", "status", "mode")
_RUN_LAST = ("finished_at", "cycle_id", "error")
RUN_COLUMNS = (
    *_RUN_FIRST,
    *(column.name for column in run_history_view.c if column.name not in _RUN_FIRST + _RUN_LAST),
    *_RUN_LAST,
)


def runs(
    conn: Connection, audience_key: str | None = None, since: datetime | None = None, limit: int = 50
) -> Iterator[Sequence[Any]]:
    """The runs, newest first, with every counter ``sync_runs`` holds (``run_history``)."""
    r = run_history_view
    query = (
        sa.select(*(r.c[name] for name in RUN_COLUMNS))
        .order_by(r.c.started_at.desc(), r.c.run_id.desc())
        .limit(limit)
    )
    if audience_key is not None:
        query = query.where(r.c.audience_key == audience_key)
    if since is not None:
        query = query.where(r.c.started_at >= since)
    return _stream(conn, query)
