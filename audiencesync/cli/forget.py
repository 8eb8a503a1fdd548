"""`audiencesync forget`: delete users from the store (and their Gleap contacts) for privacy requests.

It only wires: read the ids, then either take the lease and forget them here
(``forget``), or, when a daemon holds the store, queue them for it
(``forget_requests``) and wait for its outcome. The store work is in ``forget``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from audiencesync.cli.formats import add_format_option, write_rows
from audiencesync.cli.help import add_command
from audiencesync.cli.output import EXIT_OK, daemon_holding
from audiencesync.config.loading import Config
from audiencesync.errors import ConfigError, ForgetIncompleteError, GleapAuthError, MissingTokenError
from audiencesync.gleap.client import GleapClient
from audiencesync.lifecycle.forget import BATCH_SIZE, Forgetter, Forgotten, Kept, batches
from audiencesync.lifecycle.forget_requests import ForgetQueue
from audiencesync.refresh.user_ids import canonical_user_id
from audiencesync.store import store
from audiencesync.store.lease import WriterLease

# How long `forget` waits for a running daemon to carry it out, unless --wait says otherwise.
DAEMON_WAIT_SECONDS = 600.0

COMEBACK = (
    "a forgotten user who is still in an audience's source comes back on the next cycle as a new member "
    "(and Gleap is sent their value again): take them out of the source first"
)


def add_forget_command(commands: Any) -> None:
    forget = add_command(
        commands,
        "forget",
        help="delete users' rows from the store (and their Gleap contacts) for privacy requests",
        description="Privacy deletion: remove these users' rows from the store (memberships, history, "
        "calls), with a row of counts per table; --in-gleap deletes each contact in Gleap first. Safe "
        "to repeat, and safe while the daemon runs. A user still in a source comes back next cycle.",
        example=["audiencesync forget u42 u43", "audiencesync forget --in-gleap --from-file erase.txt"],
    )
    forget.add_argument("user_ids", nargs="*", metavar="USER_ID", help="a user id (repeatable)")
    forget.add_argument(
        "--from-file",
        metavar="PATH",
        help="more ids, one a line (blank lines and lines starting with # are skipped); - reads stdin",
    )
    forget.add_argument(
        "--in-gleap",
        action="store_true",
        help="also delete each contact in Gleap; a user's rows go only once Gleap acknowledged",
    )
    forget.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="if a sync holds the store, wait this long for it (default: 0); when a daemon holds it, "
        f"how long to wait for the daemon to carry the forget out (default: {DAEMON_WAIT_SECONDS:g})",
    )
    forget.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        metavar="USERS",
        help=f"users per transaction: a running daemon waits at most one batch (default {BATCH_SIZE})",
    )
    add_format_option(forget)
    forget.set_defaults(handler=cmd_forget)


def cmd_forget(args: argparse.Namespace, config: Config) -> int:
    if not args.user_ids and not args.from_file:
        raise ConfigError("no user to forget", fix="name user ids, or pass --from-file PATH (- for stdin)")
    if args.batch_size < 1:
        raise ConfigError(
            f"--batch-size {args.batch_size} is not a size", fix=f"pass at least 1 (default {BATCH_SIZE})"
        )
    token = config.gleap.api_token
    if args.in_gleap and token is None:
        raise MissingTokenError(MissingTokenError.STORE_ONLY)  # forget has no --dry-run
    ids = _user_ids(args.user_ids, _open_ids(args.from_file))  # the file opens before the store
    engine = store.engine_for(config.store)
    try:
        store.upgrade(engine)
        daemon = daemon_holding(engine)
        if daemon is not None:
            done = _ask_daemon(args, engine, daemon, ids)
        else:
            lease = WriterLease(engine, store.utc_now, ttl_seconds=config.sync.lease_seconds, role="sync")
            with lease.held(args.wait or 0.0):
                client = (lambda: GleapClient(config.gleap, token)) if token is not None else None
                forgetter = Forgetter(engine, fence=lease.check, client=client, batch_size=args.batch_size)
                done = forgetter.forget(ids, in_gleap=args.in_gleap)
    finally:
        engine.dispose()
    _report(done, args)
    if done.refused is not None:
        raise done.refused
    if done.kept:
        raise ForgetIncompleteError([(k.user_id, k.outcome) for k in done.kept])
    return EXIT_OK


def _open_ids(path: str | None) -> IO[str] | None:
    if path is None:
        return None
    if path == "-":
        return sys.stdin
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"--from-file {path}: {exc.strerror}", fix="name a readable file of user ids, one a line"
        ) from None


def _user_ids(arguments: list[str], lines: IO[str] | None) -> Iterator[str]:
    """The ids as the sources write them (``canonical_user_id``), read as they are needed."""
    for value in arguments:
        user_id = canonical_user_id(value)
        if user_id is not None:
            yield user_id
    if lines is None:
        return
    try:
        for line in lines:
            text = line.strip()
            if text and not text.startswith("#"):
                user_id = canonical_user_id(text)
                if user_id is not None:
                    yield user_id
    finally:
        if lines is not sys.stdin:
            lines.close()


def _ask_daemon(
    args: argparse.Namespace, engine: Any, daemon: dict[str, Any], ids: Iterator[str]
) -> Forgotten:
    """Queue the ids for the daemon holding the store, a request per batch, and wait for the outcome.

    Requests the daemon did not start in time are withdrawn with their ids; the
    ids of every request are deleted once its outcome is read.
    """
    queue = ForgetQueue(engine, store.utc_now)
    asker = f"{socket.gethostname()} pid {os.getpid()}"
    requests = [
        queue.submit(b, in_gleap=args.in_gleap, requested_by=asker) for b in batches(ids, args.batch_size)
    ]
    wait = DAEMON_WAIT_SECONDS if args.wait is None else args.wait
    notes = sys.stdout if args.format == "table" else sys.stderr
    print(
        f"the daemon on {daemon['host']} (pid {daemon['pid']}) holds the store; asked it to forget the users "
        f"({len(requests)} request(s)). Waiting up to {wait:g} s for it...",
        file=notes,
        flush=True,
    )
    deadline = time.monotonic() + wait
    unfinished = set(requests)
    while unfinished and time.monotonic() < deadline:
        unfinished = {r for r in unfinished if not queue.requests.get(r).finished}
        if unfinished:
            time.sleep(0.5)
    total = Forgotten()
    for request_id in requests:
        outcome = queue.outcome(request_id)
        if outcome.request.finished:
            total.add(outcome.forgotten)
            result = outcome.request.result or {}
            if result.get("token_status") is not None:
                total.refused = total.refused or GleapAuthError(int(result["token_status"]))
            elif result.get("error"):
                print(f"the daemon could not carry out request {request_id}: {result['error']}", file=notes)
            queue.discard(request_id)
            continue
        users = queue.users(request_id)
        total.asked += len(users)
        if queue.withdraw(request_id, f"not picked up within {wait:g} s"):
            total.kept.extend(Kept(u, "not_attempted") for u in users)
            print(
                f"the daemon did not pick request {request_id} up within {wait:g} s; withdrawn. Fix: check "
                "the daemon's log and /healthz, then ask again (a longer --wait)",
                file=notes,
            )
        else:
            total.kept.extend(Kept(u, "in_progress") for u in users)
            print(
                f"the daemon is still carrying out request {request_id}; run the forget again later",
                file=notes,
            )
    return total


def _report(done: Forgotten, args: argparse.Namespace) -> None:
    """The rows deleted per table on stdout; what is said about them on stdout (table) or stderr."""
    write_rows(sys.stdout, args.format, ("table", "deleted"), done.rows())
    notes = sys.stdout if args.format == "table" else sys.stderr
    forgotten = done.asked - len(done.kept)
    where = "in Gleap and the store" if args.in_gleap else "in the store (Gleap was not asked)"
    print(
        f"{done.asked} user id(s): {done.found} known to the store; {forgotten} forgotten {where}",
        file=notes,
    )
    for kept in done.kept:
        print(
            f"not forgotten: {kept.user_id} ({kept.outcome}{': ' + kept.detail if kept.detail else ''})",
            file=notes,
        )
    print(COMEBACK, file=notes)
