"""What the benchmarks share: a phase in a process of its own, its peak RSS, the table of figures,
and rows cut into chunks for bulk loads.

Light on imports on purpose: a phase's peak RSS counts everything its process imported.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
from collections.abc import Iterable, Iterator
from typing import Any

Figures = dict[str, Any]
Row = tuple[str, ...]
HEADER: Row = ("phase", "time s", "RSS MB", "base s", "base MB", "time x", "RSS x", "check / note")


def peak_rss_mb() -> float:
    """This process's peak RSS.

    VmHWM rather than ru_maxrss where there is /proc: Linux carries the parent's peak over into
    a child's ru_maxrss across fork and exec, so the parent's size would floor every phase.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def run_phase(script: str, *args: str) -> Figures:
    """Run ``script`` with ``args`` in a fresh interpreter; its figures are the last line it prints."""
    out = subprocess.run(
        [sys.executable, script, *args], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    figures: Figures = json.loads(out.splitlines()[-1])
    return figures


def row(phase: str, real: Figures, base: Figures | None, note: str) -> Row:
    """A line of the table: the figures, the baseline's, and their ratios (real / baseline)."""
    if base is None:
        return (phase, f"{real['seconds']:.2f}", f"{real['rss_mb']:.0f}", "-", "-", "-", "-", note)
    return (
        phase,
        f"{real['seconds']:.2f}",
        f"{real['rss_mb']:.0f}",
        f"{base['seconds']:.2f}",
        f"{base['rss_mb']:.0f}",
        f"{real['seconds'] / base['seconds']:.2f}",
        f"{real['rss_mb'] / base['rss_mb']:.2f}",
        note,
    )


def report(title: str, rows: list[Row], problems: list[str]) -> int:
    """Print the title and the table, then each problem; the exit status is 1 when there was one."""
    print(f"\n{title}\n")
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    for r in [HEADER, *rows]:
        cells = [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True))]
        print("  ".join([*cells, r[-1]]).rstrip())
    for problem in problems:
        print(f"WRONG: {problem}", file=sys.stderr)
    return 1 if problems else 0


def chunks(items: Iterable[Any], size: int = 50_000) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter): bulk loads without a whole list in memory."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
