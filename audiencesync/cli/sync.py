"""The commands that sync: `sync` (one cycle, signals, asking a running daemon) and `run` (the daemon)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import IO, Any, TypeVar

from tqdm import tqdm

from audiencesync.alerts.alerts import Alerts
from audiencesync.cli.ask import ask_daemon
from audiencesync.cli.call_listing import write_calls
from audiencesync.cli.formats import write_rows
from audiencesync.cli.output import (
    EXIT_GLEAP_DOWN,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    daemon_holding,
)
from audiencesync.cli.tables import Layout
from audiencesync.config.loading import AudienceConfig, Config
from audiencesync.config.sections import ENV_SERVER_TOKEN
from audiencesync.daemon.arenas import tune_malloc
from audiencesync.delivery.deliverer import Progress
from audiencesync.errors import (
    ConfigError,
    GleapUnavailableError,
    MissingTokenError,
    StoreMissingError,
)
from audiencesync.gleap.api import identify_url, track_url
from audiencesync.refresh.sources import Sources
from audiencesync.store import store
from audiencesync.store.lease import WriterLease
from audiencesync.sync.cycle import CycleReport, Syncer
from audiencesync.sync.dry_run import Listing

T = TypeVar("T")

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    if config.gleap.api_token is None:
        raise MissingTokenError(MissingTokenError.SYNC_DRY_RUN)  # run has no --dry-run
    if not config.properties:
        raise ConfigError(
            "no [[audiences]] or [[traits]] are configured", path=str(config.path), fix="add at least one"
        )
    _require_drivers(config, config.active)
    if config.server is None and config.pages_token is not None:
        # Not refused: the same config may serve `serve --listen` elsewhere, with this token.
        log.warning(
            "the status pages' token is set ([server] auth_token or $%s) but [server] listen is not, "
            "so this daemon serves no pages, /healthz or /metrics; the token is used by "
            '`audiencesync serve --listen HOST:PORT`. Fix: to serve them here, add listen = "127.0.0.1:9464" '
            "(or the address to serve on) under [server]",
            ENV_SERVER_TOKEN,
        )
    # Before the daemon's threads start: they would each take an arena of their own.
    tune_malloc()
    # Imported here, not at the top: the daemon brings APScheduler, prometheus_client and the web
    # pages (Jinja2), a fifth of every other command's start-up (cli/__init__.py).
    from audiencesync.daemon.scheduler import Daemon

    daemon = Daemon(config)
    daemon.install_signal_handlers()
    return daemon.run()


def _require_drivers(config: Config, properties: Iterable[AudienceConfig]) -> None:
    """A source whose driver is not installed is a setup mistake: refused before anything starts
    (exit 2), not a failed read of each of its audiences."""
    sources = Sources(config.sources)
    try:
        sources.require_drivers(properties)
    finally:
        sources.dispose()


def cmd_sync(args: argparse.Namespace, config: Config) -> int:
    # Refuse unknown and paused keys before touching anything.
    selected = [config.runnable(key) for key in args.audiences] if args.audiences else config.active
    if args.allow_removals and not args.audiences:
        raise ConfigError(
            "--allow-removals releases the guard for named audiences only",
            fix="add --audience KEY for each audience whose removals you have checked",
        )
    if args.all_calls and not args.dry_run:
        raise ConfigError("--all-calls lists a dry run's calls. Fix: add --dry-run, or drop --all-calls")
    if not args.dry_run and config.gleap.api_token is None:
        raise MissingTokenError()
    _require_drivers(config, selected)
    try:
        engine = store.engine_for(config.store)
    except StoreMissingError:
        if not args.dry_run:
            raise
        # The dry run of a first sync: plan against an empty store in memory,
        # and leave no file behind.
        engine = store.empty_store()
    lease = WriterLease(engine, store.utc_now, ttl_seconds=config.sync.lease_seconds, role="sync")
    interrupt = Interrupt(Sources(config.sources))
    # A dry run alerts nothing: it changes nothing, and may plan against a store in memory.
    alerts = Alerts.of(config, None if args.dry_run else engine)
    listing = Listing.for_output(
        table=args.format == "table", terminal=sys.stdout.isatty(), all_calls=args.all_calls
    )
    try:
        if args.dry_run:
            # A dry run writes nothing, so it needs no lease and never waits for one.
            with interrupt:
                report = interrupt.run(
                    lambda: _run_cycle(args, config, store.Store(engine), interrupt, alerts, listing=listing)
                )
        else:
            store.upgrade(engine)
            # A daemon never finishes: what names audiences (or asks for --full) is handed to it.
            asks = bool(args.audiences or args.full or args.allow_removals)
            daemon = daemon_holding(engine) if asks else None
            if daemon is not None:
                return ask_daemon(args, config, engine, daemon)
            with interrupt, lease.held(args.wait or 0.0):
                fenced = store.Store(engine, fence=lease.check)
                # As the daemon: stalled past its lease, it sends Gleap nothing more.
                sure = functools.partial(lease.require, lease.holder)
                report = interrupt.run(lambda: _run_cycle(args, config, fenced, interrupt, alerts, sure))
    finally:
        alerts.close()  # a short, bounded grace for the cycle's alerts
        engine.dispose()
    if args.dry_run:
        cut = listing.note(report.calls + report.track_calls)
        if cut is not None:  # on a terminal only: under the calls, before the summary
            print(cut, file=sys.stdout, flush=True)
        # stdout holds only the calls, so `--format csv > calls.csv` is a clean file.
        print_summary(
            report, sys.stderr, url=identify_url(config.gleap), track_target=track_url(config.gleap)
        )
    else:
        # Rows only on stdout in csv/json/jsonl; what is said about them goes aside.
        print_summary(
            report, sys.stdout, args.format, notes=sys.stdout if args.format == "table" else sys.stderr
        )
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


class Interrupt:
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

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def run(self, work: Callable[[], T]) -> T:
        """Do ``work`` on a worker thread, the main thread only waiting for it.

        Python runs signal handlers on the main thread, between bytecodes: a main
        thread stuck in a driver's C call (a slow source query) would never see
        the signal that should cancel that very query.
        """
        outcome: list[T] = []
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


def _run_cycle(
    args: argparse.Namespace,
    config: Config,
    target: store.Store,
    interrupt: Interrupt,
    alerts: Alerts,
    before_send: Callable[[], None] | None = None,
    *,
    listing: Listing | None = None,
) -> CycleReport:
    syncer = Syncer(config, target, sources=interrupt.sources, alerts=alerts)
    syncer.before_send = before_send
    try:
        return syncer.run_cycle(
            args.audiences,
            full=args.full,
            dry_run=args.dry_run,
            show_calls=lambda calls: write_calls(
                sys.stdout, args.format, (listing or Listing(None)).take(calls)
            ),
            rows=True,  # the plain calls as the plan's rows: written a block at a time
            progress=progress_bar if sys.stderr.isatty() else None,
            allow_removals=args.allow_removals,
            stop=interrupt.stop,
        )
    finally:
        syncer.sources.dispose()


def progress_bar(total: int) -> Progress:
    bar = tqdm(total=total, unit="call", desc="delivering", file=sys.stderr, dynamic_ncols=True)

    def tick(done: int) -> None:
        bar.update(done)
        if bar.n >= total:
            bar.close()

    return tick


SUMMARY_COLUMNS = (
    "audience", "result", "mode", "members", "entered", "left", "sent", "failed",
    "pending", "parked", "unknown", "skipped", "events_sent", "events_pending", "changed", "kind",
    "field_warnings", "field_conflicts",
)  # fmt: skip
# A held, failed or aborted run must show on any terminal.
SUMMARY_LAYOUT = Layout(keep=("audience", "result"))


def print_summary(
    report: CycleReport,
    out: IO[str],
    fmt: str = "table",
    *,
    notes: IO[str] | None = None,
    url: str | None = None,
    track_target: str | None = None,
) -> None:
    """The per-audience rows on ``out``, then what needs saying about them on ``notes`` (default ``out``).

    ``url``: where a dry run's calls would go.
    """
    rows = (
        (
            a.key,
            a.status,
            a.mode,
            a.members,
            a.entered,
            a.left,
            a.sent,
            a.failed,
            a.pending,
            a.parked,
            a.unknown,
            a.skipped_rows,
            a.events_sent,
            a.events_pending,
            a.changed,  # members with a new value (a trait's); last, so a narrow table keeps the rest
            a.kind,
            a.field_warnings,  # contact fields skipped for a wrong-typed value
            a.field_conflicts,  # fields sent with an earlier audience's value
        )
        for a in report.audiences
    )
    notes = notes or out
    write_rows(out, fmt, SUMMARY_COLUMNS, rows, layout=SUMMARY_LAYOUT, notes=notes)
    if report.dry_run:
        target = f" (POST {url})" if url else ""
        tracks = ""
        if report.track_calls:
            tracks = (
                f", then {report.track_calls} track call(s) with {report.events} event(s)"
                f"{f' (POST {track_target})' if track_target else ''}"
            )
        print(
            f"dry run: {report.calls} call(s) would be made{target}{tracks}; nothing was sent or stored",
            file=notes,
        )
    for a in report.audiences:
        if a.error:
            print(f"{a.key}: {a.error}", file=notes)
        if a.invalid_samples:
            print(f"{a.key}: skipped invalid ids, e.g. {'; '.join(a.invalid_samples)}", file=notes)
        for note in a.field_notes:
            print(f"{a.key}: {note}", file=notes)
        if a.field_conflicts:
            print(
                f"{a.key}: {a.field_conflicts} field(s) went out with the value of an audience listed "
                "before it in the config, which wins",
                file=notes,
            )
        if a.value_samples:
            print(
                f"{a.key}: skipped {a.skipped_values} value(s) Gleap can't hold, "
                f"e.g. {'; '.join(a.value_samples)}",
                file=notes,
            )
    parked = sum(a.parked for a in report.audiences)
    if parked:
        print(
            f"{parked} change(s) are parked after repeated rejections; see `audiencesync failures`, "
            "fix the cause, then `audiencesync retry`",
            file=notes,
        )
    events_parked = sum(a.events_parked for a in report.audiences)
    if events_parked:
        print(
            f"{events_parked} event(s) are parked after repeated rejections; see `audiencesync failures`, "
            "fix the cause, then `audiencesync retry`",
            file=notes,
        )
    unknown = sum(a.unknown for a in report.audiences)
    if unknown and not report.dry_run:
        print(
            f"{unknown} call(s) got no verdict from Gleap (it may have applied them); "
            "they stay pending and go out again",
            file=notes,
        )
