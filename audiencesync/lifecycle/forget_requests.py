"""A `forget` asked of the running daemon: the queue, and the daemon's side of it.

While `audiencesync run` holds the store, `forget` can't take the lease. It
queues its users instead, a batch per admin request (kind ``forget``, or
``forget+gleap`` for ``--in-gleap``), with the batch's ids in ``forget_users``.
The daemon carries each request out on its delivery thread, between two
delivery passes: no identify call is in flight then, so no answer recorded
after the deletion can bring a user's rows back, and no call can re-create
in Gleap a contact that was just deleted there.

Ids are not kept after the fact: the transaction that deletes a user's rows
deletes their ``forget_users`` row too. The rows left name the users the daemon
could not forget (Gleap's outcome unknown: their store rows stay as well),
until the asking command has read them and deletes them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from audiencesync.errors import StoreError, brief
from audiencesync.lifecycle.forget import Forgetter, Forgotten, Kept
from audiencesync.store.requests import AdminRequest, AdminRequests, Clock, Fence
from audiencesync.store.schema import admin_requests, forget_users
from audiencesync.store.writes import write_connection

log = logging.getLogger(__name__)

FORGET = "forget"  # the store's rows only
FORGET_GLEAP = "forget+gleap"  # Gleap's contact first, then the store's rows
KINDS = (FORGET, FORGET_GLEAP)
UNFINISHED = ("pending", "running")


@dataclass(frozen=True)
class ForgetOutcome:
    """What the daemon did with one request, as the asking command reads it."""

    request: AdminRequest
    forgotten: Forgotten


class ForgetQueue:
    """Seams: the engine, a clock, and the daemon's lease fence (for claiming and settling)."""

    def __init__(self, engine: Engine, clock: Clock, *, fence: Fence | None = None) -> None:
        self.engine = engine
        self.clock = clock
        self.fence = fence
        self.requests = AdminRequests(engine, clock, fence=fence)

    def submit(self, user_ids: Sequence[str], *, in_gleap: bool, requested_by: str) -> int:
        """One request with its users, in one transaction: the daemon never sees half of it."""
        with write_connection(self.engine) as conn, conn.begin():
            request_id: int = conn.execute(
                sa.insert(admin_requests)
                .values(
                    kind=FORGET_GLEAP if in_gleap else FORGET,
                    audience_key="",
                    requested_at=self.clock(),
                    requested_by=requested_by,
                    state="pending",
                )
                .returning(admin_requests.c.id)
            ).scalar_one()
            conn.execute(
                sa.insert(forget_users),
                [{"request_id": request_id, "user_id": u} for u in dict.fromkeys(user_ids)],
            )
        return request_id

    def waiting(self) -> list[int]:
        """Forget requests to carry out, oldest first: pending ones, and running ones.

        Only the lease holder's delivery thread runs them, one at a time and to
        the end, so one found running is left over from a holder that died
        midway: it is carried out again (forgetting twice is harmless).
        """
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(admin_requests.c.id)
                    .where(
                        admin_requests.c.kind.in_(KINDS), admin_requests.c.state.in_(("pending", "running"))
                    )
                    .order_by(admin_requests.c.id)
                ).scalars()
            )

    def users(self, request_id: int) -> list[str]:
        """The request's users still to do."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(forget_users.c.user_id).where(
                        forget_users.c.request_id == request_id, forget_users.c.outcome.is_(None)
                    )
                ).scalars()
            )

    def settle(self, conn: Connection, request_id: int, done: Forgotten) -> None:
        """In the transaction that deleted the rows: drop the forgotten users' ids, mark the kept, finish."""
        kept = {k.user_id: k for k in done.kept}
        conn.execute(
            sa.delete(forget_users).where(
                forget_users.c.request_id == request_id,
                forget_users.c.outcome.is_(None),
                forget_users.c.user_id.not_in(list(kept)) if kept else sa.true(),
            )
        )
        if kept:
            conn.execute(
                sa.update(forget_users)
                .where(forget_users.c.request_id == request_id, forget_users.c.user_id == sa.bindparam("u"))
                .values(outcome=sa.bindparam("o")),
                [{"u": k.user_id, "o": k.outcome} for k in kept.values()],
            )
        result: dict[str, Any] = {
            "counts": done.counts,
            "asked": done.asked,
            "found": done.found,
            "kept": len(kept),
            "error": str(done.refused) if done.refused is not None else None,
            "token_status": done.refused.status if done.refused is not None else None,
        }
        conn.execute(
            sa.update(admin_requests)
            .where(admin_requests.c.id == request_id)
            .values(
                state="done" if done.refused is None else "failed",
                finished_at=self.clock(),
                result=json.dumps(result),
            )
        )

    def fail(self, request_id: int, error: str) -> None:
        """The request could not be carried out: every user still to do is kept, not attempted."""
        with write_connection(self.engine) as conn, conn.begin():
            if self.fence is not None:
                self.fence(conn)
            kept = conn.execute(
                sa.update(forget_users)
                .where(forget_users.c.request_id == request_id, forget_users.c.outcome.is_(None))
                .values(outcome="not_attempted")
            ).rowcount
            conn.execute(
                sa.update(admin_requests)
                .where(admin_requests.c.id == request_id)
                .values(
                    state="failed",
                    finished_at=self.clock(),
                    result=json.dumps({"kept": kept, "error": error}),
                )
            )

    def outcome(self, request_id: int) -> ForgetOutcome:
        """The request as it stands, with its kept users once it finished."""
        request = self.requests.get(request_id)
        result = request.result or {}
        done = Forgotten(asked=result.get("asked", 0), found=result.get("found", 0))
        done.counts.update(result.get("counts", {}))
        if request.finished:
            with self.engine.connect() as conn:
                done.kept = [
                    Kept(row.user_id, row.outcome)
                    for row in conn.execute(
                        sa.select(forget_users.c.user_id, forget_users.c.outcome).where(
                            forget_users.c.request_id == request_id, forget_users.c.outcome.is_not(None)
                        )
                    )
                ]
        return ForgetOutcome(request, done)

    def discard(self, request_id: int) -> None:
        """The asker read the outcome: no id of the request stays behind."""
        with write_connection(self.engine) as conn, conn.begin():
            conn.execute(sa.delete(forget_users).where(forget_users.c.request_id == request_id))

    def withdraw(self, request_id: int, reason: str) -> bool:
        """Withdraw a request the daemon did not start, with its ids; False when it started."""
        withdrawn = self.requests.cancel(request_id, reason)
        if withdrawn:
            self.discard(request_id)
        return withdrawn


class ForgetDesk:
    """The daemon's side: carry out each waiting request. Runs on the delivery thread, between passes."""

    def __init__(self, queue: ForgetQueue, forgetter: Callable[[], Forgetter]) -> None:
        self.queue = queue
        self.forgetter = forgetter  # read at each request: a reload may change the token

    def carry_out_waiting(self) -> int:
        """Carry out every waiting request; the number carried out. Store errors propagate."""
        waiting = self.queue.waiting()
        for request_id in waiting:
            self.carry_out(request_id)
        return len(waiting)

    def carry_out(self, request_id: int) -> None:
        request = self.queue.requests.get(request_id)
        if request.state == "pending" and not self.queue.requests.claim(request_id):
            return  # withdrawn by the asker meanwhile
        users = self.queue.users(request_id)
        log.info(
            "admin request %d from %s: forget %d user(s)%s",
            request_id,
            request.requested_by,
            len(users),
            " in Gleap and the store" if request.kind == FORGET_GLEAP else "",
        )
        try:
            self.forgetter().forget_batch(
                users,
                in_gleap=request.kind == FORGET_GLEAP,
                settle=lambda conn, done: self.queue.settle(conn, request_id, done),
            )
        except (SQLAlchemyError, StoreError):
            raise  # passing, or the lease lost: the delivery loop backs off, and the request is redone
        except Exception as exc:
            # Anything else would fail again each time and hold up delivery behind it.
            log.exception("admin request %d (forget) failed", request_id)
            self.queue.fail(request_id, brief(exc))
