"""`sync` while a daemon holds the store: hand the refresh to the daemon and wait for its outcome.

A daemon never finishes, so waiting for its lease is no answer: `sync --audience KEY`,
`--full` and `--allow-removals` queue a request per audience (``requests.py``), the
daemon's admin desk (``admin.py``) refreshes each at once, and this prints what came of it.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any

from sqlalchemy import Engine

from audiencesync.cli.output import EXIT_INCOMPLETE, EXIT_OK, daemon_holding
from audiencesync.config.loading import Config
from audiencesync.store import store
from audiencesync.store.requests import AdminRequest, AdminRequests, kind_of

# How long `sync` waits for a running daemon to carry its request out (--wait overrides it).
DAEMON_REQUEST_WAIT_SECONDS = 600.0
POLL_SECONDS = 0.5

WHAT = {
    "refresh": "refresh",
    "full": "fully resync",
    "release": "release the removal guard of",
    "release+full": "release and fully resync",
}


def ask_daemon(args: argparse.Namespace, config: Config, engine: Engine, daemon: dict[str, Any]) -> int:
    """Queue the sync's audiences for the daemon holding the store, and wait for the outcome.

    A request nobody picked up in time, or by the time no daemon holds the store any
    more, is withdrawn, so it can't surprise anyone later; one the daemon already
    started is left to finish.
    """
    keys = args.audiences or [a.key for a in config.active]
    kind = kind_of(full=args.full, allow_removals=args.allow_removals)
    queue = AdminRequests(engine, store.utc_now)
    asker = f"{socket.gethostname()} pid {os.getpid()}"
    ids = {key: queue.submit(kind, key, asker) for key in keys}
    wait = DAEMON_REQUEST_WAIT_SECONDS if args.wait is None else args.wait
    who = f"the daemon on {daemon['host']} (pid {daemon['pid']})"
    print(
        f"{who} holds the store; asked it to {WHAT[kind]} {', '.join(keys)} now. "
        f"Waiting up to {wait:g} s for it...",
        flush=True,
    )
    results, gone = _wait(queue, ids, engine, wait, grace=config.sync.lease_seconds)
    status = EXIT_OK
    for key, request in results.items():
        if request.state == "done":
            print(_outcome(key, request.result or {}))
            continue
        status = EXIT_INCOMPLETE
        outcome = request.result or {}
        if request.state == "failed" and outcome.get("status") == "held":
            # Not a failure: the guard waits for a person, and its message says how to release it.
            print(f"{key}: held, nothing was applied: {outcome.get('error')}")
        elif request.state == "failed":
            print(f"{key}: the daemon's refresh failed: {outcome.get('error') or outcome.get('status')}")
        elif gone and queue.cancel(request.id, "no daemon held the store any more"):
            print(
                f"{key}: {who} stopped holding the store before taking the request up; withdrawn, "
                "nothing was changed. Fix: run the command again; with no daemon it runs here"
            )
        elif not gone and queue.cancel(request.id, f"not picked up within {wait:g} s"):
            print(
                f"{key}: {who} did not take the request up within {wait:g} s; withdrawn, nothing was "
                "changed. Fix: check that daemon's log and /healthz (stalled, or busy with a long "
                "refresh of this audience?), then ask again with a longer --wait"
            )
        else:
            print(f"{key}: {who} is still carrying it out; `audiencesync status` shows the outcome")
    return status


def _wait(
    queue: AdminRequests, ids: dict[str, int], engine: Engine, wait: float, *, grace: float
) -> tuple[dict[str, AdminRequest], bool]:
    """Each key's request once all are finished, the wait is over, or no daemon has held the store
    for ``grace`` seconds (a lease's length: time for a standby daemon to take over, and the
    requests with it); then the second item is True."""
    deadline = time.monotonic() + wait
    unheld: float | None = None  # since when no daemon holds the store
    while True:
        results = {key: queue.get(request_id) for key, request_id in ids.items()}
        if all(r.finished for r in results.values()):
            return results, False
        if daemon_holding(engine) is not None:
            unheld = None
        elif unheld is None:
            unheld = time.monotonic()
        elif time.monotonic() - unheld >= grace:
            return results, True
        if time.monotonic() >= deadline:
            return results, False
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def _outcome(key: str, outcome: dict[str, Any]) -> str:
    return (
        f"{key}: {outcome.get('status')} ({outcome.get('mode')}) entered={outcome.get('entered')} "
        f"left={outcome.get('left')}; {outcome.get('pending')} change(s) pending, the daemon delivers them"
    )
