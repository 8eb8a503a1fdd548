"""Speed and memory of the diff and of delivery, each set against a naive baseline.

Run from the repository root (a minute or two at the default size, on 2 cores)::

    python bench/diff_bench.py
    python bench/diff_bench.py --members 200000 --store postgresql \\
        --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test

``--store postgresql`` starts with DROP SCHEMA public CASCADE: point it only at a scratch database.

What the figures mean. Each phase runs in a fresh subprocess, so its peak RSS (VmHWM) is its
own, interpreter and imports included (the "floor" row is those alone), and its time is the wall
time of the work, start-up excluded. The machine is shared and noisy, so read the ratios to a
baseline measured in the same run ("x" columns: real / baseline) rather than the absolute numbers:

* refresh initial / churn / no change: ``Store.refresh`` fed by ``Sources.read_ids`` (stage the
  source's ids in the store, anti-join, write the snapshot and the change log), against a naive diff
  that loads the source and the snapshot into Python sets and subtracts them, writing nothing. The
  real path does more work, so a time ratio above 1 is expected; it streams, so its RSS ratio should
  be below 1, and fall as --members grows.
* pending read: ``call_turns.plan_calls`` over the N members the initial refresh left pending, read
  as delivery reads them; the note gives seconds per million rows. No baseline.
* delivery: a real ``Syncer`` cycle sending ``--calls`` identify calls to the loopback Gleap
  stand-in (in its own process), against a bare httpx loop posting the same bodies at the same
  concurrency with no store: the time ratio is audiencesync's overhead.

Counts are checked too (members, entered, left, pending rows, acknowledged calls, and the naive diff
against the real one): a mismatch is printed below the table and the exit status is 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/diff_bench.py` puts bench/ on sys.path, not the repository root: the root makes
# tests/ (the Gleap stand-in) importable, and the audiencesync measured the one in this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator

import httpx
import sqlalchemy as sa

from audiencesync import store as store_mod
from audiencesync.call_turns import plan_calls
from audiencesync.config import Config, load_config
from audiencesync.schema import memberships
from audiencesync.sources import ReadStats, Sources
from audiencesync.store import Audience, Store
from audiencesync.sync import Syncer
from bench import report
from bench.report import Figures, row
from tests import gleap_standin, postgres_guard

TOKEN = "bench-token"
CONCURRENCY = 8
KEY = "bench"


def write_config(path: Path, store_url: str, source_url: str, table: str, gleap_url: str) -> Path:
    """A config file, rather than Config(...) directly, so the bench survives new config fields."""
    path.write_text(
        textwrap.dedent(
            f"""
            [store]
            url = "{store_url}"

            [gleap]
            base_url = "{gleap_url}"
            api_token = "{TOKEN}"
            # Far above what the stand-in can serve: the limiter must not be what is measured.
            requests_per_minute = 10_000_000
            max_concurrency = {CONCURRENCY}

            [sources.src]
            url = "{source_url}"

            [[audiences]]
            name = "{KEY}"
            source = "src"
            query = "SELECT user_id FROM {table}"
            """
        )
    )
    path.chmod(0o600)  # it holds a token
    return path


# --- phases, each run in its own subprocess -------------------------------------------------


def _open_store(config: Config) -> tuple[Store, Audience]:
    store = Store(store_mod.create_engine(config.store.url))
    return store, store.ensure_audience(KEY, KEY)


def _source_ids(config: Config) -> list[str]:
    audience = config.audiences[0]
    with sa.create_engine(config.sources[audience.source].url).connect() as conn:
        return list(conn.execute(sa.text(audience.query)).scalars())


def phase_floor(config: Config) -> Figures:
    return {"seconds": 0.0}


def phase_naive(config: Config) -> Figures:
    store, audience = _open_store(config)
    start = time.perf_counter()
    ids = set(_source_ids(config))
    with store.engine.connect() as conn:
        snapshot = set(
            conn.execute(
                sa.select(memberships.c.user_id).where(
                    memberships.c.audience_id == audience.id, memberships.c.desired == sa.true()
                )
            ).scalars()
        )
    entered, left = ids - snapshot, snapshot - ids
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "members": len(ids), "entered": len(entered), "left": len(left)}


def phase_refresh(config: Config) -> Figures:
    store, audience = _open_store(config)
    run_id = store.start_run("bench", audience, "initial" if audience.refreshed_at is None else "incremental")
    batches = Sources(config.sources).read_ids(config.audiences[0], ReadStats())
    start = time.perf_counter()
    refresh = store.refresh(audience, run_id, batches, full=False)
    seconds = time.perf_counter() - start
    store.finish_run(run_id, "succeeded")
    counts = refresh.counts
    return {
        "seconds": seconds,
        "members": counts.members,
        "entered": counts.entered,
        "left": counts.left,
        "held": refresh.held,
    }


def phase_pending(config: Config) -> Figures:
    # Right after the refresh, as a cycle reads it: on PostgreSQL before autovacuum has analyzed.
    store, audience = _open_store(config)
    start = time.perf_counter()
    calls = plan_calls(store, [audience.id], keys={audience.id: audience.key})
    rows = sum(len(call.changes) for _, call in calls)
    return {"seconds": time.perf_counter() - start, "rows": rows}


def phase_deliver(config: Config) -> Figures:
    syncer = Syncer(config, Store(store_mod.create_engine(config.store.url)))
    # The parent refreshed already, so this times delivery plus a no-change refresh of --calls ids.
    start = time.perf_counter()
    report = syncer.run_cycle()
    seconds = time.perf_counter() - start
    audience = report.audiences[0]
    return {
        "seconds": seconds,
        "calls": report.calls,
        "acked": audience.sent,
        "retries": audience.retries,
        "status": audience.status,
    }


def phase_bare(config: Config) -> Figures:
    user_ids = _source_ids(config)

    async def post_all() -> int:
        # Same pool and concurrency as GleapClient, so only audiencesync's own work differs.
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        todo = iter(user_ids)
        async with httpx.AsyncClient(
            base_url=config.gleap.base_url, headers={"Api-Token": TOKEN}, limits=limits, timeout=30
        ) as client:

            async def worker() -> int:
                acked = 0
                for user_id in todo:
                    response = await client.post("/admin/identify", json={KEY: True, "userId": user_id})
                    acked += response.is_success
                return acked

            return sum(await asyncio.gather(*(worker() for _ in range(CONCURRENCY))))

    start = time.perf_counter()
    acked = asyncio.run(post_all())
    return {"seconds": time.perf_counter() - start, "calls": len(user_ids), "acked": acked}


PHASES = {
    "floor": phase_floor,
    "naive": phase_naive,
    "refresh": phase_refresh,
    "pending": phase_pending,
    "deliver": phase_deliver,
    "bare": phase_bare,
}


def serve_standin() -> None:
    # A process of its own: in the client's process its threads would share the client's GIL.
    with gleap_standin.GleapStandIn(TOKEN) as standin:
        print(f"READY {standin.base_url}", flush=True)
        sys.stdin.read()  # until the parent closes our stdin


# --- the parent: data, stores, orchestration, the table -------------------------------------


def run_phase(name: str, config: Path) -> Figures:
    return report.run_phase(__file__, "--phase", name, "--config", str(config))


@contextlib.contextmanager
def standin_process() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--phase", "standin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"the Gleap stand-in did not start: {line!r}")
        yield line.split()[1]
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def write_source(path: Path, table: str, ids: list[str]) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"CREATE TABLE {table} (user_id TEXT)")
        conn.executemany(f"INSERT INTO {table} VALUES (?)", ((i,) for i in ids))


def churn_source(path: Path, members: int, half: int) -> None:
    """``half`` members leave and as many new ones enter."""
    # By rowid: the source has no index on user_id (one would make SQLite read it back sorted).
    leaving = random.Random(2).sample(range(1, members + 1), half)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany("DELETE FROM members WHERE rowid = ?", ((r,) for r in leaving))
        conn.executemany(
            "INSERT INTO members VALUES (?)", ((f"user-{members + 1 + j:07d}",) for j in range(half))
        )


def fresh_store(args: argparse.Namespace, sqlite_path: Path) -> str:
    if args.store == "sqlite":
        url = f"sqlite:///{sqlite_path}"
    else:
        url = args.postgres_url
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()
    engine = store_mod.create_engine(url, create=True)
    store_mod.upgrade(engine)
    engine.dispose()
    return url


def bench(args: argparse.Namespace) -> int:
    half = round(args.members * args.churn / 2)
    problems: list[str] = []
    rows: list[report.Row] = []

    def refresh_row(phase: str, config: Path, expected: tuple[int, int, int]) -> None:
        naive, real = run_phase("naive", config), run_phase("refresh", config)
        before = len(problems)
        for who, got in (("refresh", real), ("naive", naive)):
            counts = (got["members"], got["entered"], got["left"])
            if counts != expected:
                problems.append(f"{phase}: {who} gave (members, entered, left) {counts}, expected {expected}")
        if real["held"] is not None:
            problems.append(f"{phase}: the refresh was held: {real['held']}")
        note = f"members {real['members']:,} entered {real['entered']:,} left {real['left']:,}"
        rows.append(row(phase, real, naive, note + (" ok" if len(problems) == before else " WRONG")))

    with tempfile.TemporaryDirectory(prefix="diff_bench_") as tmp:
        work = Path(tmp)
        source = work / "source.db"
        source_url = f"sqlite:///{source}"
        ids = [f"user-{i:07d}" for i in range(1, args.members + 1)]
        # Shuffled, as a real query returns them: sorted ids would flatter the staging inserts.
        random.Random(1).shuffle(ids)
        write_source(source, "members", ids)
        write_source(source, "delivery_members", [f"dlv-{i:07d}" for i in range(args.calls)])
        del ids
        store_url = fresh_store(args, work / "store.db")
        config = write_config(work / "bulk.toml", store_url, source_url, "members", "http://127.0.0.1:9")

        floor = run_phase("floor", config)
        rows.append(("floor (imports only)", "-", f"{floor['rss_mb']:.0f}", "-", "-", "-", "-", ""))
        refresh_row("refresh initial", config, (args.members, args.members, 0))

        pending = run_phase("pending", config)
        if pending["rows"] != args.members:
            problems.append(f"pending read: {pending['rows']} rows, expected {args.members}")
        per_million = pending["seconds"] * 1e6 / max(pending["rows"], 1)
        note = f"{pending['rows']:,} rows, {per_million:.2f} s per 1M"
        rows.append(row("pending read", pending, None, note))

        churn_source(source, args.members, half)
        refresh_row(f"refresh churn {args.churn:g}", config, (args.members, half, half))
        refresh_row("refresh no change", config, (args.members, 0, 0))

        # Its own store: the bulk audience's million pending rows are not what this measures.
        store_url = fresh_store(args, work / "delivery.db")
        with standin_process() as gleap_url:
            config = write_config(
                work / "delivery.toml", store_url, source_url, "delivery_members", gleap_url
            )
            run_phase("refresh", config)  # so that the cycle finds --calls changes pending
            bare, real = run_phase("bare", config), run_phase("deliver", config)
        if (bare["acked"], real["calls"], real["acked"], real["status"]) != (*[args.calls] * 3, "succeeded"):
            problems.append(f"delivery: expected {args.calls} acked; bare acked {bare['acked']}, got {real}")
        rate, bare_rate = real["calls"] / real["seconds"], bare["calls"] / bare["seconds"]
        note = f"{rate:,.0f} vs bare {bare_rate:,.0f} calls/s, {real['retries']} retries"
        rows.append(row(f"delivery {args.calls:,} calls", real, bare, note))

    return report.report(
        f"audiencesync diff bench: {args.members:,} members, churn {args.churn:g} "
        f"({half:,} leave, {half:,} enter), store {args.store}, {os.cpu_count()} CPUs",
        rows,
        problems,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--churn", type=float, default=0.01, help="fraction of members replaced")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("AUDIENCESYNC_TEST_POSTGRES_URL"),
        help="a SCRATCH database: its public schema is dropped (default: $AUDIENCESYNC_TEST_POSTGRES_URL)",
    )
    parser.add_argument("--calls", type=int, default=5000, help="identify calls in the delivery phase")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase == "standin":
        serve_standin()
        return 0
    if args.phase:
        figures = PHASES[args.phase](load_config(args.config))
        figures["rss_mb"] = report.peak_rss_mb()
        print(json.dumps(figures))
        return 0

    if args.store == "postgresql" and not args.postgres_url:
        parser.error("--store postgresql needs --postgres-url or AUDIENCESYNC_TEST_POSTGRES_URL")
    if args.store == "postgresql" and (refusal := postgres_guard.refusal(args.postgres_url)):
        parser.error(refusal)
    if args.members < 1 or not 0 <= args.churn <= 1 or args.calls < 1:
        parser.error("--members and --calls must be positive and --churn between 0 and 1")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
