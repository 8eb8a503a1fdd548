"""Delivery's speed, CPU and memory: a real ``Syncer`` cycle against the loopback Gleap stand-in.

Run from the repository root::

    python bench/delivery_bench.py                       # 5,000 calls, SQLite, no limit
    python bench/delivery_bench.py --store postgresql    # $AUDIENCESYNC_TEST_POSTGRES_URL (a SCRATCH db)
    python bench/delivery_bench.py --audiences 3 --users 20000,100000   # peak RSS as users grow
    python bench/delivery_bench.py --limit 1200 --calls 3000            # the enforced-limit case
    python bench/delivery_bench.py --profile                            # cProfile's top entries
    python bench/delivery_bench.py --profile --profile-out /tmp/d.prof  # and the raw stats, for pstats

``--store postgresql`` starts with DROP SCHEMA public CASCADE: point it only at a scratch database.

Each phase runs in a fresh subprocess (its peak RSS is its own), and the stand-in in one more (in
the client's process its threads would share the client's GIL). Figures, per size:

* bare: a plain httpx loop posting the same bodies at the same concurrency, with no store: the floor.
* deliver: ``Syncer.run_cycle`` after a refresh already made every user pending, so it times
  delivery (plus a no-change refresh). calls/s, CPU seconds per 1,000 calls (the process's user +
  system time, the stand-in's excluded), peak RSS; "x" is real / bare.
* with ``--audiences 3``: three overlapping audiences (all users; every 2nd; every 3rd), so a user
  is due in up to three of them; the calls made must equal the distinct users.
* with ``--limit N``: the stand-in answers 429 past N requests a minute (sliding window) and the
  config sets ``requests_per_minute = N``: the share of the limit reached and the 429s after the
  first minute are printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import sqlite3
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator

from bench import report
from bench.report import Figures
from tests import gleap_standin, postgres_guard

TOKEN = "bench-token"
CONCURRENCY = 8
KEYS = ("bench_a", "bench_b", "bench_c")


def write_config(path: Path, store_url: str, source: Path, gleap_url: str, audiences: int, rpm: int) -> Path:
    blocks = "".join(
        textwrap.dedent(
            f"""
            [[audiences]]
            name = "{key}"
            source = "src"
            query = "SELECT user_id FROM members WHERE n % {n + 1} = 0"
            """
        )
        for n, key in enumerate(KEYS[:audiences])
    )
    path.write_text(
        textwrap.dedent(
            f"""
            [store]
            url = "{store_url}"

            [gleap]
            base_url = "{gleap_url}"
            api_token = "{TOKEN}"
            requests_per_minute = {rpm}
            max_concurrency = {CONCURRENCY}

            [sources.src]
            url = "sqlite:///{source}"
            """
        )
        + blocks
    )
    path.chmod(0o600)  # it holds a token
    return path


# --- phases, each in its own subprocess --------------------------------------------------------


def phase_refresh(config_path: Path, _: argparse.Namespace) -> Figures:
    from audiencesync.config.loading import load_config
    from audiencesync.refresh.sources import Sources
    from audiencesync.refresh.user_ids import ReadStats
    from audiencesync.store import store as store_mod

    config = load_config(config_path)
    store = store_mod.Store(store_mod.create_engine(config.store.url))
    for audience in config.audiences:
        row = store.ensure_audience(audience.key, audience.name)
        run_id = store.start_run("bench", row, "initial")
        store.refresh(row, run_id, Sources(config.sources).read_ids(audience, ReadStats()), full=False)
        store.finish_run(run_id, "succeeded")
    return {"seconds": 0.0}


def phase_deliver(config_path: Path, args: argparse.Namespace) -> Figures:
    from audiencesync.config.loading import load_config
    from audiencesync.store import store as store_mod
    from audiencesync.sync.cycle import Syncer

    config = load_config(config_path)
    syncer = Syncer(config, store_mod.Store(store_mod.create_engine(config.store.url)))
    profile = cProfile.Profile() if args.profile else None
    cpu, start = time.process_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    result = syncer.run_cycle()
    if profile is not None:
        profile.disable()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    figures: Figures = {
        "seconds": seconds,
        "cpu": cpu,
        "calls": result.calls,
        "acked": sum(a.sent for a in result.audiences),
        "ok": all(a.status == "succeeded" for a in result.audiences),
    }
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.profile_top)
        figures["profile"] = out.getvalue()
        if args.profile_out:
            profile.dump_stats(args.profile_out)
    return figures


def phase_bare(config_path: Path, _: argparse.Namespace) -> Figures:
    import httpx

    from audiencesync.config.loading import load_config

    config = load_config(config_path)
    with contextlib.closing(sqlite3.connect(config.sources["src"].url.removeprefix("sqlite:///"))) as conn:
        user_ids = [r[0] for r in conn.execute("SELECT user_id FROM members")]

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
                    response = await client.post("/admin/identify", json={KEYS[0]: True, "userId": user_id})
                    acked += response.is_success
                return acked

            return sum(await asyncio.gather(*(worker() for _ in range(CONCURRENCY))))

    cpu, start = time.process_time(), time.perf_counter()
    acked = asyncio.run(post_all())
    return {
        "seconds": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "calls": len(user_ids),
        "acked": acked,
    }


PHASES = {"refresh": phase_refresh, "deliver": phase_deliver, "bare": phase_bare}


class _TimedStandIn(gleap_standin.GleapStandIn):
    """The stand-in, also keeping when each identify was answered and with what status."""

    def __init__(self, token: str, limit: int | None) -> None:
        super().__init__(token, rate_limit_per_minute=limit)
        self.answered: list[tuple[float, int]] = []
        self._times_lock = threading.Lock()

    def _record(self, seq: int, request: gleap_standin.RecordedRequest) -> None:
        # Only the (time, status) pairs: the request log itself would grow with every call.
        with self._times_lock:
            self.answered.append((time.monotonic(), request.status))


def serve_standin(limit: int | None) -> None:
    standin = _TimedStandIn(TOKEN, limit)
    with standin:
        print(f"READY {standin.base_url}", flush=True)
        for line in sys.stdin:  # one line per question from the parent, until it closes stdin
            first = standin.answered[0][0] if standin.answered else 0.0
            times = [(t - first, status) for t, status in standin.answered]
            print(json.dumps({"answered": times}), flush=True)
            standin.answered.clear()
            del line


@contextlib.contextmanager
def standin_process(limit: int | None) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    command = [sys.executable, __file__, "--phase", "standin"] + (["--limit", str(limit)] if limit else [])
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"the Gleap stand-in did not start: {line!r}")
        yield line.split()[1], proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def answered(proc: subprocess.Popen[str]) -> list[tuple[float, int]]:
    """The identify answers since the last question: (seconds since the first, status)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("?\n")
    proc.stdin.flush()
    return [(t, s) for t, s in json.loads(proc.stdout.readline())["answered"]]


# --- the parent ---------------------------------------------------------------------------------


def fresh_store(args: argparse.Namespace, path: Path) -> str:
    import sqlalchemy as sa

    from audiencesync.store import store as store_mod

    if args.store == "sqlite":
        url = f"sqlite:///{path}"
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


def run_phase(name: str, config: Path, args: argparse.Namespace) -> Figures:
    extra = ["--profile", "--profile-top", str(args.profile_top)] if args.profile else []
    if args.profile_out:
        extra += ["--profile-out", str(args.profile_out)]
    return report.run_phase(__file__, "--phase", name, "--config", str(config), *extra)


def bench(args: argparse.Namespace) -> int:
    problems: list[str] = []
    rows: list[report.Row] = []
    profiles: list[str] = []
    sizes = [int(n) for n in args.users.split(",")] if args.users else [args.calls]
    rpm = args.limit or 10_000_000  # far above what the stand-in serves: the limiter is not measured
    with (
        tempfile.TemporaryDirectory(prefix="delivery_bench_") as tmp,
        standin_process(args.limit) as (url, proc),
    ):
        work = Path(tmp)
        for users in sizes:
            source = work / f"source{users}.db"
            with contextlib.closing(sqlite3.connect(source)) as conn, conn:
                conn.execute("CREATE TABLE members (user_id TEXT, n INTEGER)")
                conn.executemany(
                    "INSERT INTO members VALUES (?, ?)", ((f"u{i:08d}", i) for i in range(users))
                )
            store_url = fresh_store(args, work / f"store{users}.db")
            config = write_config(work / "bench.toml", store_url, source, url, args.audiences, rpm)
            run_phase("refresh", config, args)
            bare = run_phase("bare", config, args) if not (args.limit or args.no_bare) else None
            answered(proc)  # forget the bare loop's answers
            real = run_phase("deliver", config, args)
            times = answered(proc)
            if "profile" in real:
                profiles.append(f"--- deliver, {users:,} users ---\n{real['profile']}")
            if (real["calls"], real["ok"]) != (users, True):
                problems.append(f"{users:,} users: {real['calls']:,} calls (expected one per user), {real}")
            rate = real["calls"] / real["seconds"]
            note = f"{rate:,.0f} calls/s, {real['cpu'] * 1000 / real['calls']:.2f} CPU s/1k calls"
            if bare is not None:
                bare_rate = bare["calls"] / bare["seconds"]
                note += f"; bare {bare_rate:,.0f} calls/s, {bare['cpu'] * 1000 / bare['calls']:.2f} CPU s/1k"
                note += f"; CPU x {real['cpu'] / bare['cpu']:.2f}"
            if args.limit:
                ok = [t for t, status in times if 200 <= status < 300]
                late_429 = sum(1 for t, status in times if status == 429 and t >= 60)
                span = (ok[-1] - ok[0]) if len(ok) > 1 else 0.0
                share = (len(ok) - 1) / span * 60 / args.limit if span else 0.0
                note += f"; {share:.1%} of {args.limit}/min, 429s: {sum(s == 429 for _, s in times)}"
                note += f" ({late_429} after the first minute)"
                if late_429 or share < 0.95:
                    problems.append(f"enforced limit: {share:.1%} of it, {late_429} 429s after a minute")
            rows.append(report.row(f"deliver {users:,} users x{args.audiences}", real, bare, note))
    code = report.report(
        f"audiencesync delivery bench: store {args.store}, {args.audiences} audience(s), "
        f"max_concurrency {CONCURRENCY}, {os.cpu_count()} CPUs",
        rows,
        problems,
    )
    for text in profiles:
        print(text)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", type=int, default=5000, help="users (one call each) when --users is not given"
    )
    parser.add_argument("--users", help="comma-separated sizes, one run each (e.g. 20000,100000)")
    parser.add_argument("--audiences", type=int, choices=(1, 2, 3), default=1)
    parser.add_argument("--limit", type=int, help="the stand-in's requests a minute, and the config's")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default=os.environ.get("AUDIENCESYNC_TEST_POSTGRES_URL"))
    parser.add_argument(
        "--profile", action="store_true", help="print cProfile's top entries of each delivery"
    )
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument(
        "--profile-out",
        type=Path,
        help="also save the raw cProfile stats there (pstats; e.g. /tmp/deliver.prof)",
    )
    parser.add_argument("--no-bare", action="store_true", help="skip the bare httpx loop (memory runs)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "standin":
        serve_standin(args.limit)
        return 0
    if args.phase:
        figures = PHASES[args.phase](args.config, args)
        figures["rss_mb"] = report.peak_rss_mb()
        print(json.dumps(figures))
        return 0
    if args.store == "postgresql" and not args.postgres_url:
        parser.error("--store postgresql needs --postgres-url or AUDIENCESYNC_TEST_POSTGRES_URL")
    if args.store == "postgresql" and (refusal := postgres_guard.refusal(args.postgres_url)):
        parser.error(refusal)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
