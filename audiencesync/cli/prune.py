"""`audiencesync prune`: delete old delivery attempts and settled history; and its line in `status`."""

from __future__ import annotations

import argparse
import sys

from audiencesync.cli.formats import write_rows
from audiencesync.cli.output import EXIT_OK, open_store, when
from audiencesync.cli.times import parse_time
from audiencesync.config.loading import Config
from audiencesync.config.urls import sqlite_file
from audiencesync.errors import ConfigError
from audiencesync.lifecycle.prune import Pruner, PruneRecord, check_before
from audiencesync.store import store


def cmd_prune(args: argparse.Namespace, config: Config) -> int:
    """No lease: it runs beside the daemon, one short transaction per batch (see prune.py)."""
    now = store.utc_now()
    before = parse_time(args.before, now, option="--before")
    check_before(before, now)  # before touching the store
    if args.batch_size < 1:
        raise ConfigError(
            f"--batch-size {args.batch_size} is not a size", fix="pass at least 1 (default 5000)"
        )
    target = open_store(config)
    store.upgrade(target.engine)  # as sync does: the prunes table came with a migration
    pruner = Pruner(target.engine, store.utc_now)
    if args.dry_run:
        counts = pruner.plan(before)
    else:
        result = pruner.prune(before, by="cli", batch_size=args.batch_size)
        counts = result.deleted
    changes, calls = pruner.kept(before)
    columns = ("table", "would_delete" if args.dry_run else "deleted")
    write_rows(sys.stdout, args.format, columns, counts.per_table())
    # What is not a row goes aside in csv and jsonl, so that stdout stays rows only.
    out = sys.stdout if args.format == "table" else sys.stderr
    print(
        f"kept though older: {changes} change(s) and {calls} call(s) of memberships still pending, "
        "failed or parked",
        file=out,
    )
    if args.dry_run:
        print(f"dry run: nothing was deleted; a prune would keep everything from {when(before)} on", file=out)
        return EXIT_OK
    print(
        f"done in {result.seconds:.1f} s ({result.batches} batch(es), the longest holding the store "
        f"{result.longest_batch_seconds * 1000:.0f} ms). An audience's members at any time from "
        f"{when(before)} on can still be rebuilt exactly; before it, they can't",
        file=out,
    )
    path = sqlite_file(config.store.url)
    if path is not None and counts.total:
        # Decided against auto_vacuum: it needs a rebuild of the file to turn on, and
        # the freed pages are reused by the rows that come next anyway.
        print(
            "SQLite keeps the file's size and reuses the freed pages for new rows. To give the space "
            f"back to the disk, stop the daemon and run: sqlite3 {path} 'VACUUM' (it needs free space "
            "about the file's size)",
            file=out,
        )
    return EXIT_OK


def prune_status(last: PruneRecord | None) -> str:
    """`status`'s line about the last prune."""
    if last is None:
        return "last prune: none; all history is kept"
    counts = f"{last.calls} call(s), {last.changes} change(s), {last.runs} run(s), {last.requests} request(s)"
    if last.finished_at is None:
        return (
            f"last prune: started {when(last.started_at)} by {last.by}, of the history before "
            f"{when(last.before)}; not finished (interrupted, or still running): {counts} deleted so far, "
            "the next prune carries on"
        )
    return (
        f"last prune: {when(last.finished_at)} by {last.by}, of the history before {when(last.before)}: "
        f"{counts} deleted"
    )
