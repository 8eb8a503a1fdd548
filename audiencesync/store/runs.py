"""The runs' bookkeeping: the SQL that opens, updates and closes the rows of ``sync_runs``.

Apart from ``store.py`` because a run is its own record: one per audience
and cycle, opened before its refresh, counted by delivery (``outcomes``,
``events``) and closed with what it left pending. ``Store`` wraps these in
its fenced write transactions.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync.store import events as events_mod
from audiencesync.store.schema import audience_counts, sync_runs


def start_run(conn: Connection, cycle_id: str, audience_id: int, mode: str, *, now: datetime) -> int:
    run_id: int = conn.execute(
        sa.insert(sync_runs)
        .values(
            cycle_id=cycle_id,
            audience_id=audience_id,
            mode=mode,
            status="running",
            started_at=now,
        )
        .returning(sync_runs.c.id)
    ).scalar_one()
    return run_id


def update_run(conn: Connection, run_id: int, **values: Any) -> None:
    conn.execute(sa.update(sync_runs).where(sync_runs.c.id == run_id).values(**values))


def add_field_conflicts(conn: Connection, counts: dict[int, int]) -> None:
    """Add to each run the fields its delivery sent with an earlier audience's value (run id -> n):
    the daemon's delivery passes add theirs as they go."""
    for run_id, count in counts.items():
        if count:
            conn.execute(
                sa.update(sync_runs)
                .where(sync_runs.c.id == run_id)
                .values(field_conflicts=sync_runs.c.field_conflicts + count)
            )


def finish_run(
    conn: Connection,
    run_id: int,
    status: str,
    *,
    error: str | None,
    now: datetime,
    members: int | None = None,
) -> dict[str, Any]:
    """Close a run, counting what is still pending for its audience; returns the run's row.

    A run that would succeed but leaves changes (or events) pending or parked is recorded
    as ``partial``. Its ``members``: those of the snapshot its refresh made, when it applied
    one (``members``), even if a later refresh of the audience has applied its own since (the
    daemon closes a run when its delivery ends); else the members the store holds now: a held
    or failed refresh and a delivery-only run changed nothing (not 0, nor the count a held
    refresh would have left).
    """
    audience_id = conn.execute(
        sa.select(sync_runs.c.audience_id).where(sync_runs.c.id == run_id)
    ).scalar_one()
    # The counters the triggers keep (status.py's counts): a scan of a big audience here
    # would hold the write transaction for seconds.
    c = audience_counts.c
    counts = conn.execute(
        sa.select(c.members, c.pending, c.parked, c.unknown).where(c.audience_id == audience_id)
    ).one_or_none()
    stored, pending, parked, unknown = (int(n) for n in counts) if counts is not None else (0, 0, 0, 0)
    members = stored if members is None else members
    events_owed = sum(events_mod.counts_by_audience(conn, [audience_id]).get(audience_id, (0, 0)))
    if status == "succeeded" and (pending or parked or events_owed):
        status = "partial"
    conn.execute(
        sa.update(sync_runs)
        .where(sync_runs.c.id == run_id)
        .values(
            status=status,
            error=error,
            finished_at=now,
            members=members,
            pending_after=pending,
            parked_after=parked,
            unknown_after=unknown,
        )
    )
    return dict(conn.execute(sa.select(sync_runs).where(sync_runs.c.id == run_id)).one()._mapping)


# A run whose refresh was applied, so its entered/left are changes the snapshot took. A held run
# counted a diff it rolled back; a run whose source failed counted nothing (0 rows read and none
# left): an aborted, interrupted or still running one applied one when its refresh read or removed.
_r = sync_runs.c
APPLIED = sa.and_(
    _r.mode != "delivery",
    sa.or_(
        _r.status.in_(("succeeded", "partial")),
        sa.and_(_r.status.in_(("aborted", "interrupted", "running")), _r.source_rows + _r.left > 0),
    ),
)


def mark_interrupted(conn: Connection, *, now: datetime) -> int:
    """Close runs a killed process left open; their unacknowledged changes are still pending.

    Only safe under the writer lease: any run still open then belongs to a dead process.
    """
    return conn.execute(
        sa.update(sync_runs)
        .where(sync_runs.c.status == "running")
        .values(status="interrupted", finished_at=now, error="the process stopped mid-run")
    ).rowcount


def last_status(conn: Connection, audience_id: int) -> str | None:
    """How the audience's latest run ended (``running`` while it runs); None before its first."""
    status: str | None = conn.execute(
        sa.select(sync_runs.c.status)
        .where(sync_runs.c.audience_id == audience_id)
        .order_by(sync_runs.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    return status
