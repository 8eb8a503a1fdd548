"""Delivery (figure e) and coalescing (figure f) of bench/perf.py: phases and their orchestration.

The Gleap stand-in (tests/gleap_standin/) runs in a process of its own for e: in the client's
process its threads would share the client's GIL. It notes when each identify arrived and how it
was answered, and hands that log back when its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import perf_data as data
from bench.report import Figures

Spec = dict[str, Any]
PHASE_SCRIPT = str(Path(__file__).with_name("perf_phases.py"))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the stand-in's process ------------------------------------------------------------------


def serve_standin(spec: Spec) -> None:
    """Serve until stdin closes, then print the identify log: [seconds since the first, status]."""
    from tests.gleap_standin import IDENTIFY_PATH, GleapStandIn, RecordedRequest

    log: list[tuple[float, int]] = []

    class Timed(GleapStandIn):
        def _record(self, seq: int, request: RecordedRequest) -> None:
            if request.path.startswith(IDENTIFY_PATH):
                log.append((time.monotonic(), request.status))
            super()._record(seq, request)

    standin = Timed(
        data.TOKEN, rate_limit_per_minute=spec.get("rate_limit"), latency_seconds=spec.get("latency", 0.0)
    )
    with standin:
        print(f"READY {standin.base_url}", flush=True)
        sys.stdin.read()
    first = log[0][0] if log else 0.0
    print(json.dumps([(t - first, status) for t, status in sorted(log)]), flush=True)


@dataclass
class StandIn:
    url: str
    log: list[tuple[float, int]] = field(default_factory=list)  # filled when the process ends


@contextlib.contextmanager
def standin_process(rate_limit: int | None = None, latency: float = 0.0) -> Iterator[StandIn]:
    spec = json.dumps({"rate_limit": rate_limit, "latency": latency})
    proc = subprocess.Popen(
        [sys.executable, PHASE_SCRIPT, "standin", spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"the Gleap stand-in did not start: {line!r}")
    standin = StandIn(line.split()[1])
    try:
        yield standin
    finally:
        proc.stdin.close()
        standin.log = [(t, s) for t, s in json.loads(proc.stdout.read() or "[]")]
        proc.wait(timeout=60)


# --- phases (each in its own process) --------------------------------------------------------


def phase_deliver(spec: Spec) -> Figures:
    """A real Syncer cycle: a no-change refresh, then the delivery of every pending call."""
    from audiencesync.config.loading import load_config
    from audiencesync.store import store as store_mod
    from audiencesync.sync.cycle import Syncer

    config = load_config(Path(spec["config"]))
    syncer = Syncer(config, store_mod.Store(store_mod.create_engine(config.store.url)))
    cpu, start = _cpu_seconds(), time.perf_counter()
    report = syncer.run_cycle()
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    audience = report.audiences[0]
    return {
        "seconds": seconds,
        "cpu": cpu,
        "calls": report.calls,
        "acked": audience.sent,
        "retries": audience.retries,
        "rate_limited": audience.rate_limited,
        "status": audience.status,
        "concurrency": config.gleap.max_concurrency,
    }


def phase_bare(spec: Spec) -> Figures:
    """The same bodies posted by a bare httpx loop at the same concurrency, with no store."""
    import httpx

    from audiencesync.config.loading import load_config

    config = load_config(Path(spec["config"]))
    user_ids = [r[0] for r in data_ids(spec["source_path"], spec["table"])]
    concurrency = config.gleap.max_concurrency

    async def post_all() -> int:
        # The same pool as GleapClient's, so only audiencesync's own work differs.
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        todo = iter(user_ids)
        async with httpx.AsyncClient(
            base_url=config.gleap.base_url, headers={"Api-Token": data.TOKEN}, limits=limits, timeout=30
        ) as client:

            async def worker() -> int:
                acked = 0
                for user_id in todo:
                    response = await client.post("/admin/identify", json={data.KEY: True, "userId": user_id})
                    acked += response.is_success
                return acked

            return sum(await asyncio.gather(*(worker() for _ in range(concurrency))))

    cpu, start = _cpu_seconds(), time.perf_counter()
    acked = asyncio.run(post_all())
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"seconds": seconds, "cpu": cpu, "calls": len(user_ids), "acked": acked}


def data_ids(path: str, table: str) -> list[tuple[str]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT user_id FROM {table}").fetchall()


def phase_coalesce(spec: Spec) -> Figures:
    """A first sync of 3 overlapping audiences: users 1..N/2, N/4..3N/4 and N/2..N."""
    from audiencesync.config.loading import load_config
    from audiencesync.store import store as store_mod
    from audiencesync.sync.cycle import Syncer
    from tests.gleap_standin import GleapStandIn

    n, work = spec["users"], Path(spec["work"])
    ranges = {"first_half": (1, n // 2), "middle_half": (n // 4, 3 * n // 4), "second_half": (n // 2, n)}
    source = work / "coalesce_source.db"
    for key, (low, high) in ranges.items():
        data.write_id_table(source, key, (data.user_id(i) for i in range(low, high + 1)))
    data.fresh_store(spec["store_url"])
    with GleapStandIn(data.TOKEN) as standin:
        queries = {key: f"SELECT user_id FROM {key}" for key in ranges}
        path = data.write_config(
            work / "coalesce.toml", spec["store_url"], f"sqlite:///{source}", standin.base_url, queries
        )
        config = load_config(path)
        report = Syncer(config, store_mod.Store(store_mod.create_engine(config.store.url))).run_cycle()
        calls, contacts = standin.identify_calls, standin.contacts
    expected = {
        data.user_id(i): {key for key, (low, high) in ranges.items() if low <= i <= high}
        for i in range(1, n + 1)
    }
    wrong = sum(
        1
        for user, keys in expected.items()
        if {k for k in ranges if contacts.get(user, {}).get(k) is True} != keys
    )
    return {
        "seconds": 0.0,
        "calls": len(calls),
        "distinct": len({c["userId"] for c in calls}),
        "expected_distinct": len(expected),
        "user_audiences": sum(len(keys) for keys in expected.values()),
        "wrong_contacts": wrong,
        "status": [a.status for a in report.audiences],
    }


PHASES: dict[str, Callable[[Spec], Figures]] = {
    "deliver": phase_deliver,
    "bare": phase_bare,
    "coalesce": phase_coalesce,
}


# --- orchestration (in the parent) -----------------------------------------------------------

RunPhase = Callable[[str, Spec], Figures]


@dataclass
class DeliveryPlan:
    calls: int  # e(1): calls delivered with no limit
    limit: int  # e(2): the stand-in's calls a minute, and the config's requests_per_minute
    limited_minutes: float  # e(2): how long a run (0: skip it)
    latency_calls: int  # e(3): calls at 50 ms a call
    coalesce_users: int  # f


def _delivery_store(run: RunPhase, work: Path, store_url: str, name: str, count: int) -> tuple[Path, str]:
    """A fresh store and a source table of ``count`` ids, refreshed so that they are all pending."""
    source = work / "delivery_source.db"
    run("setup", {"step": "ids", "source_path": str(source), "table": name, "count": count, "prefix": "dlv-"})
    run("setup", {"step": "store", "store_url": store_url})
    return source, f"sqlite:///{source}"


def delivery_rows(
    run: RunPhase,
    work: Path,
    store: str,
    store_url: str,
    plan: DeliveryPlan,
    wanted: frozenset[str],
    limited: bool,
) -> tuple[list[Figures], list[str]]:
    """The figures of e(1), e(2) when ``limited``, e(3) and f on this store (those ``wanted``), and any
    wrong count."""
    rows: list[Figures] = []
    problems: list[str] = []

    def cycle(name: str, count: int, gleap: dict[str, Any], standin: StandIn, bare: bool) -> Figures:
        source, source_url = _delivery_store(run, work, store_url, name, count)
        config = data.write_config(
            work / f"{name}.toml",
            store_url,
            source_url,
            standin.url,
            {data.KEY: f"SELECT user_id FROM {name}"},
            gleap,
        )
        run("refresh", {"config": str(config)})
        figures = (
            {"bare": run("bare", {"config": str(config), "source_path": str(source), "table": name})}
            if bare
            else {}
        )
        real = run("deliver", {"config": str(config)})
        if (real["calls"], real["acked"], real["status"]) != (count, count, "succeeded"):
            problems.append(f"{store} {name}: expected {count} calls acknowledged, got {real}")
        return real | figures

    if "e1" in wanted:
        with standin_process() as standin:
            real = cycle("nolimit", plan.calls, {}, standin, bare=True)
        bare = real.pop("bare")
        if bare["acked"] != plan.calls:
            problems.append(f"{store} bare loop: {bare['acked']} of {plan.calls} acknowledged")
        rows.append({"figure": "e1", "store": store, **real, "bare": bare})

    if "e2" in wanted and limited and plan.limited_minutes > 0:
        count = round(plan.limit * plan.limited_minutes)
        with standin_process(rate_limit=plan.limit) as standin:
            real = cycle("limited", count, {"requests_per_minute": plan.limit}, standin, bare=False)
        ok = [t for t, s in standin.log if s == 200]
        span = (ok[-1] - ok[0]) if len(ok) > 1 else 0.0
        real["share"] = (len(ok) - 1) / span * 60 / plan.limit if span else 0.0
        real["http_429"] = sum(1 for _, s in standin.log if s == 429)
        real["http_429_late"] = sum(1 for t, s in standin.log if s == 429 and t > 60)
        real["http_429_at"] = [round(t, 1) for t, s in standin.log if s == 429]  # seconds into the run
        real["span"] = span
        rows.append({"figure": "e2", "store": store, **real})

    if "e3" in wanted:
        with standin_process(latency=0.05) as standin:
            real = cycle("latency", plan.latency_calls, {}, standin, bare=False)
        rows.append({"figure": "e3", "store": store, **real})

    if "f" not in wanted:
        return rows, problems
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        real = run(
            "coalesce",
            {"users": plan.coalesce_users, "work": tmp, "store_url": _coalesce_url(store_url, tmp)},
        )
    if real["wrong_contacts"] or real["distinct"] != real["expected_distinct"]:
        problems.append(f"{store} coalescing: {real['wrong_contacts']} contacts wrong, {real}")
    rows.append({"figure": "f", "store": store, **real})
    return rows, problems


def _coalesce_url(store_url: str, tmp: str) -> str:
    return store_url if store_url.startswith("postgresql") else f"sqlite:///{tmp}/coalesce_store.db"
