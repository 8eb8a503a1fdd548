"""The command line. It only wires: parse, load config, call the library, map errors to exit statuses."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from tqdm import tqdm

from audiencesync import __version__, audit, store
from audiencesync.config import Config, Secret, display_url, find_config, load_config
from audiencesync.delivery import Progress
from audiencesync.errors import (
    AudienceSyncError,
    ConfigError,
    GleapAuthError,
    GleapUnavailableError,
    LeaseLostError,
    MissingTokenError,
    StoreBusyError,
    StoreError,
    StoreMissingError,
    iso_time,
)
from audiencesync.gleap import GleapClient
from audiencesync.lease import WriterLease
from audiencesync.requests import AdminRequests, kind_of
from audiencesync.scheduler import Daemon
from audiencesync.sources import Sources
from audiencesync.sync import CycleReport, Syncer

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INCOMPLETE = 1  # changes remain pending or failed, or a source failed
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_BUSY = 4  # another process holds the store's writer lease
EXIT_GLEAP_DOWN = 5  # the circuit breaker opened: Gleap failed for many users in a row
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM
# How long `sync --full/--allow-removals` waits for a running daemon to carry it out.
DAEMON_REQUEST_WAIT_SECONDS = 600.0

# Checked in order: the first matching class decides the exit status.
EXIT_STATUS: tuple[tuple[type[AudienceSyncError], int], ...] = (
    (ConfigError, EXIT_CONFIG),
    (MissingTokenError, EXIT_CONFIG),
    (StoreBusyError, EXIT_BUSY),
    (LeaseLostError, EXIT_INCOMPLETE),
    (StoreError, EXIT_STORE),
    (GleapAuthError, EXIT_INCOMPLETE),
    (AudienceSyncError, EXIT_INCOMPLETE),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="audiencesync",
        description="Sync audience membership from SQL sources into Gleap.",
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

    sync = commands.add_parser("sync", help="run one sync cycle now")
    sync.add_argument(
        "--audience",
        action="append",
        metavar="KEY",
        dest="audiences",
        help="only this audience (repeatable; default: all)",
    )
    sync.add_argument("--full", action="store_true", help="re-send the current value to every member")
    sync.add_argument(
        "--dry-run",
        action="store_true",
        help="print the calls as JSON lines instead of sending them; change nothing",
    )
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
        "holds it, how long to wait for the daemon to carry out --full/--allow-removals (default: 600)",
    )
    sync.set_defaults(handler=_cmd_sync)

    run = commands.add_parser("run", help="run as a daemon: refresh each audience on its schedule, deliver")
    run.set_defaults(handler=_cmd_run)

    status = commands.add_parser("status", help="per audience: members, pending, failed, last and next run")
    status.add_argument("--format", choices=["table", "json"], default="table")
    status.set_defaults(handler=_cmd_status)

    check = commands.add_parser("check", help="check the config, the store, each source and the Gleap token")
    check.set_defaults(handler=_cmd_check)

    history = commands.add_parser("history", help="a user's membership changes and what Gleap was told")
    history.add_argument("user", metavar="USER_ID")
    history.add_argument("--audience", metavar="KEY", help="only this audience")
    history.add_argument("--format", choices=["table", "json"], default="table")
    history.set_defaults(handler=_cmd_history)

    members = commands.add_parser("members", help="an audience's members, now or at a past time")
    members.add_argument("audience", metavar="KEY")
    members.add_argument(
        "--at", metavar="TIME", help="ISO 8601 time, e.g. 2026-11-01T12:00:00Z (default: now)"
    )
    members.set_defaults(handler=_cmd_members)

    failures = commands.add_parser("failures", help="list changes parked after repeated rejections")
    failures.add_argument("--audience", metavar="KEY", help="only this audience")
    failures.set_defaults(handler=_cmd_failures)

    retry = commands.add_parser("retry", help="re-queue parked changes for the next sync")
    retry.add_argument("--audience", metavar="KEY", help="only this audience")
    retry.add_argument("--user", metavar="ID", help="only this user id")
    retry.add_argument("--all", action="store_true", help="every parked change (when no filter is given)")
    retry.set_defaults(handler=_cmd_retry)

    db = commands.add_parser("db", help="manage the membership store")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_commands.add_parser("upgrade", help="apply pending schema migrations").set_defaults(
        handler=_cmd_db_upgrade
    )
    db_commands.add_parser("current", help="show the store's schema revision").set_defaults(
        handler=_cmd_db_current
    )
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
    handler: Callable[[argparse.Namespace, Config], int] = args.handler
    try:
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


def _cmd_check(args: argparse.Namespace, config: Config) -> int:
    """Each part an admin sets up, checked on its own: one line each, all of them even if one fails."""
    results: list[tuple[str, str | None]] = [(f"config {config.path}", None)]
    try:
        # Never create=True: a check must leave no new store file behind.
        engine = store.engine_for(config.store)
    except AudienceSyncError as exc:
        results.append((f"store {display_url(config.store.url)}", str(exc)))
    else:
        try:
            current, head = store.schema_revisions(engine)
            state = (
                "up to date"
                if current == head
                else f"at {current or 'no schema'}; `sync` migrates it to {head}"
            )
            results.append((f"store {display_url(config.store.url)} ({state})", None))
        except AudienceSyncError as exc:
            results.append((f"store {display_url(config.store.url)}", str(exc)))
        finally:
            engine.dispose()
    sources = Sources(config.sources)
    for audience in config.audiences:
        try:
            sources.check(audience)
            results.append((f"audience {audience.key} (source {audience.source})", None))
        except AudienceSyncError as exc:
            results.append((f"audience {audience.key} (source {audience.source})", str(exc)))
    sources.dispose()
    token = config.gleap.api_token
    if token is None:
        results.append(("gleap token", str(MissingTokenError())))
    else:
        try:
            asyncio.run(_check_token(config, token))
            results.append((f"gleap token at {config.gleap.base_url}", None))
        except AudienceSyncError as exc:
            results.append((f"gleap token at {config.gleap.base_url}", str(exc)))
    for what, problem in results:
        print(f"{'FAIL' if problem else 'ok':4}  {what}" + (f"\n      {problem}" if problem else ""))
    return EXIT_INCOMPLETE if any(problem for _, problem in results) else EXIT_OK


async def _check_token(config: Config, token: Secret) -> None:
    async with GleapClient(config.gleap, token) as client:
        await client.check_token()


def _cmd_history(args: argparse.Namespace, config: Config) -> int:
    if args.audience:
        config.audience(args.audience)  # refuse an unknown key before touching the store
    engine = _open_store(config).engine
    store.schema_revisions(engine)
    events = audit.history(engine, args.user, args.audience)
    if args.format == "json":
        print(json.dumps([vars(e) for e in events], default=_iso, indent=2))
        return EXIT_OK
    rows: list[tuple[str, ...]] = [("time", "audience", "event", "detail", "run")]
    for e in events:
        if e.kind == "told":
            detail = f"{str(e.value).lower()} -> {e.status or 'no answer'}" + (
                f" {e.error}" if e.error else ""
            )
        else:
            detail = ""
        rows.append((_when(e.at), e.audience, e.kind, detail, str(e.run_id or "")))
    _print_table(rows, sys.stdout)
    if not events:
        print(f"no history for user {args.user!r}", file=sys.stderr)
    return EXIT_OK


def _cmd_members(args: argparse.Namespace, config: Config) -> int:
    config.audience(args.audience)  # refuse an unknown key before touching the store
    engine = _open_store(config).engine
    store.schema_revisions(engine)
    at = None
    if args.at:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError:
            raise ConfigError(
                f"--at {args.at!r} is not a time", fix="write it as 2026-11-01T12:00:00Z"
            ) from None
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    count = 0
    for user_id in audit.members_at(engine, args.audience, at):
        print(user_id)
        count += 1
    print(
        f"{count} member(s) of {args.audience}" + (f" at {_when(at)}" if at else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_run(args: argparse.Namespace, config: Config) -> int:
    if config.gleap.api_token is None:
        raise MissingTokenError()
    if not config.audiences:
        raise ConfigError("no [[audiences]] are configured", path=str(config.path), fix="add at least one")
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    return daemon.run()


def _cmd_status(args: argparse.Namespace, config: Config) -> int:
    target = _open_store(config)
    current, _ = store.schema_revisions(target.engine)
    if current is None:
        print("the store is empty: no sync has run yet", file=sys.stderr)
        return EXIT_OK
    rows = target.status()
    holder = target.lease_holder()
    configured = {a.key for a in config.audiences}
    if args.format == "json":
        print(json.dumps(_status_json(rows, holder, configured), default=_iso, indent=2))
        return EXIT_OK
    table: list[tuple[str, ...]] = [
        (
            "audience",
            "members",
            "pending",
            "failed",
            "unknown",
            "oldest pending",
            "last run",
            "result",
            "entered",
            "left",
            "sent",
            "next run",
        )
    ]
    for row in rows:
        last = row.last_run or {}
        table.append(
            (
                row.key + ("" if row.key in configured else " (not in config)"),
                str(row.members),
                str(row.pending),
                str(row.parked),
                str(row.unknown),
                _age(row.oldest_pending_at),
                _when(last.get("started_at")),
                str(last.get("status", "-")),
                str(last.get("entered", "-")),
                str(last.get("left", "-")),
                str(last.get("sent", "-")),
                _when(row.next_run_at),
            )
        )
    _print_table(table, sys.stdout)
    if holder is None:
        print("daemon: none holds the store")
    else:
        print(
            f"{holder.get('role') or 'holder'}: {holder['host']} pid {holder['pid']}, active since "
            f"{_when(holder['acquired_at'])}, last heartbeat {_when(holder['renewed_at'])}, "
            f"lease to {_when(holder['expires_at'])}"
        )
        if holder.get("health"):
            print(f"health: {holder['health']}; last acknowledged call {_when(holder.get('progress_at'))}")
    return EXIT_OK


def _status_json(
    rows: list[store.AudienceStatus], holder: dict[str, Any] | None, configured: set[str]
) -> dict[str, Any]:
    return {
        "audiences": [
            {
                "key": row.key,
                "configured": row.key in configured,
                "members": row.members,
                "pending": row.pending,
                "failed": row.parked,
                "unknown": row.unknown,
                "oldest_pending_at": row.oldest_pending_at,
                "oldest_pending_age_seconds": _age_seconds(row.oldest_pending_at),
                "refreshed_at": row.refreshed_at,
                "next_run_at": row.next_run_at,
                "last_run": row.last_run,
            }
            for row in rows
        ],
        "lease": holder,
    }


def _age_seconds(when: datetime | None) -> float | None:
    return None if when is None else max(0.0, (store.utc_now() - when).total_seconds())


def _age(when: datetime | None) -> str:
    """An age as 45s, 12m or 3h20m; '-' when nothing is pending."""
    seconds = _age_seconds(when)
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m" if minutes else f"{secs}s")


def _iso(value: object) -> str:
    """JSON's ``default``: datetimes as ISO 8601 with their offset (UTC when the value has none)."""
    if isinstance(value, datetime):
        return _aware(value).isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _when(value: object) -> str:
    """A time for people: ISO 8601 to the second, with its offset, e.g. 2026-12-01T19:25:25+00:00."""
    return iso_time(value) if isinstance(value, datetime) else "-"


def _aware(value: datetime) -> datetime:
    # The store hands out aware UTC datetimes; a naive one can only mean UTC too.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _print_table(rows: list[tuple[str, ...]], out: IO[str]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out
        )


def _open_store(config: Config) -> store.Store:
    return store.Store(store.engine_for(config.store))


def _cmd_failures(args: argparse.Namespace, config: Config) -> int:
    if args.audience:
        config.audience(args.audience)
    target = _open_store(config)
    store.schema_revisions(target.engine)  # refuses a store from a newer version
    parked = target.parked(args.audience)
    for change in parked:
        print(
            f"{change.audience}\t{change.user_id}\t{str(change.value).lower()}\t"
            f"attempts={change.attempts}\tparked={_when(change.parked_at)}\t{change.last_error}"
        )
    print(
        f"{len(parked)} parked change(s)" + ("; re-queue with `audiencesync retry`" if parked else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_retry(args: argparse.Namespace, config: Config) -> int:
    if not (args.audience or args.user or args.all):
        raise ConfigError(
            "retry needs a selection", fix="pass --audience KEY, --user ID, or --all for every parked change"
        )
    if args.audience:
        config.audience(args.audience)
    target = _open_store(config)
    store.schema_revisions(target.engine)
    count = target.requeue(args.audience, args.user)
    print(f"re-queued {count} change(s); the next sync sends them")
    return EXIT_OK


def _cmd_db_upgrade(args: argparse.Namespace, config: Config) -> int:
    # The one command that may create a new store.
    target = store.Store(store.engine_for(config.store, create=True))
    applied = store.upgrade(target.engine)
    _, head = store.schema_revisions(target.engine)
    where = display_url(config.store.url)
    print(f"{where}: {'upgraded to' if applied else 'already at'} schema revision {head}")
    return EXIT_OK


def _cmd_db_current(args: argparse.Namespace, config: Config) -> int:
    target = _open_store(config)
    current, head = store.schema_revisions(target.engine)
    state = "up to date" if current == head else f"behind; run `audiencesync db upgrade` to reach {head}"
    print(f"{display_url(config.store.url)}: schema revision {current or 'none'} ({state})")
    return EXIT_OK


def _cmd_sync(args: argparse.Namespace, config: Config) -> int:
    if args.audiences:
        for key in args.audiences:
            config.audience(key)  # refuse unknown keys before touching anything
    if args.allow_removals and not args.audiences:
        raise ConfigError(
            "--allow-removals releases the guard for named audiences only",
            fix="add --audience KEY for each audience whose removals you have checked",
        )
    if not args.dry_run and config.gleap.api_token is None:
        raise MissingTokenError()
    try:
        engine = store.engine_for(config.store)
    except StoreMissingError:
        if not args.dry_run:
            raise
        # The dry run of a first sync: plan against an empty store in memory,
        # and leave no file behind.
        engine = store.create_engine("sqlite://", create=True)
        store.upgrade(engine)
    lease = WriterLease(engine, store.utc_now, ttl_seconds=config.sync.lease_seconds, role="sync")
    interrupt = _Interrupt(Sources(config.sources))
    try:
        if args.dry_run:
            # A dry run writes nothing, so it needs no lease and never waits for one.
            with interrupt:
                report = interrupt.run(lambda: _run_cycle(args, config, store.Store(engine), interrupt))
        else:
            store.upgrade(engine)
            daemon = _daemon_holding(engine) if (args.full or args.allow_removals) else None
            if daemon is not None:
                return _ask_daemon(args, config, engine, daemon)
            with interrupt, lease.held(args.wait or 0.0):
                fenced = store.Store(engine, fence=lease.check)
                report = interrupt.run(lambda: _run_cycle(args, config, fenced, interrupt))
    finally:
        engine.dispose()
    _print_summary(report, sys.stderr if args.dry_run else sys.stdout)
    if report.aborted is not None:
        print(f"audiencesync: error: {report.aborted}", file=sys.stderr)
    if interrupt.signum is not None:
        sent = sum(a.sent for a in report.audiences)
        pending = sum(a.pending for a in report.audiences)
        print(
            f"audiencesync: stopped by {signal.Signals(interrupt.signum).name}: {sent} change(s) delivered, "
            f"{pending} still pending for the next run",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED if interrupt.signum == signal.SIGINT else EXIT_TERMINATED
    if isinstance(report.aborted, GleapUnavailableError):
        return EXIT_GLEAP_DOWN
    return EXIT_OK if report.complete else EXIT_INCOMPLETE


class _Interrupt:
    """SIGINT/SIGTERM during `sync`: stop starting calls, cancel source queries, report.

    The first signal sets ``stop`` (calls in flight finish and are recorded) and
    cancels running source queries (their snapshots stay untouched). A second
    one exits at once: every write is a transaction, so the store stays consistent.
    """

    def __init__(self, sources: Sources) -> None:
        self.sources = sources
        self.stop = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            os.write(2, b"audiencesync: second signal, exiting now; unacknowledged changes stay pending\n")
            os._exit(128 + signum)
        self.signum = signum
        self.stop.set()
        self.sources.cancel()

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def run(self, work: Callable[[], CycleReport]) -> CycleReport:
        """Do ``work`` on a worker thread, the main thread only waiting for it.

        Python runs signal handlers on the main thread, between bytecodes: a main
        thread stuck in a driver's C call (a slow source query) would never see
        the signal that should cancel that very query.
        """
        outcome: list[CycleReport] = []
        failure: list[BaseException] = []

        def target() -> None:
            try:
                outcome.append(work())
            except BaseException as exc:
                failure.append(exc)

        worker = threading.Thread(target=target, name="sync", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
        if failure:
            raise failure[0]
        return outcome[0]

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _daemon_holding(engine: Any) -> dict[str, Any] | None:
    """The lease row when a live daemon (`audiencesync run`) holds the store, else None."""
    holder = store.Store(engine).lease_holder()
    if holder is None or holder.get("role") != "daemon" or holder["expires_at"] < store.utc_now():
        return None
    return holder


def _ask_daemon(args: argparse.Namespace, config: Config, engine: Any, daemon: dict[str, Any]) -> int:
    """Queue --full/--allow-removals for the daemon holding the store, and wait for its outcome.

    A request nobody picked up in time is withdrawn, so it can't surprise anyone
    later; one the daemon already started is left to finish.
    """
    keys = args.audiences or [a.key for a in config.audiences]
    kind = kind_of(full=args.full, allow_removals=args.allow_removals)
    queue = AdminRequests(engine, store.utc_now)
    asker = f"{socket.gethostname()} pid {os.getpid()}"
    ids = {key: queue.submit(kind, key, asker) for key in keys}
    wait = DAEMON_REQUEST_WAIT_SECONDS if args.wait is None else args.wait
    what = {
        "full": "fully resync",
        "release": "release the removal guard of",
        "release+full": "release and fully resync",
    }[kind]
    print(
        f"the daemon on {daemon['host']} (pid {daemon['pid']}) holds the store; asked it to {what} "
        f"{', '.join(keys)} in its next cycle. Waiting up to {wait:g} s for it...",
        flush=True,
    )
    deadline = time.monotonic() + wait
    results = {key: queue.get(request_id) for key, request_id in ids.items()}
    while not all(r.finished for r in results.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        results = {key: queue.get(request_id) for key, request_id in ids.items()}
    status = EXIT_OK
    for key, request in results.items():
        outcome = request.result or {}
        if request.state == "done":
            print(
                f"{key}: {outcome.get('status')} ({outcome.get('mode')}) entered={outcome.get('entered')} "
                f"left={outcome.get('left')}; {outcome.get('pending')} change(s) pending, "
                "the daemon delivers them"
            )
            continue
        status = EXIT_INCOMPLETE
        if request.state == "failed":
            detail = outcome.get("error") or outcome.get("status")
            print(f"{key}: the daemon's refresh failed: {detail}")
        elif queue.cancel(request.id, f"not picked up within {wait:g} s"):
            print(
                f"{key}: the daemon did not pick the request up within {wait:g} s; withdrawn. "
                "Fix: check the daemon's log and /healthz, then ask again (a longer --wait)"
            )
        else:
            print(f"{key}: the daemon is still carrying it out; `audiencesync status` shows the outcome")
    return status


def _run_cycle(
    args: argparse.Namespace, config: Config, target: store.Store, interrupt: _Interrupt
) -> CycleReport:
    syncer = Syncer(config, target, sources=interrupt.sources)
    try:
        return syncer.run_cycle(
            args.audiences,
            full=args.full,
            dry_run=args.dry_run,
            out=sys.stdout,
            progress=_progress_bar if sys.stderr.isatty() else None,
            allow_removals=args.allow_removals,
            stop=interrupt.stop,
        )
    finally:
        syncer.sources.dispose()


def _progress_bar(total: int) -> Progress:
    bar = tqdm(total=total, unit="call", desc="delivering", file=sys.stderr, dynamic_ncols=True)

    def tick(done: int) -> None:
        bar.update(done)
        if bar.n >= total:
            bar.close()

    return tick


def _print_summary(report: CycleReport, out: IO[str]) -> None:
    rows: list[tuple[str, ...]] = [
        (
            "audience", "result", "mode", "members", "entered", "left", "sent", "failed",
            "pending", "parked", "unknown", "skipped",
        )
    ]  # fmt: skip
    for a in report.audiences:
        counts = (
            a.members,
            a.entered,
            a.left,
            a.sent,
            a.failed,
            a.pending,
            a.parked,
            a.unknown,
            a.skipped_rows,
        )
        rows.append((a.key, a.status, a.mode, *(str(n) for n in counts)))
    _print_table(rows, out)
    if report.dry_run:
        print(f"dry run: {report.calls} call(s) would be made; nothing was sent or stored", file=out)
    for a in report.audiences:
        if a.error:
            print(f"{a.key}: {a.error}", file=out)
        if a.invalid_samples:
            print(f"{a.key}: skipped invalid ids, e.g. {'; '.join(a.invalid_samples)}", file=out)
    parked = sum(a.parked for a in report.audiences)
    if parked:
        print(
            f"{parked} change(s) are parked after repeated rejections; see `audiencesync failures`, "
            "fix the cause, then `audiencesync retry`",
            file=out,
        )
    unknown = sum(a.unknown for a in report.audiences)
    if unknown and not report.dry_run:
        print(
            f"{unknown} call(s) got no verdict from Gleap (it may have applied them); "
            "they stay pending and go out again",
            file=out,
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
