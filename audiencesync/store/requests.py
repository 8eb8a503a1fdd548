"""Admin requests to a running daemon: refresh audiences now, release a held one, or a full resync.

While `audiencesync run` holds the store, `sync --audience KEY`, `sync --allow-removals`
or `sync --full` can't take the lease. Instead the command queues a request here, and the daemon,
which polls the queue every couple of seconds, runs that audience's refresh at once
(with the flag, if any; not waiting for its interval) and writes the outcome back. The asking command waits
for the outcome. Seams: the engine, a clock, and the daemon's lease fence.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync.store.schema import admin_requests
from audiencesync.store.writes import write_connection

REFRESH = "refresh"  # refresh now, as its schedule would (`sync --audience KEY`)
RELEASE = "release"  # refresh once with the mass-removal guard released
FULL = "full"  # re-send every member's current value
RELEASE_FULL = "release+full"  # both at once
# What the daemon's admin desk carries out by refreshing an audience (forget.py's kinds are not).
REFRESH_KINDS = (REFRESH, RELEASE, FULL, RELEASE_FULL)

Clock = Callable[[], datetime]
Fence = Callable[[Connection], None]


@dataclass(frozen=True)
class AdminRequest:
    id: int
    kind: str
    audience_key: str
    requested_at: datetime
    requested_by: str
    state: str  # pending | running | done | failed
    run_id: int | None
    result: dict[str, Any] | None  # the refresh's outcome, or {"error": ...}

    @property
    def full(self) -> bool:
        return self.kind in (FULL, RELEASE_FULL)

    @property
    def allow_removals(self) -> bool:
        return self.kind in (RELEASE, RELEASE_FULL)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


def kind_of(*, full: bool, allow_removals: bool) -> str:
    if full and allow_removals:
        return RELEASE_FULL
    if full:
        return FULL
    return RELEASE if allow_removals else REFRESH


class AdminRequests:
    def __init__(self, engine: Engine, clock: Clock, *, fence: Fence | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.fence = fence  # the daemon's lease check: only the holder may claim or finish

    def submit(self, kind: str, audience_key: str, requested_by: str) -> int:
        with write_connection(self.engine) as conn, conn.begin():
            request_id: int = conn.execute(
                sa.insert(admin_requests)
                .values(
                    kind=kind,
                    audience_key=audience_key,
                    requested_at=self.clock(),
                    requested_by=requested_by,
                    state="pending",
                )
                .returning(admin_requests.c.id)
            ).scalar_one()
        return request_id

    def get(self, request_id: int) -> AdminRequest:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(admin_requests).where(admin_requests.c.id == request_id)).one()
        return _request(row)

    def pending(self, kinds: Collection[str] = REFRESH_KINDS) -> list[AdminRequest]:
        """Pending requests of these kinds, oldest first. Reads only."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(admin_requests)
                .where(admin_requests.c.state == "pending", admin_requests.c.kind.in_(kinds))
                .order_by(admin_requests.c.id)
            ).all()
        return [_request(row) for row in rows]

    def claim(self, request_id: int) -> bool:
        """pending -> running; False when it was cancelled or claimed meanwhile."""
        return self._move(request_id, "pending", state="running", started_at=self.clock())

    def finish(self, request_id: int, *, ok: bool, result: dict[str, Any], run_id: int | None) -> None:
        self._move(
            request_id,
            "running",
            state="done" if ok else "failed",
            finished_at=self.clock(),
            run_id=run_id,
            result=json.dumps(result),
        )

    def cancel(self, request_id: int, reason: str) -> bool:
        """Withdraw a request nobody picked up yet; False when the daemon already started it."""
        return self._move(
            request_id,
            "pending",
            state="failed",
            finished_at=self.clock(),
            result=json.dumps({"error": reason}),
        )

    def _move(self, request_id: int, from_state: str, **values: Any) -> bool:
        with write_connection(self.engine) as conn, conn.begin():
            if self.fence is not None:
                self.fence(conn)
            moved = conn.execute(
                sa.update(admin_requests)
                .where(admin_requests.c.id == request_id, admin_requests.c.state == from_state)
                .values(**values)
            ).rowcount
        return bool(moved)


def _request(row: Any) -> AdminRequest:
    return AdminRequest(
        id=row.id,
        kind=row.kind,
        audience_key=row.audience_key,
        requested_at=row.requested_at,
        requested_by=row.requested_by,
        state=row.state,
        run_id=row.run_id,
        result=json.loads(row.result) if row.result else None,
    )
