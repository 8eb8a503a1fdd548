"""The phases of bench/perf.py, each run in a process of its own: ``python bench/perf_phases.py PHASE SPEC``.

SPEC is a JSON object (the phase's arguments); the phase prints its figures as one JSON line,
with its peak RSS (VmHWM: its own, interpreter and imports included). Imports are made inside
each phase, so that the floor's and the naive baseline's processes carry only what they use.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import json
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench import perf_data as data
from bench.report import Figures, peak_rss_mb

Spec = dict[str, Any]

# The floor's SQL, the same on both databases: the anti-join both ways against the snapshot.
ENTERED = (
    "SELECT s.user_id FROM stage s WHERE NOT EXISTS (SELECT 1 FROM memberships m "
    "WHERE m.audience_id = {p} AND m.user_id = s.user_id AND m.desired)"
)
LEFT = (
    "SELECT m.user_id FROM memberships m WHERE m.audience_id = {p} AND m.desired "
    "AND NOT EXISTS (SELECT 1 FROM stage s WHERE s.user_id = m.user_id)"
)
SOURCE_QUERY = "SELECT user_id FROM members"


def _sqlite_ids(path: str) -> Iterator[tuple[str]]:
    conn = sqlite3.connect(path)
    try:
        yield from conn.execute(SOURCE_QUERY)
    finally:
        conn.close()


def _count(rows: Iterator[Any] | Any) -> int:
    return sum(1 for _ in rows)


def phase_floor(spec: Spec) -> Figures:
    """The bare work with the plain driver: stage the ids, anti-join both ways, read the rows out."""
    start = time.perf_counter()
    if spec["store"] == "sqlite":
        conn = sqlite3.connect(spec["store_path"])
        (audience_id,) = conn.execute(
            "SELECT coalesce(max(id), -1) FROM audiences WHERE key = ?", (data.KEY,)
        ).fetchone()
        # Indexed once loaded: a sorted build, where a primary key would take 1M random B-tree
        # inserts (measured at 1M shuffled ids: 5.6 s against 9.1 s, the anti-joins included).
        conn.execute("CREATE TEMP TABLE stage (user_id TEXT)")
        conn.executemany("INSERT INTO stage VALUES (?)", _sqlite_ids(spec["source_path"]))
        conn.execute("CREATE INDEX temp.ix_stage ON stage (user_id)")
        entered = _count(conn.execute(ENTERED.format(p="?"), (audience_id,)))
        left = _count(conn.execute(LEFT.format(p="?"), (audience_id,)))
        conn.close()
    else:
        import psycopg

        with psycopg.connect(data.plain_pg(spec["store_url"])) as pg, pg.cursor() as cur:
            cur.execute("SELECT coalesce(max(id), -1) FROM audiences WHERE key = %s", (data.KEY,))
            (audience_id,) = cur.fetchone() or (-1,)
            cur.execute("CREATE TEMP TABLE stage (user_id TEXT) ON COMMIT DROP")
            if spec.get("source_table"):  # the source is in this database: the ids never leave it
                cur.execute(f"INSERT INTO stage SELECT user_id FROM {spec['source_table']}")
            else:
                with cur.copy("COPY stage (user_id) FROM STDIN") as copy:
                    for row in _sqlite_ids(spec["source_path"]):
                        copy.write_row(row)
            cur.execute("ANALYZE stage")
            entered = _count(cur.stream(ENTERED.format(p="%s"), (audience_id,)))
            left = _count(cur.stream(LEFT.format(p="%s"), (audience_id,)))
    return {"seconds": time.perf_counter() - start, "entered": entered, "left": left}


def phase_naive(spec: Spec) -> Figures:
    """What a user would write: both id sets in Python sets, subtracted."""
    start = time.perf_counter()
    if spec["store"] == "sqlite":
        source = {r[0] for r in _sqlite_ids(spec["source_path"])}
        conn = sqlite3.connect(spec["store_path"])
        snapshot = {
            r[0]
            for r in conn.execute(
                "SELECT user_id FROM memberships JOIN audiences ON audiences.id = audience_id "
                "WHERE key = ? AND desired",
                (data.KEY,),
            )
        }
        conn.close()
    else:
        import psycopg

        with psycopg.connect(data.plain_pg(spec["store_url"])) as pg:
            if spec.get("source_table"):
                source = {r[0] for r in pg.execute(f"SELECT user_id FROM {spec['source_table']}")}
            else:
                source = {r[0] for r in _sqlite_ids(spec["source_path"])}
            snapshot = {
                r[0]
                for r in pg.execute(
                    "SELECT user_id FROM memberships JOIN audiences ON audiences.id = audience_id "
                    "WHERE key = %s AND desired",
                    (data.KEY,),
                )
            }
    entered, left = source - snapshot, snapshot - source
    return {"seconds": time.perf_counter() - start, "entered": len(entered), "left": len(left)}


def phase_refresh(spec: Spec) -> Figures:
    """A real sync's refresh of the audience (source, stage, diff, apply, change log), delivering nothing."""
    from audiencesync.config.loading import load_config
    from audiencesync.store import store as store_mod
    from audiencesync.sync.cycle import Syncer

    config = load_config(Path(spec["config"]))
    syncer = Syncer(config, store_mod.Store(store_mod.create_engine(config.store.url)))
    start = time.perf_counter()
    run = syncer.refresh(config.audiences[0], "bench-cycle")
    seconds = time.perf_counter() - start
    finish = time.perf_counter()
    report = run.report
    closed = syncer.store.finish_run(
        run.run_id, report.status if report.status in ("failed", "held") else "succeeded"
    )
    return {
        "seconds": seconds,
        "finish_seconds": time.perf_counter() - finish,
        "members": report.members,
        "entered": report.entered,
        "left": report.left,
        "status": closed["status"],  # partial: what it changed is pending, as no delivery followed
        "error": report.error,
    }


def phase_pending_pages(spec: Spec) -> Figures:
    """A page of pending changes with the cursor at the start, and near the end, of the audience."""
    from audiencesync.store import store as store_mod

    store = store_mod.Store(store_mod.create_engine(spec["store_url"]))
    audience = store.ensure_audience(data.KEY, data.KEY)
    size, repeats = 100, 5
    figures: Figures = {}
    cursors = {"start": "", "end": data.user_id(spec["members"] - size - size // 2)}
    for where, after in cursors.items():
        times: list[float] = []
        rows, deadline = 0, time.perf_counter() + 30
        while len(times) < repeats and (not times or time.perf_counter() < deadline):
            begin = time.perf_counter()
            rows = len(store.pending_page(audience.id, [audience.id], after, size))
            times.append(time.perf_counter() - begin)
        figures[f"{where}_ms"] = statistics.median(times) * 1000
        figures[f"{where}_rows"] = rows
    if store.engine.dialect.name == "postgresql":
        figures["plan"] = _pg_plan(store, audience.id, cursors["end"], size)
    figures["seconds"] = (figures["start_ms"] + figures["end_ms"]) / 1000
    return figures


def _pg_plan(store: Any, audience_id: int, after: str, size: int) -> str:
    """The plan of the page at the end, as PostgreSQL ran it."""
    from audiencesync.store.store import pending_page_query

    query = pending_page_query(audience_id, [audience_id], after, size)
    sql = str(query.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        lines = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {sql}").scalars()
        return "\n".join(lines)


def phase_setup(spec: Spec) -> Figures:
    """The data steps, named by ``spec["step"]``: timed, so the parent can say where its minutes went."""
    start = time.perf_counter()
    step = spec["step"]
    source = Path(spec.get("source_path", ""))
    figures: Figures = {}
    if step == "source":
        data.write_sqlite_source(source, spec["members"])
    elif step == "pg_source":
        data.copy_source_to_pg(source, spec["store_url"])
    elif step == "drop_pg_source":
        data.drop_pg_source(spec["store_url"])
    elif step == "churn":
        data.churn(source, spec.get("pg_url"), spec["members"], spec["half"], spec.get("turn", 0))
    elif step == "store":
        figures["version"] = data.fresh_store(spec["store_url"])
    elif step == "ack":
        figures["acked"] = data.ack_all(spec["store_url"])
    elif step == "ids":
        prefix = spec["prefix"]
        data.write_id_table(source, spec["table"], (f"{prefix}{i:07d}" for i in range(spec["count"])))
    else:
        raise ValueError(f"unknown setup step {step!r}")
    figures["seconds"] = time.perf_counter() - start
    return figures


def _delivery_phases() -> dict[str, Callable[[Spec], Figures]]:
    from bench import perf_delivery

    return perf_delivery.PHASES


PHASES: dict[str, Callable[[Spec], Figures]] = {
    "floor": phase_floor,
    "naive": phase_naive,
    "refresh": phase_refresh,
    "pending_pages": phase_pending_pages,
    "setup": phase_setup,
}


def main() -> int:
    name, spec = sys.argv[1], json.loads(sys.argv[2])
    if name == "standin":  # serves until its stdin closes; not a phase with figures
        from bench import perf_delivery

        perf_delivery.serve_standin(spec)
        return 0
    phase = PHASES.get(name) or _delivery_phases()[name]
    with contextlib.redirect_stdout(sys.stderr):  # the last stdout line is the figures
        figures = phase(spec)
    figures["rss_mb"] = peak_rss_mb()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
