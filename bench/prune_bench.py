"""How long `prune` takes, and how long one batch holds the store, with a writer running beside it.

Run from the repository root (a few minutes at the default size, on 2 cores)::

    python bench/prune_bench.py
    python bench/prune_bench.py --rows 200000 --store postgresql \\
        --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test

``--store postgresql`` starts with DROP SCHEMA public CASCADE: point it only at a scratch database.

The store gets ``--rows`` membership changes and as many calls (one value each), spread evenly
over 200 days, one run per 1,000 changes, and a tenth as many memberships, 1% of them pending
(0.1% parked). The prune deletes what is older than 100 days: about half of each table. Meanwhile a
writer thread updates one membership every 10 ms in its own write transaction, as the daemon's
delivery does, and the longest it waited for one write is reported: that is what a prune costs a
running daemon. The rows kept (pending and parked memberships' history, everything newer) are
checked, and a mismatch makes the exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import tempfile
import threading
import time
from datetime import timedelta

import sqlalchemy as sa

from audiencesync.lifecycle.prune import BATCH_SIZE, Pruner
from audiencesync.store import store as store_mod
from audiencesync.store.schema import (
    audiences,
    call_values,
    calls,
    membership_changes,
    memberships,
    sync_runs,
)
from audiencesync.store.writes import write_connection
from bench.perf_data import fresh_store
from bench.report import chunks
from tests import postgres_guard

DAYS = 200


def fill(engine: sa.Engine, rows: int) -> None:
    now = store_mod.utc_now()
    start = now - timedelta(days=DAYS)
    step = timedelta(days=DAYS) / rows
    users = max(rows // 10, 1)
    runs = max(rows // 1000, 1)
    held = users // 100
    with engine.begin() as conn:
        conn.execute(sa.insert(audiences), [{"id": 1, "key": "segment_a", "name": "A", "created_at": start}])
        conn.execute(
            sa.insert(sync_runs),
            [
                {
                    "id": r + 1,
                    "cycle_id": f"c{r}",
                    "audience_id": 1,
                    "mode": "incremental",
                    "status": "succeeded",
                    "started_at": start + step * (r * 1000),
                    "finished_at": start + step * (r * 1000 + 999),
                }
                for r in range(runs)
            ],
        )
        for chunk in chunks(
            {
                "audience_id": 1,
                "user_id": f"u{u:07d}",
                "desired": u % 2 == 0,
                "acked": None if u < held else u % 2 == 0,  # 1% pending...
                "changed_at": now,
                "parked_at": now if u < held // 10 else None,  # ...a tenth of them parked
                "last_error": "400 bad user" if u < held // 10 else None,
            }
            for u in range(users)
        ):
            conn.execute(sa.insert(memberships), chunk)
    with engine.begin() as conn:
        for chunk in chunks(
            {
                "id": i + 1,
                "audience_id": 1,
                "user_id": f"u{i % users:07d}",
                "run_id": min(i // 1000, runs - 1) + 1,
                "change": "entered" if (i // users) % 2 == 0 else "left",
                "at": start + step * i,
            }
            for i in range(rows)
        ):
            conn.execute(sa.insert(membership_changes), chunk)
    with engine.begin() as conn:
        for chunk in chunks(
            {
                "id": i + 1,
                "user_id": f"u{i % users:07d}",
                "attempt": 1,
                "at": start + step * i,
                "status": 200,
                "outcome": "acknowledged",
            }
            for i in range(rows)
        ):
            conn.execute(sa.insert(calls), chunk)
            conn.execute(
                sa.insert(call_values),
                [
                    {"call_id": c["id"], "audience_id": 1, "run_id": min((c["id"] - 1) // 1000, runs - 1) + 1,
                     "value": True}
                    for c in chunk
                ],
            )  # fmt: skip
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")


class Writer(threading.Thread):
    """A daemon-like writer: one short write transaction every 10 ms; records the longest wait."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.stop = threading.Event()
        self.longest = 0.0
        self.writes = 0

    def run(self) -> None:
        while not self.stop.wait(0.01):
            started = time.monotonic()
            with write_connection(self.engine) as conn, conn.begin():
                conn.execute(
                    sa.update(memberships)
                    .where(memberships.c.audience_id == 1, memberships.c.user_id == "u0000002")
                    .values(failures=memberships.c.failures + 1)
                )
            self.longest = max(self.longest, time.monotonic() - started)
            self.writes += 1


def count(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url")
    args = parser.parse_args()
    if args.store == "postgresql" and not args.postgres_url:
        parser.error("--store postgresql needs --postgres-url")
    if args.store == "postgresql" and (refusal := postgres_guard.refusal(args.postgres_url)):
        parser.error(refusal)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.postgres_url if args.store == "postgresql" else f"sqlite:///{Path(tmp) / 'store.db'}"
        fresh_store(url)
        engine = store_mod.create_engine(url)
        started = time.monotonic()
        fill(engine, args.rows)
        print(f"filled {args.rows} changes and calls in {time.monotonic() - started:.1f} s")
        pruner = Pruner(engine, store_mod.utc_now)
        before = store_mod.utc_now() - timedelta(days=DAYS // 2)
        started = time.monotonic()
        planned = pruner.plan(before)
        print(f"dry run: {planned.text()} in {time.monotonic() - started:.1f} s")
        writer = Writer(engine)
        writer.start()
        result = pruner.prune(before, by="cli", batch_size=args.batch_size)
        writer.stop.set()
        writer.join()
        print(result.summary())
        print(
            f"a writer beside it: {writer.writes} writes, the longest waited {writer.longest * 1000:.0f} ms; "
            f"{result.deleted.total / result.seconds:,.0f} rows/s"
        )
        kept = {t.name: count(engine, t) for t in (membership_changes, calls, call_values, sync_runs)}
        print("kept: " + " ".join(f"{name}={n}" for name, n in kept.items()))
        problems = []
        if result.deleted != planned:
            problems.append(f"deleted {result.deleted.text()} but the dry run said {planned.text()}")
        if kept["membership_changes"] + result.deleted.membership_changes != args.rows:
            problems.append("changes kept + deleted != rows")
        if not args.rows // 2 - args.rows // 50 < result.deleted.membership_changes <= args.rows // 2:
            problems.append("about half the changes should go, less the held memberships' ones")
        engine.dispose()
    for problem in problems:
        print(f"MISMATCH: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
