"""`audiencesync audit ...`: members at an instant, a user's timeline, a diff, the runs.

It only wires: parse the times, open one read snapshot of the store, call
``audit``, and write the rows in the format asked for (``formats``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection

from audiencesync.cli.formats import add_format_option, write_rows
from audiencesync.cli.help import add_command
from audiencesync.cli.output import EXIT_OK, open_store, when
from audiencesync.cli.tables import Layout
from audiencesync.cli.times import TIME_HELP, add_time_option, option_time, parse_time
from audiencesync.config.loading import Config
from audiencesync.errors import ConfigError, StoreMissingError, UnknownAudienceError
from audiencesync.store import audit, store

# What each table keeps on a terminal too narrow for every column: what the row is about, its
# state and its error; then the others, most telling first (the columns' own order).
MEMBER_LAYOUT = Layout(keep=audit.MEMBER_COLUMNS)
DIFF_LAYOUT = Layout(keep=audit.DIFF_COLUMNS)
TIMELINE_LAYOUT = Layout(keep=("at", "audience", "event", "result", "error"))
RUN_LAYOUT = Layout(keep=("run_id", "audience_key", "status", "error"), first=("started_at",))


def add_audit_commands(commands: Any) -> None:
    """The `audit` group, on the top-level parser's subcommands."""
    group = add_command(
        commands,
        "audit",
        help="ask the store: members at an instant, a user's timeline, a diff, the runs",
        description="Ask the store's history: an audience's members at an instant, a user's timeline, "
        "who entered and left between two instants, the runs. Only reads: safe while the daemon runs.",
        example=["audiencesync audit members pro_users --at 7d", "audiencesync audit user u42"],
    )
    sub = group.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")

    members = add_command(
        sub,
        "members",
        help="an audience's members now, or at an instant",
        description="An audience's members (user id, and since when), now or at an instant.",
        example="audiencesync audit members pro_users --at 2026-11-01 --format csv > members.csv",
    )
    members.add_argument("audience", metavar="KEY", help="the audience or trait")
    add_time_option(members, "--at", "the members at this time (default: now)")
    members.set_defaults(handler=cmd_members)

    user = add_command(
        sub,
        "user",
        help="a user's changes in each audience and every call that carried one",
        description="A user's timeline in every audience and trait: each change (when, which run, what "
        "became of it), each request that carried it (attempt, HTTP status, Gleap's text), each event.",
        example="audiencesync audit user u42 --audience pro_users",
    )
    user.add_argument("user", metavar="USER_ID", help="the user's id, as the sources give it")
    user.add_argument("--audience", metavar="KEY", help="only this audience (default: all)")
    user.set_defaults(handler=cmd_user)

    diff = add_command(
        sub,
        "diff",
        help="who entered and who left between two instants",
        description="Who entered and who left an audience between two instants (the net change per "
        "user), with the counts.",
        example=[
            "audiencesync audit diff pro_users --from 7d",
            "audiencesync audit diff pro_users --from 7d --to 1d",
        ],
    )
    diff.add_argument("audience", metavar="KEY", help="the audience or trait")
    # Not add_time_option's (--from is required, --to has a default); parsed in the command all the
    # same (parse_time).
    diff.add_argument(
        "--from", dest="start", metavar="TIME", required=True, help=f"from this time: {TIME_HELP}"
    )
    diff.add_argument(
        "--to", dest="end", metavar="TIME", default="now", help=f"to this time (default: now): {TIME_HELP}"
    )
    diff.set_defaults(handler=cmd_diff)

    runs = add_command(
        sub,
        "runs",
        help="the runs, newest first, with every counter",
        description="The runs, newest first, with every counter (entered, left, sent, failed, "
        "pending, retries...).",
        example="audiencesync audit runs --audience pro_users --since 3d --limit 10",
    )
    runs.add_argument("--audience", metavar="KEY", help="only this audience (default: all)")
    add_time_option(runs, "--since", "only runs started then or later")
    runs.add_argument("--limit", type=_positive, default=50, metavar="N", help="at most N runs (default: 50)")
    runs.set_defaults(handler=cmd_runs)

    for command in (members, user, diff, runs):
        add_format_option(command)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


@contextlib.contextmanager
def _snapshot(config: Config, key: str | None) -> Iterator[tuple[Connection, audit.AuditedAudience | None]]:
    """One read snapshot of the store (``audit.snapshot``), and the audience ``key`` names (None:
    no key). A key that is not configured needs the store to be refused: when there is no store
    at all, it is refused as unknown."""
    configured = [a.key for a in config.properties]
    try:
        engine = open_store(config).engine
    except StoreMissingError:
        if key is not None and key not in configured:
            raise UnknownAudienceError(key, configured=configured, stored_only=[]) from None
        raise
    try:
        store.require_head(engine, "audit")
        with audit.snapshot(engine) as conn:
            found = None if key is None else audit.audience(conn, key, configured)
            _note(found)
            yield conn, found
    finally:
        engine.dispose()


def _note(found: audit.AuditedAudience | None) -> None:
    """Say on stderr when the answer comes from the store alone, or can only be empty."""
    if found is not None and not found.configured:
        print(f"audience {found.key!r} is not in the config any more; from the store:", file=sys.stderr)
    elif found is not None and found.id is None:
        print(f"audience {found.key!r} has no history: no sync has stored it yet", file=sys.stderr)


def cmd_members(args: argparse.Namespace, config: Config) -> int:
    at = option_time(args.at, "--at", store.utc_now())
    with _snapshot(config, args.audience) as (conn, audience):
        assert audience is not None
        rows = audit.members(conn, audience.id, at) if audience.id is not None else iter(())
        count = write_rows(sys.stdout, args.format, audit.MEMBER_COLUMNS, rows, layout=MEMBER_LAYOUT)
    print(f"{count} member(s) of {args.audience}" + (f" at {when(at)}" if at else ""), file=sys.stderr)
    return EXIT_OK


def cmd_user(args: argparse.Namespace, config: Config) -> int:
    with _snapshot(config, args.audience) as (conn, _):
        events = audit.timeline(conn, args.user, args.audience)
    write_rows(sys.stdout, args.format, audit.TIMELINE_COLUMNS, events, layout=TIMELINE_LAYOUT)
    if not events:
        where = f" in audience {args.audience}" if args.audience else ""
        print(f"no change or call is stored for user {args.user!r}{where}", file=sys.stderr)
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, config: Config) -> int:
    now = store.utc_now()
    start, end = parse_time(args.start, now, option="--from"), parse_time(args.end, now, option="--to")
    if start > end:
        raise ConfigError(
            f"--from {args.start!r} ({when(start)}) is after --to {args.end!r} ({when(end)})",
            fix="swap them",
        )
    counts = {"entered": 0, "left": 0}

    def counted(rows: Iterable[Sequence[Any]]) -> Iterator[Sequence[Any]]:
        for row in rows:
            counts[row[1]] += 1
            yield row

    with _snapshot(config, args.audience) as (conn, audience):
        assert audience is not None
        rows = audit.diff(conn, audience.id, start, end) if audience.id is not None else iter(())
        write_rows(sys.stdout, args.format, audit.DIFF_COLUMNS, counted(rows), layout=DIFF_LAYOUT)
    summary = (
        f"{counts['entered']} entered, {counts['left']} left {args.audience} "
        f"between {when(start)} and {when(end)}"
    )
    # The table's summary line is part of the table; csv and json keep stdout to the rows alone.
    print(summary, file=sys.stdout if args.format == "table" else sys.stderr)
    return EXIT_OK


def cmd_runs(args: argparse.Namespace, config: Config) -> int:
    since = option_time(args.since, "--since", store.utc_now())
    with _snapshot(config, args.audience) as (conn, _):
        runs = audit.runs(conn, args.audience, since, args.limit)
        count = write_rows(sys.stdout, args.format, audit.RUN_COLUMNS, runs, layout=RUN_LAYOUT)
    if not count:
        print("no run is stored" + (" since " + when(since) if since else ""), file=sys.stderr)
    return EXIT_OK
