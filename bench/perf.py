"""audiencesync's performance in one command: the diff against its floor and a naive baseline,
delivery, coalescing, and paging, on SQLite and PostgreSQL.

Run from the repository root (about 10-15 minutes by default on 2 cores)::

    python bench/perf.py                        # 100k and 1M members; PostgreSQL too when
                                                # AUDIENCESYNC_TEST_POSTGRES_URL is set
    python bench/perf.py --quick                # 100k only, no enforced-limit run (e2): ~2 min
    python bench/perf.py --huge                 # adds 10M members
    python bench/perf.py --all                  # every figure on both stores: 100k, 1M and 10M
                                                # members, e2 on PostgreSQL too, then the audit
                                                # bench (bench/audit_bench.py --repeat 5) (hours)
    python bench/perf.py --members 2000 --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_test

PostgreSQL runs start with DROP SCHEMA public CASCADE (and bench_src): point them only at a
scratch database (its name must contain "test", see tests/postgres_guard.py).

The figures (each measured in a process of its own; time is the process's wall time, RSS its
peak, interpreter and imports included):

* a  first sync, dry run: the real CLI, ``audiencesync sync --dry-run --format csv`` on an empty
     store at the head schema: read the source, stage, diff, plan, write every call;
* b  incremental refresh, 1% churn: a real sync's refresh (``Syncer.refresh``: read, stage, diff,
     apply to the snapshot, log the changes) after the first sync was applied and acknowledged;
     "b dry run" is the same cycle as the admin checks it (the CLI's dry run);
* c  the floor, on the same data: the plain driver (sqlite3; psycopg with COPY) stages the ids in
     a TEMP table, anti-joins it with the snapshot both ways, and reads the rows out;
* d  the naive baseline: the source's ids and the snapshot's in Python sets, subtracted;
* g  a page of pending changes (``Store.pending_page``, 100 users) at the start and near the end
     of the N members the first refresh left pending;
* e  delivery to the loopback Gleap stand-in (its own process): (1) no limit, calls/s and CPU per
     1,000 calls beside a bare httpx loop; (2) the stand-in enforcing 1,200 calls a minute and the
     config set to match; (3) 50 ms per answer at the default max_concurrency;
* f  coalescing: a first sync of 3 overlapping audiences: calls against distinct users.

On PostgreSQL, a and b also run with the source in the store's own database (schema bench_src):
the "same-db" rows, where pushdown applies once it exists. Targets are printed beside the figures
(a failing one is not an error); a wrong count makes the exit status 1. The JSON goes to --json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from bench import perf_data as data, perf_delivery, perf_table
from bench.report import Figures, peak_rss_mb
from tests import postgres_guard

PHASES = str(Path(__file__).with_name("perf_phases.py"))
DEFAULT_JSON = Path(__file__).with_name("results") / "perf.json"


class PhaseTimeout(Exception):
    pass


@dataclass
class Runner:
    timeout: float

    def phase(self, name: str, spec: dict[str, Any]) -> Figures:
        """Run a phase in a fresh interpreter; its figures are the last line it prints, plus its wall time."""
        start = time.perf_counter()
        try:
            out = subprocess.run(
                [sys.executable, PHASES, name, json.dumps(spec)],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
                timeout=self.timeout,
            ).stdout
        except subprocess.TimeoutExpired as exc:
            raise PhaseTimeout(f"phase {name} took over {self.timeout:.0f} s") from exc
        figures: Figures = json.loads(out.splitlines()[-1])
        figures["wall"] = time.perf_counter() - start
        return figures

    def dry_run(self, config: Path, work: Path) -> Figures:
        """The real CLI's dry run; its peak RSS is the kernel's account of that process alone.

        The parent stays small (it never holds the data), so what Linux carries over from it
        into the child's ru_maxrss is below the CLI's own peak.
        """
        out, err = work / "calls.csv", work / "dry_run.err"
        cmd = [
            sys.executable,
            "-m",
            "audiencesync",
            "--config",
            str(config),
            "sync",
            "--dry-run",
            "--format",
            "csv",
        ]
        start = time.perf_counter()
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
            deadline = start + self.timeout
            while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
                if time.perf_counter() > deadline:
                    proc.kill()
                    os.wait4(proc.pid, 0)
                    raise PhaseTimeout(f"the dry run took over {self.timeout:.0f} s")
                time.sleep(0.02)
        _, status, usage = waited
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        with out.open() as lines:
            rows = sum(1 for _ in lines) - 1  # the header
        out.unlink()
        return {
            "seconds": seconds,
            "rss_mb": usage.ru_maxrss / 1024,
            "rows": rows,
            "exit": proc.returncode,
            "stderr": err.read_text()[-2000:] if proc.returncode else "",
        }


@dataclass(frozen=True)
class Source:
    """Where an audience's ids come from: a SQLite file (streamed) or the store's own PG database."""

    name: str  # streamed | same-db
    url: str
    table: str | None  # the same-db source's table, for the floor and the naive baseline
    settings: dict[str, Any] = field(default_factory=dict)  # more of its [sources.src] settings


def sources(store: str, store_url: str, source_path: Path) -> list[Source]:
    """The sources a and b run from, each its own rows: a variant (pushdown on and off, say) is one more."""
    streamed = Source("streamed", f"sqlite:///{source_path}", None)
    if store == "sqlite":
        return [streamed]
    # Pushdown applies to this one once it exists; until then it measures the streamed path from it.
    return [streamed, Source("same-db", store_url, f"{data.PG_SCHEMA}.members")]


def whole(figures: Figures) -> Figures:
    """The process's wall time as the figure, its work alone kept beside it."""
    return figures | {"work_seconds": figures["seconds"], "seconds": figures["wall"]}


BULK_ROWS = ("a", "b", "c", "d", "g")
DELIVERY_ROWS = ("e1", "e2", "e3", "f")


def bulk(
    run: Runner, store: str, store_url: str, n: int, churn: float, work: Path, wanted: frozenset[str]
) -> tuple[list[Figures], list[str]]:
    """Figures a, b, c, d and g (those ``wanted``) for one store at N members; and any wrong count.

    The first refresh (b0) runs whenever b, c, d or g is wanted: the incremental figures and the
    pages need the snapshot it makes."""
    rows: list[Figures] = []
    problems: list[str] = []
    half = max(1, round(n * churn / 2))
    source_path = work / "source.db"
    store_path = work / "store.db"
    base = {
        "store": store,
        "store_url": store_url,
        "store_path": str(store_path),
        "source_path": str(source_path),
    }
    pg = store_url if store == "postgresql" else None
    variants = sources(store, store_url, source_path)
    configs = {
        s.name: data.write_config(
            work / f"bulk-{s.name}.toml",
            store_url,
            s.url,
            "http://127.0.0.1:9",
            {data.KEY: f"SELECT user_id FROM {s.table or 'members'}"},
            source=s.settings,
        )
        for s in variants
    }

    def add(figure: str, source: str, figures: Figures, expected: tuple[int, int] | None = None) -> None:
        got = (figures.get("entered"), figures.get("left"))
        if expected is not None and got != expected:
            problems.append(
                f"{store} N={n:,} {figure} ({source}): (entered, left) {got}, expected {expected}"
            )
        rows.append({"figure": figure, "store": store, "source": source, "n": n, **figures})

    def floors_and_naive(figure: str, expected: tuple[int, int]) -> None:
        for s in variants if "c" in wanted else ():
            add(f"c {figure}", s.name, whole(run.phase("floor", base | {"source_table": s.table})), expected)
        if "d" in wanted:
            add(f"d {figure}", "streamed", whole(run.phase("naive", base)), expected)

    def dry_run(figure: str, expected_calls: int) -> None:
        for s in variants:
            got = run.dry_run(configs[s.name], work)
            if got["exit"] != 0 or got["rows"] != expected_calls:
                problems.append(
                    f"{store} N={n:,} {figure} ({s.name}): {got}, expected {expected_calls} calls"
                )
            add(figure, s.name, got)

    def refresh(figure: str, source: Source, expected: tuple[int, int]) -> None:
        got = run.phase("refresh", {"config": str(configs[source.name])})
        got["seconds"] = got.pop("wall") - got["finish_seconds"]  # the whole process, less closing the run
        if got["members"] != n or got["status"] in ("failed", "held"):
            problems.append(f"{store} N={n:,} {figure}: {got}")
        add(figure, source.name, got, expected)

    run.phase("setup", base | {"step": "source", "members": n})
    version = run.phase("setup", base | {"step": "store"})["version"]
    if pg:
        run.phase("setup", base | {"step": "pg_source"})
    rows.append({"figure": "version", "store": store, "version": version})

    floors_and_naive("first", (n, 0))
    if "a" in wanted:
        dry_run("a first sync dry run", n)
    incremental = wanted & {"b", "c", "d"}
    if incremental or "g" in wanted:
        refresh("b0 first refresh", variants[0], (n, 0))
    if "g" in wanted:
        add("g pending page", "store", run.phase("pending_pages", base | {"members": n}))
    for turn, source in enumerate(variants if incremental else ()):
        run.phase("setup", base | {"step": "ack"})
        run.phase("setup", base | {"step": "churn", "members": n, "half": half, "turn": turn, "pg_url": pg})
        if turn == 0:
            floors_and_naive("incremental", (half, half))
            if "b" in wanted:
                dry_run("b incremental dry run", 2 * half)
        if "b" in wanted:
            refresh("b incremental refresh", source, (half, half))
    if pg:
        run.phase("setup", base | {"step": "drop_pg_source"})
    return rows, problems


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, nargs="+", help="sizes to run (default 100000 1000000)")
    parser.add_argument("--quick", action="store_true", help="100k only, without the enforced-limit run (e2)")
    parser.add_argument("--huge", action="store_true", help="add 10M members")
    parser.add_argument(
        "--all",
        action="store_true",
        help="every figure on both stores: --huge --full, and a PostgreSQL URL is required",
    )
    parser.add_argument(
        "--churn", type=float, default=0.01, help="fraction of members replaced (default 0.01)"
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("AUDIENCESYNC_TEST_POSTGRES_URL"),
        help="a SCRATCH database: its schema public is dropped (default: $AUDIENCESYNC_TEST_POSTGRES_URL)",
    )
    parser.add_argument(
        "--stores",
        choices=["all", "sqlite", "postgresql"],
        default="all",
        help="all: PostgreSQL too when a URL is set",
    )
    parser.add_argument("--calls", type=int, default=5000, help="e(1): calls delivered with no limit")
    parser.add_argument("--limit", type=int, default=1200, help="e(2): the enforced calls a minute")
    parser.add_argument(
        "--limited-minutes", type=float, help="e(2): minutes of calls at the limit (default 2.5; 0 skips it)"
    )
    parser.add_argument("--latency-calls", type=int, default=1500, help="e(3): calls at 50 ms each")
    parser.add_argument(
        "--coalesce-users", type=int, default=3000, help="f: distinct users of the 3 audiences"
    )
    parser.add_argument("--full", action="store_true", help="e(2) on PostgreSQL too")
    parser.add_argument(
        "--audit", action="store_true", help="then bench/audit_bench.py --repeat 5 on the same stores"
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=BULK_ROWS + DELIVERY_ROWS,
        default=list(BULK_ROWS + DELIVERY_ROWS),
        help="only these rows (default: all), e.g. --rows b c, or --rows e1; "
        "b, c, d and g also run the first refresh b0 they need",
    )
    parser.add_argument(
        "--phase-timeout",
        type=float,
        help="seconds before a phase is given up (default 1800; 7200 with 10M members or more)",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where the figures go (default {DEFAULT_JSON})"
    )
    args = parser.parse_args()
    if args.all:
        every_row = set(args.rows) == set(BULK_ROWS + DELIVERY_ROWS)
        if args.quick or args.stores != "all" or args.members or not every_row:
            parser.error("--all runs every figure: it takes no --quick, --stores, --members or --rows")
        if not args.postgres_url:
            parser.error("--all needs PostgreSQL too: --postgres-url or AUDIENCESYNC_TEST_POSTGRES_URL")
        args.huge = args.full = args.audit = True

    sizes = args.members or ([100_000] if args.quick else [100_000, 1_000_000])
    if args.huge:
        sizes.append(10_000_000)
    minutes = args.limited_minutes if args.limited_minutes is not None else (0 if args.quick else 2.5)
    if min(sizes) < 1 or not 0 < args.churn <= 0.5 or args.calls < 1:
        parser.error("--members and --calls must be positive and --churn in (0, 0.5]")
    stores = [("sqlite", "")] if args.stores != "postgresql" else []
    if args.stores == "postgresql" and not args.postgres_url:
        parser.error("--stores postgresql needs --postgres-url or AUDIENCESYNC_TEST_POSTGRES_URL")
    if args.postgres_url and args.stores != "sqlite":
        if refusal := postgres_guard.refusal(args.postgres_url):
            parser.error(refusal)
        stores.append(("postgresql", args.postgres_url))
    plan = perf_delivery.DeliveryPlan(
        calls=args.calls,
        limit=args.limit,
        limited_minutes=minutes,
        latency_calls=args.latency_calls,
        coalesce_users=args.coalesce_users,
    )

    wanted = frozenset(args.rows)
    started = time.perf_counter()
    # A 10M first refresh on PostgreSQL took 20-30 minutes on the shared 2-core machine.
    timeout = args.phase_timeout or (7200 if max(sizes) >= 10_000_000 else 1800)
    run = Runner(timeout)
    rows: list[Figures] = []
    problems: list[str] = []
    notes: list[str] = []
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each block too, so that a long run that is stopped leaves its figures
        args.json.write_text(json.dumps({"rows": rows, "notes": notes, "problems": problems}, default=str))

    with tempfile.TemporaryDirectory(prefix="audiencesync_perf_") as tmp:
        work = Path(tmp)
        for store, url in stores:
            store_url = url or f"sqlite:///{work / 'store.db'}"
            for n in sizes if wanted & set(BULK_ROWS) else ():
                try:
                    got, wrong = bulk(run, store, store_url, n, args.churn, work, wanted)
                except PhaseTimeout as exc:
                    notes.append(f"{store} N={n:,}: stopped, {exc}")
                    continue
                rows += got
                problems += wrong
                save()
            if not wanted & set(DELIVERY_ROWS):
                continue
            delivery_url = url or f"sqlite:///{work / 'delivery.db'}"
            got, wrong = perf_delivery.delivery_rows(
                run.phase, work, store, delivery_url, plan, wanted, limited=store == "sqlite" or args.full
            )
            rows += got
            problems += wrong
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {r["store"]: r["version"] for r in rows if r["figure"] == "version"},
        "parent_rss_mb": peak_rss_mb(),
    }
    result = perf_table.render(rows, plan, machine)
    seconds = time.perf_counter() - started
    for note in notes:
        print(f"NOTE: {note}")
    print(f"\nthe run took {seconds / 60:.1f} min")
    payload = {"machine": machine, "seconds": seconds, "rows": rows, "notes": notes, "problems": problems}
    args.json.write_text(json.dumps(payload | result, indent=1, default=str))
    print(f"figures written to {args.json}")
    for problem in problems:
        print(f"WRONG: {problem}", file=sys.stderr)
    audited = audit(stores) if args.audit else 0
    return 1 if problems or audited else 0


def audit(stores: list[tuple[str, str]]) -> int:
    """`audit members --at` at 1M against the plain export (issue 24, item 4): its own bench, its
    table printed as it runs; a missed target there is its exit status 1, as a wrong count here."""
    print("\naudit bench: bench/audit_bench.py --repeat 5", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "AUDIENCESYNC_BENCH_POSTGRES_URL"}
    for store, url in stores:
        if store == "postgresql":
            env["AUDIENCESYNC_BENCH_POSTGRES_URL"] = url
    bench = str(Path(__file__).with_name("audit_bench.py"))
    return subprocess.run([sys.executable, bench, "--repeat", "5"], env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
