"""bench/perf.py's output: the tables of figures, their ratios, and the targets with pass/fail marks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.perf_delivery import DeliveryPlan
from bench.report import Figures

RSS_TARGET_MB = 150
TARGET_FROM = 1_000_000  # the targets on a, b and RSS apply from this size on
PAGE_RATIO = 2.0  # a page at the end may cost at most this many times one at the start

# Each figure's floor (c) and naive baseline (d): the same diff, on the same data.
BASELINE = {
    "a first sync dry run": "first",
    "b0 first refresh": "first",
    "b incremental dry run": "incremental",
    "b incremental refresh": "incremental",
}
TIME_TARGET = {"a first sync dry run": 3.0, "b incremental refresh": 2.0}


def _table(header: Sequence[str], lines: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    for r in [header, *lines]:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:-1], widths[2:-1], strict=True)]
        print("  ".join([*cells, r[-1]]).rstrip())


def _ratio(r: Figures, base: Figures | None, key: str) -> str:
    return f"{r[key] / base[key]:.2f}" if base and base[key] else "-"


class Targets:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def check(self, name: str, value: str, target: str, ok: bool) -> str:
        self.items.append({"target": name, "value": value, "wanted": target, "ok": ok})
        return "ok" if ok else "MISSED"


def _bulk(rows: list[Figures], targets: Targets) -> None:
    groups = sorted({(r["store"], r["n"]) for r in rows if "n" in r}, key=lambda g: (g[0] != "sqlite", g[1]))
    header = (
        "figure",
        "source",
        "time s",
        "RSS MB",
        "x floor c",
        "x naive t",
        "x naive RSS",
        "target / note",
    )
    for store, n in groups:
        group = [r for r in rows if r.get("store") == store and r.get("n") == n]
        find = {(r["figure"], r["source"]): r for r in group}
        print(f"\n{store}, {n:,} members")
        lines: list[list[str]] = []
        for r in group:
            figure, source = r["figure"], r["source"]
            if figure == "g pending page":
                ratio = r["end_ms"] / r["start_ms"] if r["start_ms"] else 0.0
                mark = targets.check(
                    f"{store} {n:,}: page at the end / at the start",
                    f"{ratio:.2f}",
                    f"<= {PAGE_RATIO}",
                    ratio <= PAGE_RATIO,
                )
                note = (
                    f"start {r['start_ms']:.1f} ms, end {r['end_ms']:.1f} ms ({r['end_rows']} rows): {mark}"
                )
                lines.append([figure, "-", "-", f"{r['rss_mb']:.0f}", "-", "-", "-", note])
                continue
            floor = naive = None
            if figure in BASELINE:
                floor = find.get((f"c {BASELINE[figure]}", source))
                naive = find.get((f"d {BASELINE[figure]}", "streamed"))
            note = ""
            limit = TIME_TARGET.get(figure)
            if limit and floor and n >= TARGET_FROM:
                ratio = r["seconds"] / floor["seconds"]
                ok = ratio <= limit
                note = f"<= {limit:g}x c: " + targets.check(
                    f"{store} {n:,} {source}: {figure} / floor", f"{ratio:.2f}", f"<= {limit:g}", ok
                )
            if figure in BASELINE and n >= TARGET_FROM and figure != "b0 first refresh":
                mark = targets.check(
                    f"{store} {n:,} {source}: {figure} peak RSS MB",
                    f"{r['rss_mb']:.0f}",
                    f"<= {RSS_TARGET_MB}",
                    r["rss_mb"] <= RSS_TARGET_MB,
                )
                note += f"{'; ' if note else ''}RSS <= {RSS_TARGET_MB} MB: {mark}"
            lines.append(
                [
                    figure,
                    source,
                    f"{r['seconds']:.2f}",
                    f"{r['rss_mb']:.0f}",
                    _ratio(r, floor, "seconds"),
                    _ratio(r, naive, "seconds"),
                    _ratio(r, naive, "rss_mb"),
                    note,
                ]
            )
        _table(header, lines)
        plan = find.get(("g pending page", "store"), {}).get("plan")
        if plan:
            print("PostgreSQL's plan of the page at the end (EXPLAIN ANALYZE):")
            print("\n".join(f"    {line}" for line in plan.splitlines()))


def _delivery(rows: list[Figures], plan: DeliveryPlan, targets: Targets) -> None:
    print("\ndelivery to the loopback stand-in (e) and coalescing (f)")
    header = ("figure", "store", "calls", "time s", "calls/s", "CPU s/1k", "target / note")
    lines: list[list[str]] = []
    for r in rows:
        store, figure = r["store"], r["figure"]
        if figure == "f":
            ok = r["calls"] == r["distinct"]
            mark = targets.check(
                f"{store}: f calls = distinct users", f"{r['calls']}", f"{r['distinct']}", ok
            )
            note = (
                f"distinct users {r['distinct']:,}, users x audiences {r['user_audiences']:,}; "
                f"calls = users: {mark}"
            )
            lines.append(["f 3 overlapping audiences", store, f"{r['calls']:,}", "-", "-", "-", note])
            continue
        rate = r["calls"] / r["seconds"]
        cpu = f"{r['cpu'] * 1000 / r['calls']:.2f}"
        if figure == "e1":
            bare = r["bare"]
            mark = targets.check(f"{store}: e no limit, calls/s", f"{rate:.0f}", ">= 1000", rate >= 1000)
            note = (
                f">= 1,000/s: {mark}; bare httpx {bare['calls'] / bare['seconds']:,.0f} calls/s, "
                f"{bare['cpu'] * 1000 / bare['calls']:.2f} CPU s/1k"
            )
            label = "e1 no limit"
        elif figure == "e2":
            ok = r["share"] >= 0.95 and r["http_429_late"] == 0
            mark = targets.check(
                f"{store}: e enforced limit, share / 429s after 1 min",
                f"{r['share']:.1%} / {r['http_429_late']}",
                ">= 95% / 0",
                ok,
            )
            note = (
                f"{r['share']:.1%} of the limit over {r['span']:.0f} s, {r['http_429']} 429s "
                f"({r['http_429_late']} after the first minute; at {r['http_429_at']} s): {mark}"
            )
            label = f"e2 {plan.limit:,}/min enforced"
        else:
            note = f"the ceiling, {r['concurrency']} calls in flight: {r['concurrency'] / 0.05:.0f}/s"
            label = "e3 50 ms a call"
        lines.append([label, store, f"{r['calls']:,}", f"{r['seconds']:.2f}", f"{rate:,.0f}", cpu, note])
    _table(header, lines)


def render(rows: list[Figures], plan: DeliveryPlan, machine: dict[str, Any]) -> dict[str, Any]:
    """Print the tables and the targets; the targets, for the JSON."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    print(f"\naudiencesync performance: {machine['cpus']} CPUs, Python {machine['python']}, {versions}")
    print("times are whole processes (wall), RSS each process's peak; x: ratio to the same run's baseline")
    targets = Targets()
    _bulk(rows, targets)
    delivered = [r for r in rows if r["figure"] in ("e1", "e2", "e3", "f")]
    if delivered:  # none when --rows left them out
        _delivery(delivered, plan, targets)
    print("\ntargets")
    for t in targets.items:
        print(f"  {'PASS' if t['ok'] else 'FAIL'}  {t['target']}: {t['value']} (wanted {t['wanted']})")
    return {"targets": targets.items}
