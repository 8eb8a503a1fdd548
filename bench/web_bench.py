"""What each page of the web status page costs on a store with a 1M-member audience and 1,000 runs.

    python bench/web_bench.py                          # SQLite
    python bench/web_bench.py --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/scratch_test

``--postgres-url`` starts with DROP SCHEMA public CASCADE: point it only at a scratch database.
The store is status_bench's (bulk inserts: one audience of ``--members``, 0.1% of them parked, and
a small one), plus ``--runs`` runs of the big audience; each page is fetched through a real loopback
server, and the median of ``--repeat`` fetches printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import statistics
import tempfile
import time
from datetime import timedelta

import httpx
import sqlalchemy as sa

from audiencesync.alerts import attention
from audiencesync.store import store as store_mod
from audiencesync.store.schema import sync_runs
from audiencesync.web.app import WebApp
from audiencesync.web.server import Server
from bench.perf_data import fresh_store
from bench.status_bench import NOW, fill
from tests import postgres_guard

PAGES = (
    "/",
    "/audiences/big",
    "/audiences/big?before=500",
    "/runs",
    "/runs?status=held",
    "/users?id=u000000003",
)


def add_runs(url: str, runs: int, members: int) -> None:
    engine = store_mod.create_engine(url)
    start = NOW - timedelta(hours=2 * runs)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(sync_runs),
            [
                {
                    "cycle_id": f"c{k}", "audience_id": 1, "mode": "incremental",
                    "status": "held" if k % 97 == 0 else "succeeded",
                    "started_at": start + timedelta(hours=2 * k),
                    "finished_at": start + timedelta(hours=2 * k, minutes=3),
                    "members": members - runs + k, "entered": 40, "left": 39, "source_rows": members,
                }
                for k in range(runs)
            ],
        )  # fmt: skip
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--postgres-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.postgres_url or f"sqlite:///{Path(tmp) / 'store.db'}"
        if args.postgres_url and (refusal := postgres_guard.refusal(url)):
            parser.error(refusal)
        version = fresh_store(url)
        fill(url, {"big": args.members, "small": 1000})
        add_runs(url, args.runs, args.members)
        engine = store_mod.create_engine(url)
        states = {"big": "live", "small": "live"}

        def seen() -> attention.Attention:
            with engine.connect() as conn:
                return attention.read(conn, states, store_mod.utc_now())

        app = WebApp(
            engine, token=None, configured=lambda: states, health=lambda: (True, "ok"), attention=seen,
            clock=store_mod.utc_now, mode="serve",
        )  # fmt: skip
        server = Server("127.0.0.1", 0, app)
        server.start()
        print(f"{engine.dialect.name} {version}: {args.members:,} members, {args.runs:,} runs")
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120) as client:
                for page in PAGES:
                    took = []
                    for _ in range(args.repeat):
                        began = time.perf_counter()
                        answer = client.get(page)
                        took.append(time.perf_counter() - began)
                        assert answer.status_code == 200, (page, answer.status_code)
                    print(
                        f"{page:32} {statistics.median(took) * 1000:8.1f} ms  ({len(answer.content):,} bytes)"
                    )
        finally:
            server.stop()
            engine.dispose()


if __name__ == "__main__":
    main()
