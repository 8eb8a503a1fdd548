"""Where the daemon's memory goes: the daemon in-process, on an accelerated schedule, with
tracemalloc snapshots, RSS and live-object counts at intervals (issue 22, item 3).

Not the soak (bench/soak.py runs the real process for an hour and judges it): this is the
investigation tool. It runs ``scheduler.Daemon`` in its main thread, as `audiencesync run`
does (signal handlers included, so the SIGHUPs it sends are the real thing), against the
Gleap stand-in in a subprocess of its own (so that the stand-in's memory is not counted)
answering with random faults, and a SQLite source whose memberships churn. Every
``--snap-every`` seconds it prints RSS, tracemalloc's total, threads and gc's object count,
then the top growers since the last snapshot (``compare_to(previous, 'traceback')``) and
the object types whose count grew. At the end: the slope of RSS and of tracemalloc's total
after the warm-up, in MB/h of wall time.

    nice -n 15 .venv/bin/python -m bench.memory_probe --minutes 15
    nice -n 15 .venv/bin/python -m bench.memory_probe --minutes 15 --no-trace   # RSS alone
    ... --store-url postgresql+psycopg://postgres@127.0.0.1:5432/memory_test

The stand-in runs as ``python -m bench.memory_standin`` (see there). ``--lock-every`` locks the store
against writes as the soak does (bench/soak_world.StoreLock), to see what an outage leaves.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import linecache
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.memory_measure import (
    c_heap,
    cache_sizes,
    dump_cache,
    held_by_caches,
    malloc_free_sizes,
    pymalloc,
    rss_mb,
    rss_parts,
    show_growth,
    slope_mb_per_hour,
    sqlite_connections,
    store_sizes,
    survivors,
    trim,
    type_counts,
)
from bench.memory_scenario import Source, free_port, write_config
from bench.memory_standin import TOKEN


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=3, help="minutes left out of the slope")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--audiences", type=int, default=3)
    parser.add_argument("--refresh", type=float, default=3, help="seconds between an audience's refreshes")
    parser.add_argument("--churn", type=float, default=0.02, help="share of memberships moved per churn")
    parser.add_argument("--churn-every", type=float, default=5)
    parser.add_argument("--rpm", type=int, default=1200)
    parser.add_argument("--snap-every", type=float, default=60)
    parser.add_argument("--hup-every", type=float, default=120, help="seconds between SIGHUPs (0: none)")
    parser.add_argument("--outage-every", type=float, default=180, help="seconds between outages (0: none)")
    parser.add_argument("--outage-seconds", type=float, default=15)
    parser.add_argument(
        "--outage-status", type=int, default=None, help="an outage answers this status (default: refused)"
    )
    parser.add_argument("--lock-every", type=float, default=0, help="seconds between store locks (0: none)")
    parser.add_argument("--lock-seconds", type=float, default=40)
    parser.add_argument("--lease-seconds", type=int, default=15, help="[sync] lease_seconds (the soak: 60)")
    parser.add_argument(
        "--scrape-every", type=float, default=5, help="GET /metrics, /healthz and / (0: none)"
    )
    parser.add_argument("--store-url", default=None, help="default: a SQLite file in a temporary directory")
    parser.add_argument("--no-trace", action="store_true", help="RSS and object counts only")
    parser.add_argument(
        "--trace-window",
        default=None,
        help="FROM:UNTIL seconds: trace allocations only then (with --no-trace), and print what survives",
    )
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) before each measure")
    parser.add_argument(
        "--dump-cache", action="store_true", help="at the end, the store engine's compiled statements"
    )
    parser.add_argument(
        "--dump-statements", type=Path, default=None, help="at the end, each cached statement's text, there"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the series here")
    args = parser.parse_args(argv)

    from audiencesync.config.loading import load_config
    from audiencesync.daemon.scheduler import Daemon
    from audiencesync.store import store as store_mod
    from bench.soak_world import StoreLock

    if args.store_url:
        from tests import postgres_guard

        refusal = postgres_guard.refusal(args.store_url)
        if refusal is not None:
            parser.error(refusal)
    from audiencesync.daemon.arenas import tune_malloc

    tune_malloc()  # as `audiencesync run` does, before any thread starts
    if not args.no_trace:
        tracemalloc.start(25)
    tmp = Path(tempfile.mkdtemp(prefix="memory-probe-"))
    logging.basicConfig(
        level=logging.INFO,
        handlers=[logging.FileHandler(tmp / "daemon.log")],
        format="%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s",
    )
    standin = subprocess.Popen(
        [sys.executable, "-m", "bench.memory_standin", "--token", TOKEN]
        + ([] if args.outage_status is None else ["--down-status", str(args.outage_status)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert standin.stdout is not None
    ready = standin.stdout.readline().split()
    base_url = ready[1]
    source = Source(tmp / "source.db", args.users, args.audiences)
    store_url = args.store_url or f"sqlite:///{tmp / 'store.db'}"
    if args.store_url:
        engine = store_mod.create_engine(store_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()
    port = free_port()
    write_config(tmp / "audiencesync.toml", store_url, tmp / "source.db", base_url, args, port)
    config = load_config(tmp / "audiencesync.toml")
    engine = store_mod.create_engine(config.store.url, create=True)
    store_mod.upgrade(engine)
    engine.dispose()

    # Quick backoffs, as the tests' in-process daemon has: an outage must not pause delivery
    # for minutes (the production default probes again after 30 s, doubling), cycles are what count.
    daemon = Daemon(config, breaker_backoff=(2.0, 10.0), error_backoff=(0.5, 5.0))
    # Connections the store's pool opened, and the most checked out at once: a lock that makes
    # every thread wait at once shows here as overflow opened and closed.
    pool_use = {"pool_opened": 0, "pool_peak": 0}

    @sa.event.listens_for(daemon.engine, "connect")
    def _opened(*_: Any) -> None:
        pool_use["pool_opened"] += 1

    @sa.event.listens_for(daemon.engine, "checkout")
    def _out(*_: Any) -> None:
        pool_use["pool_peak"] = max(pool_use["pool_peak"], daemon.engine.pool.checkedout())  # type: ignore[attr-defined]

    daemon.install_signal_handlers()
    print(
        f"probe: {tmp}, store {store_url.split('@')[-1]}, stand-in {base_url}, pid {os.getpid()}", flush=True
    )
    series: list[dict[str, Any]] = []
    # gc's object counts by type at the end of the warm-up and at the last snapshot: what the
    # run kept on net, not what each minute's churn grew.
    at_warmup: list[collections.Counter[str]] = []
    last_counts: list[collections.Counter[str]] = []

    def monitor() -> None:
        started = time.monotonic()
        end = started + args.minutes * 60
        next_snap = started
        next_churn = started + args.churn_every
        next_hup = started + args.hup_every if args.hup_every else float("inf")
        next_outage = started + args.outage_every if args.outage_every else float("inf")
        next_lock = started + args.lock_every if args.lock_every else float("inf")
        outage_ends = float("inf")
        next_scrape = started + args.scrape_every if args.scrape_every else float("inf")
        previous: tracemalloc.Snapshot | None = None
        counts = type_counts()
        modules_seen: set[str] = set()
        window = [float(x) for x in args.trace_window.split(":")] if args.trace_window else None
        while time.monotonic() < end and not daemon.stop.is_set():
            now = time.monotonic()
            if now >= next_churn:
                next_churn += args.churn_every
                source.move(args.churn)
            if now >= next_hup:
                next_hup += args.hup_every
                os.kill(os.getpid(), signal.SIGHUP)
            if now >= next_outage:
                next_outage += args.outage_every
                outage_ends = now + args.outage_seconds
                standin.send_signal(signal.SIGUSR1)
            if now >= next_lock:
                next_lock += args.lock_every
                print(f"[{now - started:7.0f}s] store lock for {args.lock_seconds:g} s", flush=True)
                threading.Thread(
                    target=StoreLock(store_url).hold,
                    args=(args.lock_seconds, threading.Event()),
                    name="store-lock",
                    daemon=True,
                ).start()
            if now >= outage_ends:
                outage_ends = float("inf")
                standin.send_signal(signal.SIGUSR2)
            if window and not tracemalloc.is_tracing() and now - started >= window[0]:
                print(f"[{now - started:7.0f}s] tracing allocations until {window[1]:g} s", flush=True)
                tracemalloc.start(16)
            if window and tracemalloc.is_tracing() and now - started >= window[1]:
                window = None
                survivors(args.top)
            if now >= next_scrape:
                next_scrape += args.scrape_every
                for path in ("/metrics", "/healthz", "/"):
                    with contextlib.suppress(OSError):
                        urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()
            if now >= next_snap:
                next_snap += args.snap_every
                gc.collect()
                if args.trim:
                    trim()
                point: dict[str, Any] = {
                    "t": round(now - started, 1),
                    "rss_mb": round(rss_mb(), 2),
                    "threads": threading.active_count(),
                    "objects": len(gc.get_objects()),
                    # Source files read for a traceback or a warning stay in linecache for good.
                    "linecache_files": len(linecache.cache),
                    # A module first imported late (an error path's) is memory a warm-up did not see.
                    "modules": len(sys.modules),
                    "linecache_mb": round(
                        sum(sum(map(len, e[2])) for e in linecache.cache.values() if len(e) > 2) / 2**20, 2
                    ),
                }
                snapshot = None
                if not args.no_trace:
                    snapshot = tracemalloc.take_snapshot().filter_traces(
                        [
                            tracemalloc.Filter(False, tracemalloc.__file__),
                            tracemalloc.Filter(False, linecache.__file__),
                        ]
                    )
                    point["traced_mb"] = round(
                        sum(s.size for s in snapshot.statistics("filename")) / 2**20, 2
                    )
                point |= store_sizes(daemon.engine) | pool_use
                engines = {"store": daemon.engine}
                for n, e in getattr(daemon.syncer.sources, "_engines", {}).items():
                    engines[f"src_{n}"] = e
                point |= sqlite_connections(engines)
                point |= rss_parts() | pymalloc() | c_heap() | malloc_free_sizes() | cache_sizes(daemon)
                series.append(point)
                print(
                    f"[{point['t']:7.0f}s] " + "  ".join(f"{k}={v}" for k, v in point.items() if k != "t"),
                    flush=True,
                )
                imported = sorted(set(sys.modules) - modules_seen)
                if imported and modules_seen:
                    print("  imported: " + ", ".join(imported))
                modules_seen.update(imported)
                fresh = type_counts()
                grown = [(name, n - counts[name]) for name, n in fresh.items() if n - counts[name] > 50]
                if grown:
                    print(
                        "  objects: "
                        + ", ".join(f"{name} +{d}" for name, d in sorted(grown, key=lambda x: -x[1])[:10])
                    )
                counts = fresh
                if not at_warmup and point["t"] >= args.warmup * 60:
                    at_warmup.append(fresh)
                last_counts[:] = [fresh]
                if snapshot is not None and previous is not None:
                    show_growth(snapshot, previous, args.top)
                previous = snapshot
            time.sleep(0.2)
        if outage_ends != float("inf"):
            standin.send_signal(signal.SIGUSR2)
        held_by_caches(daemon.engine)  # while the daemon still runs: its pool is still full
        daemon.request_stop()

    def watch() -> None:
        try:
            monitor()
        finally:
            daemon.request_stop()  # a probe that failed must not leave the daemon running

    watcher = threading.Thread(target=watch, name="probe", daemon=True)
    watcher.start()
    try:
        daemon.run()
    finally:
        standin.terminate()
        standin.wait()
    if args.dump_cache or args.dump_statements:
        dump_cache(daemon, args.dump_statements)
    warm = [p for p in series if p["t"] >= args.warmup * 60]
    print(f"\nafter {args.warmup:g} min of warm-up, {len(warm)} points:")
    print(f"  RSS slope       {slope_mb_per_hour([(p['t'], p['rss_mb']) for p in warm]):7.2f} MB/h")
    if not args.no_trace:
        print(f"  traced slope    {slope_mb_per_hour([(p['t'], p['traced_mb']) for p in warm]):7.2f} MB/h")
    objects = slope_mb_per_hour([(p["t"], p["objects"]) for p in warm])
    print(f"  objects slope   {objects:9.0f} /h")
    if at_warmup and last_counts:
        net = last_counts[0] - at_warmup[0]
        print("  kept on net since the warm-up: " + ", ".join(f"{n} +{d}" for n, d in net.most_common(15)))
    if args.json is not None:
        args.json.write_text(json.dumps(series, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
