"""What `status`, `failures` and /metrics read: per-audience counts, the last run, parked changes.

One definition of each count (pending, parked, unknown, fields pending) serves
the command line, the metrics and the sync summary, so they always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync import values
from audiencesync.store.events import counts_by_audience
from audiencesync.store.schema import DELIVERABLE, audience_counts, audiences, events, memberships, sync_runs

# A member whose pending change carries contact fields Gleap has not acknowledged: they
# entered with fields, or their fields changed (a row's value is its fields, acked_value
# the fields of the last 2xx), or they are owed them again (resend: a winner that changed
# with the config's order of audiences, field_winners.py; `sync --full`). Migration 0012.
FIELDS_OWED = sa.and_(
    DELIVERABLE,
    memberships.c.desired == sa.true(),
    memberships.c.value.is_not(None),
    sa.or_(
        memberships.c.value.is_distinct_from(memberships.c.acked_value),
        memberships.c.resend == sa.true(),
    ),
)


@dataclass(frozen=True)
class ParkedChange:
    audience: str
    user_id: str
    value: Any  # the value refused: an audience's membership, a trait's value (JSON); an event's name
    attempts: int
    last_status: int | None
    last_error: str | None
    parked_at: datetime
    event: bool = False

    @property
    def shown(self) -> str:
        """The value as people read it: ``values.shown`` of a change's, an event's name as is."""
        return self.value if self.event else values.shown(self.value)


def refused() -> tuple[sa.ColumnElement[Any], ...]:
    """What a parked membership's refused call carried, for ``parked_change``: the kind, the
    membership, and a trait's value (JSON) while the user has one, else its configured missing
    value (what pending.py sends)."""
    m = memberships.c
    trait_value = sa.case((m.desired == sa.true(), m.value), else_=audiences.c.missing)
    return audiences.c.kind, m.desired, trait_value


def parked_change(key: str, row: Any) -> ParkedChange:
    """A ParkedChange of a row of user_id, ``refused()``, attempts, last_status, last_error, parked_at."""
    user_id, kind, desired, trait_value, *tail = row
    return ParkedChange(key, user_id, values.decode(trait_value) if kind == "trait" else desired, *tail)


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
    events_pending: int = 0  # Audience Entered/Exited events owed to Gleap, not parked
    events_parked: int = 0
    kind: str = "audience"  # audience | trait (members: users with a value)
    fields_pending: int = 0  # members owed a call because Gleap doesn't have their contact fields yet


def parked_changes(
    conn: Connection, audience_key: str | None = None, limit: int | None = None
) -> list[ParkedChange]:
    """Changes parked after repeated rejections, by audience and user (the first ``limit`` of each kind)."""
    query = (
        sa.select(
            audiences.c.key,
            memberships.c.user_id,
            *refused(),
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
    parked = [parked_change(row[0], row[1:]) for row in conn.execute(query.limit(limit))]
    return parked + parked_events(conn, audience_key, limit)


def parked_events(
    conn: Connection, audience_key: str | None = None, limit: int | None = None
) -> list[ParkedChange]:
    """Events parked after repeated rejections, by audience, user and time."""
    query = (
        sa.select(
            audiences.c.key,
            events.c.user_id,
            events.c.name,
            events.c.attempts,
            events.c.last_status,
            events.c.last_error,
            events.c.parked_at,
        )
        .join(audiences, audiences.c.id == events.c.audience_id)
        .where(events.c.parked_at.is_not(None), events.c.acked_at.is_(None))
        .order_by(audiences.c.key, events.c.user_id, events.c.id)
    )
    if audience_key is not None:
        query = query.where(audiences.c.key == audience_key)
    return [ParkedChange(*row, event=True) for row in conn.execute(query.limit(limit))]


def scanned_counts() -> sa.Subquery:
    """Per audience, the counts of ``audience_counts`` read from every memberships row: what
    the counters must always equal (the tests assert it; the benchmark's baseline)."""
    return (
        sa.select(
            memberships.c.audience_id,
            sa.func.count().filter(memberships.c.desired == sa.true()).label("members"),
            sa.func.count().filter(DELIVERABLE).label("pending"),
            sa.func.count()
            .filter(memberships.c.parked_at.is_not(None), memberships.c.pending == sa.true())
            .label("parked"),
            sa.func.count().filter(memberships.c.unknown == sa.true()).label("unknown"),
            sa.func.min(memberships.c.pending_since).filter(DELIVERABLE).label("oldest_pending_at"),
            sa.func.count().filter(FIELDS_OWED).label("fields_pending"),
        )
        .group_by(memberships.c.audience_id)
        .subquery()
    )


def kept_counts() -> sa.Subquery:
    """The same counts from the counters the triggers keep, and the oldest pending change from
    the first entry of its index: a few rows read per audience, however big it is."""
    m = memberships.alias("m")
    oldest = (
        sa.select(sa.func.min(m.c.pending_since))
        .where(
            m.c.audience_id == audience_counts.c.audience_id,
            m.c.pending == sa.true(),
            m.c.parked_at.is_(None),
        )
        .scalar_subquery()
    )
    c = audience_counts.c
    return sa.select(
        c.audience_id,
        c.members,
        c.pending,
        c.parked,
        c.unknown,
        oldest.label("oldest_pending_at"),
        c.fields_pending,
    ).subquery()


def audience_status(conn: Connection, *, scan: bool = False) -> list[AudienceStatus]:
    """Per audience: members, pending, parked, the last run and the next. Reads only, never waits.

    ``scan``: count by reading every row instead of the counters (the benchmark's baseline)."""
    counts = scanned_counts() if scan else kept_counts()
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
            sa.func.coalesce(counts.c.fields_pending, 0).label("fields_pending"),
            counts.c.oldest_pending_at,
            last_ids.c.run_id,
        )
        .outerjoin(counts, counts.c.audience_id == audiences.c.id)
        .outerjoin(last_ids, last_ids.c.audience_id == audiences.c.id)
        .order_by(audiences.c.key)
    )
    rows = conn.execute(query).all()
    event_counts = counts_by_audience(conn, scan=scan)
    run_rows = {
        r.id: dict(r._mapping)
        for r in conn.execute(sa.select(sync_runs).where(sync_runs.c.id.in_([r.run_id for r in rows])))
    }
    return [
        AudienceStatus(
            key=r.key,
            name=r.name,
            members=int(r.members),
            pending=int(r.pending),
            parked=int(r.parked),
            unknown=int(r.unknown),
            oldest_pending_at=r.oldest_pending_at,
            refreshed_at=r.refreshed_at,
            next_run_at=r.next_run_at,
            last_run=run_rows.get(r.run_id),
            events_pending=event_counts.get(r.id, (0, 0))[0],
            events_parked=event_counts.get(r.id, (0, 0))[1],
            kind=r.kind,
            # A trait's value is not contact fields (its rows hold values too).
            fields_pending=int(r.fields_pending) if r.kind == "audience" else 0,
        )
        for r in rows
    ]
