"""bench/perf.py still runs, end to end, in its quickest mode: tiny sizes, short delivery, no enforced limit.

What it measures is not checked here (speed targets are the benchmark's, not the suite's), but its
own correctness checks are: a wrong count makes it exit 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_in_its_quickest_mode(store_url: str, tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    stores = ["--stores", "sqlite"] if store_url.startswith("sqlite") else ["--stores", "postgresql"]
    stores += [] if store_url.startswith("sqlite") else ["--postgres-url", store_url]
    args = ["--members", "500", "--calls", "60", "--latency-calls", "20", "--coalesce-users", "60"]
    args += ["--limited-minutes", "0", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "perf.py"), *stores, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "targets" in done.stdout
    result = json.loads(out.read_text())
    figures = {r["figure"] for r in result["rows"]}
    assert {
        "a first sync dry run",
        "b incremental refresh",
        "b incremental dry run",
        "c first",
        "d incremental",
        "g pending page",
        "e1",
        "e3",
        "f",
    } <= figures
    assert result["problems"] == []
    coalesced = next(t for t in result["targets"] if "f calls = distinct users" in t["target"])
    assert coalesced["ok"], coalesced


def test_rows_runs_only_the_rows_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    args = ["--stores", "sqlite", "--members", "300", "--calls", "30", "--rows", "b", "e1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "perf.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    figures = {r["figure"] for r in result["rows"]}
    # b needs the first refresh it runs after; nothing else is measured.
    assert figures == {"version", "b0 first refresh", "b incremental dry run", "b incremental refresh", "e1"}
    assert result["problems"] == []
