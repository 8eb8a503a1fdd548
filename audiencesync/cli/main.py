"""The command line. It only wires: parse, load config, call the library, map errors to exit statuses."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from audiencesync import __version__
from audiencesync.cli.alerts import add_alert_commands
from audiencesync.cli.audit import add_audit_commands
from audiencesync.cli.forget import add_forget_command
from audiencesync.cli.formats import add_format_option
from audiencesync.cli.help import HelpFormatter, add_command, describe, examples
from audiencesync.cli.init import add_init_command
from audiencesync.cli.output import (
    EXIT_BUSY,
    EXIT_CONFIG,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_STORE,
)
from audiencesync.cli.prune import cmd_prune
from audiencesync.cli.retire import add_retire_command
from audiencesync.cli.serve import add_serve_command
from audiencesync.cli.store import (
    cmd_check,
    cmd_db_current,
    cmd_db_upgrade,
    cmd_failures,
    cmd_retry,
    cmd_status,
)
from audiencesync.cli.sync import cmd_run, cmd_sync
from audiencesync.cli.times import TIME_HELP
from audiencesync.config.loading import Config, find_config, load_config
from audiencesync.errors import (
    AudienceSyncError,
    ConfigError,
    GleapAuthError,
    HistoryPrunedError,
    LeaseLostError,
    ListenError,
    MissingTokenError,
    StoreBusyError,
    StoreError,
    UnknownAudienceError,
)
from audiencesync.lifecycle.prune import BATCH_SIZE
from audiencesync.sync.dry_run import LISTED_ON_A_TERMINAL

# Checked in order: the first matching class decides the exit status.
EXIT_STATUS: tuple[tuple[type[AudienceSyncError], int], ...] = (
    (ConfigError, EXIT_CONFIG),
    (UnknownAudienceError, EXIT_CONFIG),
    (HistoryPrunedError, EXIT_CONFIG),  # a TIME the store can no longer answer for
    (MissingTokenError, EXIT_CONFIG),
    (ListenError, EXIT_CONFIG),  # an address `serve` can't listen on: pick another
    (StoreBusyError, EXIT_BUSY),
    (LeaseLostError, EXIT_INCOMPLETE),
    (StoreError, EXIT_STORE),
    (GleapAuthError, EXIT_INCOMPLETE),
    (AudienceSyncError, EXIT_INCOMPLETE),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiencesync",
        description=describe(
            "Sync audience membership from SQL sources into Gleap. "
            "`audiencesync COMMAND --help` explains each command."
        ),
        epilog=examples(
            "audiencesync init                      # write ./audiencesync.toml",
            "audiencesync db upgrade                # create the store",
            "audiencesync check                     # config, store, queries, token",
            "audiencesync sync --dry-run            # the calls a sync would make",
            "audiencesync run                       # the daemon",
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"audiencesync {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $AUDIENCESYNC_CONFIG, then ./audiencesync.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log verbosity on stderr (default: INFO for run, WARNING otherwise)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines as text or as one JSON object each (default: text)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_init_command(commands)

    sync = add_command(
        commands,
        "sync",
        help="run one sync cycle now",
        description="One cycle now: refresh every audience and trait from its source, then deliver "
        "the changes to Gleap. The run-once mode, for cron or an admin. Exit status 0 when "
        "everything was delivered, 1 when changes remain pending or failed. While `run` holds the "
        "store, --audience, --full and --allow-removals are handed to the daemon, which refreshes "
        "those audiences now and reports back.",
        example=[
            "audiencesync sync --dry-run --format csv > calls.csv",
            "audiencesync sync --audience pro_users --allow-removals",
        ],
    )
    sync.add_argument(
        "--audience",
        action="append",
        metavar="KEY",
        dest="audiences",
        help="only this audience or trait (repeatable; default: all)",
    )
    sync.add_argument("--full", action="store_true", help="re-send the current value to every member")
    sync.add_argument(
        "--dry-run",
        action="store_true",
        help="list the calls instead of making them (see --format); change nothing",
    )
    sync.add_argument(
        "--all-calls",
        action="store_true",
        help="with --dry-run: list every call on a terminal too (default: the first "
        f"{LISTED_ON_A_TERMINAL} there; every call to a pipe, a file, csv or json)",
    )
    add_format_option(sync)
    sync.add_argument(
        "--allow-removals",
        action="store_true",
        help="release the mass-removal guard for this run (needs --audience)",
    )
    sync.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="if another sync holds the store, wait this long for it (default: 0); when a daemon "
        "holds it, how long to wait for the daemon to carry out --audience/--full/--allow-removals "
        "(default: 600)",
    )
    sync.set_defaults(handler=cmd_sync)

    run = add_command(
        commands,
        "run",
        help="run as a daemon: refresh each audience on its schedule, deliver",
        description="The daemon: refresh each audience on its own schedule ([schedule] interval plus "
        "jitter) and deliver continuously. One daemon per store is active; others stand by. "
        "SIGTERM stops it gracefully, SIGHUP reloads the config; under systemd (Type=notify) it "
        "reports readiness and pings the watchdog.",
        example="GLEAP_API_TOKEN=... audiencesync --config /etc/audiencesync/audiencesync.toml run",
    )
    run.set_defaults(handler=cmd_run)

    status = add_command(
        commands,
        "status",
        help="per audience: members, pending, failed, last and next run",
        description="Per audience and trait: members, pending, failed, the last run and the next; "
        "then which daemon holds the store, its last heartbeat, and the last prune. Only reads: "
        "safe while the daemon runs.",
        example="audiencesync status --format json",
    )
    add_format_option(status)
    status.set_defaults(handler=cmd_status)

    check = add_command(
        commands,
        "check",
        help="check the config, the store, each source and the Gleap token",
        description="Check each part on its own: the config, the store, every audience's query (up to "
        "its first row) and the Gleap token (GET /admin/auth). One line per part; exit status 1 if "
        "any fails.",
        example="GLEAP_API_TOKEN=... audiencesync --config audiencesync.toml check",
    )
    check.set_defaults(handler=cmd_check)

    add_audit_commands(commands)

    failures = add_command(
        commands,
        "failures",
        help="list changes parked after repeated rejections",
        description="List the changes and events parked after repeated rejections by Gleap, with "
        "their attempts, when they were parked and Gleap's last answer.",
        example="audiencesync failures --audience pro_users --format csv",
    )
    failures.add_argument("--audience", metavar="KEY", help="only this audience (default: all)")
    add_format_option(failures)
    failures.set_defaults(handler=cmd_failures)

    retry = add_command(
        commands,
        "retry",
        help="re-queue parked changes for the next sync",
        description="Re-queue parked changes and events for the next sync, with a fresh attempt "
        "budget. Without a filter, --all is needed.",
        example=["audiencesync retry --audience pro_users --user u42", "audiencesync retry --all"],
    )
    retry.add_argument("--audience", metavar="KEY", help="only this audience (default: all)")
    retry.add_argument("--user", metavar="ID", help="only this user id (default: all)")
    retry.add_argument("--all", action="store_true", help="every parked change (when no filter is given)")
    retry.set_defaults(handler=cmd_retry)

    prune = add_command(
        commands,
        "prune",
        help="delete delivery attempts and settled history older than a time, in batches",
        description="Delete calls, acknowledged events and settled history older than TIME (at least "
        "a day ago), in short batches, with a row of counts per table. What is still owed to Gleap "
        "keeps its history. Safe while the daemon runs.",
        example=["audiencesync prune --before 90d --dry-run", "audiencesync prune --before 2026-09-01"],
    )
    prune.add_argument(
        "--before",
        metavar="TIME",
        required=True,
        help=f"delete what is older than this, at least a day ago: {TIME_HELP}",
    )
    prune.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")
    prune.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        metavar="ROWS",
        help=f"rows per transaction: a running daemon waits at most one batch (default {BATCH_SIZE})",
    )
    add_format_option(prune)
    prune.set_defaults(handler=cmd_prune)

    add_forget_command(commands)

    add_alert_commands(commands)
    add_retire_command(commands)
    add_serve_command(commands)

    db = add_command(
        commands,
        "db",
        help="manage the membership store",
        description="Manage the membership store's schema.",
        example=["audiencesync db upgrade", "audiencesync db current"],
    )
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    add_command(
        db_commands,
        "upgrade",
        help="apply pending schema migrations",
        description="Apply pending schema migrations; on a new SQLite store, create its file. The only "
        "command that creates a store: `sync` and `run` refuse a missing one (a typo in [store] url "
        "would otherwise re-send every member).",
        example="audiencesync --config audiencesync.toml db upgrade",
    ).set_defaults(handler=cmd_db_upgrade)
    add_command(
        db_commands,
        "current",
        help="show the store's schema revision",
        description="Show the store's schema revision, and whether migrations are pending.",
        example="audiencesync db current",
    ).set_defaults(handler=cmd_db_current)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler_ = logging.StreamHandler(sys.stderr)
    handler_.setFormatter(
        JsonFormatter() if args.log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT)
    )
    level = args.log_level or ("INFO" if args.command == "run" else "WARNING")
    logging.basicConfig(level=level, handlers=[handler_], force=True)
    if level == "INFO":
        # These log every request, job run and migration step at INFO: they would
        # drown the one summary line per audience per cycle.
        for chatty in ("httpx", "apscheduler", "alembic"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    standalone: Callable[[argparse.Namespace], int] | None = getattr(args, "standalone", None)
    try:
        if standalone is not None:  # init: it needs no config
            return standalone(args)
        handler: Callable[[argparse.Namespace, Config], int] = args.handler
        config = load_config(find_config(args.config))
        return handler(args, config)
    except AudienceSyncError as exc:
        print(f"audiencesync: error: {exc}", file=sys.stderr)
        return next(status for cls, status in EXIT_STATUS if isinstance(exc, cls))
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`); stop quietly like other CLIs.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        print("audiencesync: interrupted; unacknowledged changes stay pending", file=sys.stderr)
        return EXIT_INTERRUPTED


TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
