"""What each page of the web status page shows, read from the store in one snapshot.

Only reads, and never a whole audience: the counts come from the counters the
triggers keep (``status.audience_status``), members over time from the runs'
own counts (``sync_runs.members``, ``entered``, ``left``), parked failures
from an index that holds only them (migration 0009), a user's timeline from
the user id indexes (``audit.timeline``). Every list is a page: runs by keyset
(``before`` a run id; ids follow time, one writer appends them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import audit
from audiencesync.store.runs import APPLIED
from audiencesync.store.schema import audience_counts, audiences, events, leases, memberships, sync_runs
from audiencesync.store.status import AudienceStatus, ParkedChange, audience_status, parked_change, refused

# What a run can end as (runs.py, sync.py), for the runs page's filter.
RUN_STATUSES = ("running", "succeeded", "partial", "held", "failed", "aborted", "interrupted")
SPARK_RUNS = 30  # the overview's small chart: this many refreshes per audience
HISTORY_RUNS = 100  # the audience page's charts
RUNS_PAGE = 25
PARKED_PAGE = 50
TIMELINE_ROWS = 500

_r = sync_runs.c


@dataclass(frozen=True)
class RunPoint:
    run_id: int
    started_at: datetime
    members: int
    entered: int
    left: int
    mode: str = "incremental"  # initial | incremental | full


@dataclass(frozen=True)
class AudienceRow:
    status: AudienceStatus
    state: str  # lifecycle: live, paused, renamed or retired (in no config)
    history: list[RunPoint]  # the recent applied refreshes, oldest first

    @property
    def configured(self) -> bool:
        return self.state != lifecycle.RETIRED

    @property
    def last_run(self) -> dict[str, Any] | None:
        return self.status.last_run


@dataclass(frozen=True)
class DaemonState:
    holder: dict[str, Any] | None  # the writer lease's row
    live: bool  # its lease has not expired
    this_process: str | None  # active | standby, when the daemon serves the page itself


@dataclass(frozen=True)
class Delivery:
    """A run still delivering: what it sent so far, what its audience still owes, and when it may end."""

    audience: str
    run_id: int
    mode: str
    started_at: datetime
    sent: int
    remaining: int
    rate: float  # calls acknowledged or answered per second since the run started
    eta_seconds: float | None  # None: no rate yet
    stale: bool  # no live process holds the store: a run a dead process left open


@dataclass(frozen=True)
class Overview:
    now: datetime
    rows: list[AudienceRow]
    daemon: DaemonState
    deliveries: list[Delivery]


@dataclass(frozen=True)
class AudiencePage:
    row: AudienceRow
    runs: list[dict[str, Any]]  # a page, newest first
    older: int | None  # the `before` of the next page, when there is one
    parked: list[ParkedChange]
    parked_total: int  # changes and events parked (the counters)


@dataclass(frozen=True)
class UserPage:
    user_id: str
    current: list[dict[str, Any]]  # the user's row per audience now
    timeline: list[dict[str, Any]]  # the newest TIMELINE_ROWS, oldest first
    cut: bool  # older entries were left out


@dataclass(frozen=True)
class RunsPage:
    status: str | None
    runs: list[dict[str, Any]]
    older: int | None


def daemon_state(conn: Connection, now: datetime, this_process: str | None = None) -> DaemonState:
    row = conn.execute(sa.select(leases).where(leases.c.name == "writer")).one_or_none()
    holder = dict(row._mapping) if row is not None else None
    live = holder is not None and holder["expires_at"] >= now
    return DaemonState(holder, live, this_process)


def history(conn: Connection, audience_id: int, limit: int) -> list[RunPoint]:
    query = (
        sa.select(_r.id, _r.started_at, _r.members, _r.entered, _r.left, _r.mode)
        .where(_r.audience_id == audience_id, APPLIED)
        .order_by(_r.id.desc())
        .limit(limit)
    )
    return [RunPoint(*row) for row in reversed(conn.execute(query).all())]


def _rows(
    conn: Connection, states: Mapping[str, str], runs: int, key: str | None = None
) -> list[AudienceRow]:
    ids = {key: id_ for key, id_ in conn.execute(sa.select(audiences.c.key, audiences.c.id))}
    rows = [
        AudienceRow(status, lifecycle.state_of(status.key, states), history(conn, ids[status.key], runs))
        for status in audience_status(conn)
        if key is None or status.key == key
    ]
    # As `status` lists them: the live first, then the paused, the renamed and the retired apart.
    return sorted(rows, key=lambda row: _STATE_ORDER.index(row.state))


_STATE_ORDER = (lifecycle.LIVE, lifecycle.PAUSED, lifecycle.RENAMED, lifecycle.RETIRED)


def deliveries(conn: Connection, now: datetime, live: bool) -> list[Delivery]:
    query = (
        sa.select(audiences.c.key, _r.id, _r.mode, _r.started_at, _r.sent, audience_counts.c.pending)
        .join(audiences, audiences.c.id == _r.audience_id)
        .outerjoin(audience_counts, audience_counts.c.audience_id == _r.audience_id)
        .where(_r.status == "running")
        .order_by(_r.id)
    )
    found = []
    for key, run_id, mode, started_at, sent, pending in conn.execute(query):
        elapsed = max((now - started_at).total_seconds(), 1e-9)
        rate = sent / elapsed
        remaining = int(pending or 0)
        eta = remaining / rate if rate > 0 else None
        found.append(Delivery(key, run_id, mode, started_at, sent, remaining, rate, eta, stale=not live))
    return found


def overview(
    conn: Connection, states: Mapping[str, str], now: datetime, this_process: str | None = None
) -> Overview:
    daemon = daemon_state(conn, now, this_process)
    return Overview(now, _rows(conn, states, SPARK_RUNS), daemon, deliveries(conn, now, daemon.live))


def _run_rows(query: sa.Select[Any], conn: Connection, page: int) -> tuple[list[dict[str, Any]], int | None]:
    rows = [dict(r._mapping) for r in conn.execute(query.order_by(_r.id.desc()).limit(page + 1))]
    older = rows[page - 1]["id"] if len(rows) > page else None
    return rows[:page], older


def _run_query() -> sa.Select[Any]:
    return sa.select(sync_runs, audiences.c.key.label("audience"), APPLIED.label("applied")).join(
        audiences, audiences.c.id == _r.audience_id
    )


def audience_page(
    conn: Connection, key: str, states: Mapping[str, str], *, before: int | None = None
) -> AudiencePage | None:
    audience_id = conn.execute(sa.select(audiences.c.id).where(audiences.c.key == key)).scalar_one_or_none()
    if audience_id is None:
        return None
    [row] = _rows(conn, states, HISTORY_RUNS, key)
    query = _run_query().where(_r.audience_id == audience_id)
    if before is not None:
        query = query.where(_r.id < before)
    runs, older = _run_rows(query, conn, RUNS_PAGE)
    total = row.status.parked + row.status.events_parked
    return AudiencePage(row, runs, older, parked(conn, audience_id, key, PARKED_PAGE), total)


def parked(conn: Connection, audience_id: int, key: str, limit: int) -> list[ParkedChange]:
    """The audience's first ``limit`` parked changes, then events, from the parked-only indexes."""
    m, e = memberships.c, events.c
    changes = conn.execute(
        sa.select(m.user_id, *refused(), m.attempts, m.last_status, m.last_error, m.parked_at)
        .join(audiences, audiences.c.id == m.audience_id)
        .where(m.audience_id == audience_id, m.pending == sa.true(), m.parked_at.is_not(None))
        .order_by(m.user_id)
        .limit(limit)
    ).all()
    found = [parked_change(key, row) for row in changes]
    if len(found) < limit:
        parked_events = conn.execute(
            sa.select(e.user_id, e.name, e.attempts, e.last_status, e.last_error, e.parked_at)
            .where(e.audience_id == audience_id, e.parked_at.is_not(None), e.acked_at.is_(None))
            .order_by(e.id)
            .limit(limit - len(found))
        ).all()
        found += [ParkedChange(key, *row, event=True) for row in parked_events]
    return found


def user_page(conn: Connection, user_id: str) -> UserPage:
    m = memberships.c
    current = [
        dict(r._mapping)
        for r in conn.execute(
            sa.select(
                audiences.c.key.label("audience"),
                audiences.c.kind,
                audiences.c.missing,
                m.desired,
                m.acked,
                m.value,
                m.acked_value,
                m.pending,
                m.unknown,
                m.changed_at,
                m.acked_at,
                m.last_status,
                m.last_error,
                m.parked_at,
            )
            .join(audiences, audiences.c.id == m.audience_id)
            .where(m.user_id == user_id)
            .order_by(audiences.c.key)
        )
    ]
    rows = audit.timeline(conn, user_id)
    cut = len(rows) > TIMELINE_ROWS
    timeline = [dict(zip(audit.TIMELINE_COLUMNS, row, strict=True)) for row in rows[-TIMELINE_ROWS:]]
    return UserPage(user_id, current, timeline, cut)


def runs_page(conn: Connection, status: str | None = None, before: int | None = None) -> RunsPage:
    query = _run_query()
    if status is not None:
        query = query.where(_r.status == status)
    if before is not None:
        query = query.where(_r.id < before)
    runs, older = _run_rows(query, conn, RUNS_PAGE * 2)
    return RunsPage(status, runs, older)
