"""The daemon's side of admin requests: take each pending one, run its refresh, write the outcome.

`sync --audience KEY`, `sync --allow-removals` and `sync --full` queue a request (``requests.py``)
when a daemon holds the store; the daemon polls the queue every couple of
seconds and carries each request out on its scheduler's worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from audiencesync.errors import LeaseLostError, brief
from audiencesync.store.requests import AdminRequest, AdminRequests
from audiencesync.sync.cycle import Run

log = logging.getLogger(__name__)

Refresh = Callable[..., Run | None]  # (key, *, full, allow_removals) -> the run, or None if it did not run


class AdminDesk:
    """Seams: the queue, the daemon's refresh, its busy check, a way to run a job, a pending count."""

    def __init__(
        self,
        requests: AdminRequests,
        *,
        refresh: Refresh,
        busy: Callable[[str], bool],
        submit: Callable[[Callable[[], None], str], None],
        pending_count: Callable[[int], int],
        lease_lost: Callable[[], None],
    ) -> None:
        self.requests = requests
        self.refresh = refresh
        self.busy = busy
        self.submit = submit
        self.pending_count = pending_count
        self.lease_lost = lease_lost

    def poll(self) -> None:
        """Start the refresh each pending request asks for (at most one per audience at a time)."""
        try:
            pending = self.requests.pending()
        except Exception as exc:
            log.warning("can't read admin requests: %s", brief(exc))
            return
        for request in pending:
            if self.busy(request.audience_key):
                continue  # a scheduled refresh is running; the next poll takes it
            try:
                if not self.requests.claim(request.id):
                    continue  # withdrawn by the asker meanwhile
            except LeaseLostError:
                self.lease_lost()
                return
            except Exception as exc:
                log.warning("can't take admin request %d: %s", request.id, brief(exc))
                continue
            log.info(
                "admin request %d from %s: %s %s",
                request.id,
                request.requested_by,
                request.kind,
                request.audience_key,
            )
            self.submit(lambda request=request: self.carry_out(request), f"admin-{request.id}")  # type: ignore[misc]

    def carry_out(self, request: AdminRequest) -> None:
        result: dict[str, Any]
        run_id: int | None = None
        try:
            run = self.refresh(request.audience_key, full=request.full, allow_removals=request.allow_removals)
            if run is None:
                ok = False
                result = {
                    "error": f"the daemon could not refresh {request.audience_key} now "
                    "(stopping, busy, or not in its config); ask again"
                }
            else:
                run_id = run.run_id
                status = run.report.status if run.report.status in ("failed", "held") else "refreshed"
                ok = status == "refreshed"
                result = {
                    "status": status,
                    "mode": run.report.mode,
                    "members": run.report.members,
                    "entered": run.report.entered,
                    "left": run.report.left,
                    "pending": self.pending_count(run.audience.id),
                    "error": run.report.error,
                }
        except Exception as exc:
            log.exception("admin request %d failed", request.id)
            ok, result = False, {"error": brief(exc)}
        try:
            self.requests.finish(request.id, ok=ok, result=result, run_id=run_id)
        except Exception as exc:
            log.error("could not record the outcome of admin request %d: %s", request.id, brief(exc))
