"""Questions an analyst asks of the store: who was in an audience when, and what Gleap was told.

Read-only: these queries never wait for a running sync (WAL on SQLite, MVCC
on PostgreSQL). Held and dry-run cycles leave no trace here, because they
apply nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Engine

from audiencesync.schema import audiences, call_values, calls, membership_changes, memberships


@dataclass(frozen=True)
class Event:
    at: datetime
    audience: str
    user_id: str
    kind: str  # entered | left | told
    value: bool | None = None  # for "told": the value sent
    status: int | None = None  # for "told": Gleap's HTTP status (0: no answer)
    error: str | None = None
    run_id: int | None = None


def history(engine: Engine, user_id: str, audience_key: str | None = None) -> list[Event]:
    """Every membership change of a user and every answer Gleap gave about them, oldest first."""
    changes = (
        sa.select(
            membership_changes.c.at,
            audiences.c.key,
            membership_changes.c.change,
            membership_changes.c.run_id,
        )
        .join(audiences, audiences.c.id == membership_changes.c.audience_id)
        .where(membership_changes.c.user_id == user_id)
    )
    told = (
        sa.select(
            calls.c.at,
            audiences.c.key,
            call_values.c.value,
            calls.c.status,
            calls.c.error,
            call_values.c.run_id,
        )
        .join(call_values, call_values.c.call_id == calls.c.id)
        .join(audiences, audiences.c.id == call_values.c.audience_id)
        .where(calls.c.user_id == user_id)
    )
    if audience_key is not None:
        changes = changes.where(audiences.c.key == audience_key)
        told = told.where(audiences.c.key == audience_key)
    with engine.connect() as conn:
        events = [Event(r.at, r.key, user_id, r.change, run_id=r.run_id) for r in conn.execute(changes)]
        events += [
            Event(r.at, r.key, user_id, "told", r.value, r.status, r.error, r.run_id)
            for r in conn.execute(told)
        ]
    # A change is recorded before Gleap is told about it, even within the same second.
    return sorted(events, key=lambda e: (e.at, e.kind == "told"))


def members_at(engine: Engine, audience_key: str, at: datetime | None = None) -> Iterator[str]:
    """The audience's members at ``at`` (now when None), by user id, streamed in order."""
    audience_id = sa.select(audiences.c.id).where(audiences.c.key == audience_key).scalar_subquery()
    if at is None:
        query = (
            sa.select(memberships.c.user_id)
            .where(memberships.c.audience_id == audience_id, memberships.c.desired == sa.true())
            .order_by(memberships.c.user_id)
        )
    else:
        # A user was a member at `at` when their last change up to then was an entry.
        last = (
            sa.select(membership_changes.c.user_id, sa.func.max(membership_changes.c.id).label("id"))
            .where(membership_changes.c.audience_id == audience_id, membership_changes.c.at <= at)
            .group_by(membership_changes.c.user_id)
            .subquery()
        )
        query = (
            sa.select(membership_changes.c.user_id)
            .join(last, last.c.id == membership_changes.c.id)
            .where(membership_changes.c.change == "entered")
            .order_by(membership_changes.c.user_id)
        )
    with engine.connect() as conn:
        for partition in (
            conn.execution_options(stream_results=True, yield_per=10_000).execute(query).partitions()
        ):
            for row in partition:
                yield row.user_id
