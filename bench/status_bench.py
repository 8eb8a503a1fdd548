"""What `status`, a /metrics scrape and the health check cost on a store with a big audience, read
from the counters the triggers keep (migration 0008), against the full scan of memberships they
replaced, in the same run.

Run from the repository root::

    python bench/status_bench.py                       # SQLite, 1M members
    python bench/status_bench.py --members 10000000    # 10M (a few minutes to build)
    python bench/status_bench.py --store postgresql --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/scratch
    python bench/status_bench.py --refresh-cost        # also: what 0008 adds to a first refresh

``--store postgresql`` starts with DROP SCHEMA public CASCADE: point it only at a scratch database.

The store is built at the head schema by bulk inserts straight into the tables (the triggers keep
the counters as the rows go in): one audience of ``--members`` members, half of them pending (never
told), 1% of those waiting out a backoff, 0.1% parked and 0.1% with an unknown outcome, the other
half acknowledged; and a small second audience. Each reading is the median of ``--repeat`` calls.
The counters are checked against the scan, and a mismatch makes the exit status 1.

``--refresh-cost`` times ``Store.refresh`` of a first sync of ``--refresh-members`` ids (default
1M) into an empty audience four times: without the triggers and the three new indexes (as at
0007), with the triggers only, with the triggers and the two partial indexes, and with all of it;
the median of ``--refresh-repeat`` runs of each (default 3), interleaved.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from prometheus_client import generate_latest

from audiencesync.daemon.metrics import Metrics
from audiencesync.store import status as status_mod, store as store_mod
from audiencesync.store.schema import audiences, due, memberships
from bench.perf_data import fresh_store
from bench.report import chunks
from tests import postgres_guard

NOW = datetime.now(UTC)
COLUMNS = (
    "audience_id",
    "user_id",
    "desired",
    "acked",
    "unknown",
    "changed_at",
    "pending_since",
    "next_attempt_at",
    "parked_at",
    "attempts",
    "failures",
)


def member_rows(audience_id: int, members: int) -> Iterator[tuple[Any, ...]]:
    """Even users: acknowledged. Odd: pending; of those, every 100th in a backoff, every 1000th
    parked, every 1000th (another) unknown."""
    start = NOW - timedelta(days=30)
    for i in range(members):
        told = i % 2 == 0
        odd = i // 2
        unknown = not told and odd % 1000 == 1
        parked = NOW if not told and odd % 1000 == 3 else None
        backoff = NOW + timedelta(hours=1) if not told and odd % 100 == 5 else None
        changed = start + timedelta(seconds=i % 2_000_000)
        yield (
            audience_id,
            f"u{i:09d}",
            True,
            True if told else None,
            unknown,
            changed,
            None if told else changed,  # pending since the change
            backoff,
            parked,
            0,
            0,
        )


def _sqlite_time(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%d %H:%M:%S.%f+00:00")


def fill(url: str, sizes: dict[str, int]) -> None:
    engine = store_mod.create_engine(url)
    with engine.begin() as conn:
        for n, key in enumerate(sizes, start=1):
            conn.execute(
                sa.insert(audiences).values(id=n, key=key, name=key, created_at=NOW, refreshed_at=NOW)
            )
    engine.dispose()
    placeholders = ", ".join("?" for _ in COLUMNS)
    for n, size in enumerate(sizes.values(), start=1):
        if url.startswith("sqlite"):
            lite = sqlite3.connect(url.removeprefix("sqlite:///"))
            for chunk in chunks(member_rows(n, size), 200_000):
                lite.executemany(
                    f"INSERT INTO memberships ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                    [(*r[:5], *(_sqlite_time(t) for t in r[5:9]), *r[9:]) for r in chunk],
                )
                lite.commit()
            lite.close()
        else:
            import psycopg

            with (
                psycopg.connect(sa.make_url(url).set(drivername="postgresql").render_as_string(False)) as pg,
                pg.cursor() as cur,
                cur.copy(f"COPY memberships ({', '.join(COLUMNS)}) FROM STDIN") as copy,
            ):
                for r in member_rows(n, size):
                    copy.write_row(r)
    engine = store_mod.create_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE memberships")
    else:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    engine.dispose()


def median_ms(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def readings(store: store_mod.Store, repeat: int) -> list[tuple[str, float, float]]:
    ids = [1, 2]

    def status(scan: bool) -> list[status_mod.AudienceStatus]:
        with store.engine.connect() as conn, conn.begin():
            return status_mod.audience_status(conn, scan=scan)

    def old_due() -> int:
        # The count the health check and the delivery loop made before the counters.
        with store.engine.connect() as conn, conn.begin():
            query = sa.select(sa.func.count()).where(
                due(memberships, store.clock()), memberships.c.audience_id.in_(ids)
            )
            return int(conn.execute(query).scalar_one())

    new_metrics, old_metrics = Metrics(lambda: status(False)), Metrics(lambda: status(True))
    return [
        ("status", median_ms(lambda: status(False), repeat), median_ms(lambda: status(True), repeat)),
        (
            "/metrics scrape",
            median_ms(lambda: generate_latest(new_metrics.registry), repeat),
            median_ms(lambda: generate_latest(old_metrics.registry), repeat),
        ),
        (
            "health (due + status)",
            median_ms(lambda: (store.due_count(ids), status(False)), repeat),
            median_ms(lambda: (old_due(), status(True)), repeat),
        ),
        ("pending_count", median_ms(lambda: store.pending_count(ids), repeat), 0.0),
    ]


NEW_INDEXES = ("ix_memberships_oldest_pending", "ix_memberships_backoff", "ix_memberships_user_id")
TRIGGERS = tuple(f"memberships_counts_{op}" for op in ("insert", "update", "delete", "move"))


def refresh_once(
    args: argparse.Namespace, tmp: Path, triggers: tuple[str, ...], indexes: tuple[str, ...]
) -> float:
    url = _store_url(args, tmp / "refresh.db")
    fresh_store(url)
    engine = store_mod.create_engine(url)
    with engine.begin() as conn:
        for trigger in triggers:
            on = " ON memberships" if engine.dialect.name == "postgresql" else ""
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger}{on}")
        for index in indexes:
            conn.exec_driver_sql(f"DROP INDEX {index}")
    store = store_mod.Store(engine)
    audience = store.ensure_audience("first", "first")
    run_id = store.start_run("cycle", audience, "initial")
    ids = (f"u{i:09d}" for i in range(args.refresh_members))
    start = time.perf_counter()
    store.refresh(audience, run_id, chunks(ids, 10_000), full=False)
    seconds = time.perf_counter() - start
    engine.dispose()
    (tmp / "refresh.db").unlink(missing_ok=True)
    return seconds


def refresh_cost(args: argparse.Namespace, tmp: Path) -> list[tuple[str, float]]:
    """Median seconds of a first sync's Store.refresh with less and less of 0008 taken away,
    the variants interleaved so that a burst of load elsewhere spreads over all of them."""
    variants = {
        "as at 0007 (no triggers, no new index)": (TRIGGERS, NEW_INDEXES),
        "+ triggers": ((), NEW_INDEXES),
        "+ triggers + the two partial indexes": ((), NEW_INDEXES[2:]),
        "+ triggers + all three indexes (head)": ((), ()),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.refresh_repeat):
        for name, (triggers, indexes) in variants.items():
            times[name].append(refresh_once(args, tmp, triggers, indexes))
            print(f"  {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    return [(name, statistics.median(seconds)) for name, seconds in times.items()]


def bench(args: argparse.Namespace) -> int:
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        url = _store_url(args, Path(tmp) / "store.db")
        fresh_store(url)
        start = time.perf_counter()
        fill(url, {"big": args.members, "small": 1000})
        built = time.perf_counter() - start
        store = store_mod.Store(store_mod.create_engine(url))
        with store.engine.connect() as conn:
            kept, scanned = status_mod.audience_status(conn), status_mod.audience_status(conn, scan=True)
        if kept != scanned:
            problems.append(f"the counters disagree with the scan: {kept} != {scanned}")
        rows = readings(store, args.repeat)
        store.engine.dispose()
        costs = refresh_cost(args, Path(tmp)) if args.refresh_cost else []
    print(
        f"\nstatus, /metrics and health on {args.store}: an audience of {args.members:,} members "
        f"({kept[0].pending:,} pending, {kept[0].parked:,} parked, {kept[0].unknown:,} unknown); "
        f"built in {built:.0f} s; median of {args.repeat} calls\n"
    )
    print(f"{'reading':<24}{'counters ms':>12}{'scan ms':>12}{'scan / counters':>17}")
    for name, new, old in rows:
        ratio = f"{old / new:.0f}x" if old else "-"
        print(f"{name:<24}{new:>12.1f}{(f'{old:.1f}' if old else '-'):>12}{ratio:>17}")
        if new >= 50:
            problems.append(f"{name} took {new:.1f} ms (target: under 50 ms)")
    if costs:
        base = costs[0][1]
        print(
            f"\nfirst-sync Store.refresh of {args.refresh_members:,} ids on {args.store}, "
            f"median of {args.refresh_repeat}\n"
        )
        for name, seconds in costs:
            print(f"{name:<44}{seconds:>8.2f} s{seconds / base:>8.2f}x")
    for problem in problems:
        print(f"WRONG: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _store_url(args: argparse.Namespace, sqlite_path: Path) -> str:
    return f"sqlite:///{sqlite_path}" if args.store == "sqlite" else str(args.postgres_url)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--members", type=int, default=1_000_000, help="the big audience's members (10M: 10000000)"
    )
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("AUDIENCESYNC_TEST_POSTGRES_URL"),
        help="a SCRATCH database: its public schema is dropped (default: $AUDIENCESYNC_TEST_POSTGRES_URL)",
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--refresh-cost", action="store_true", help="also time a first refresh with and without 0008"
    )
    parser.add_argument("--refresh-members", type=int, default=1_000_000)
    parser.add_argument("--refresh-repeat", type=int, default=3)
    args = parser.parse_args()
    if args.store == "postgresql" and not args.postgres_url:
        parser.error("--store postgresql needs --postgres-url or AUDIENCESYNC_TEST_POSTGRES_URL")
    if args.store == "postgresql" and (refusal := postgres_guard.refusal(args.postgres_url)):
        parser.error(refusal)
    if args.members < 1 or args.repeat < 1:
        parser.error("--members and --repeat must be positive")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
