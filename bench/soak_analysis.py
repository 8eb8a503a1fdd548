"""What a soak run's samples say: the recovery after each outage, the RSS and its slope.

Pure functions over the samples ``bench/soak.py`` takes every few seconds, so that they can be
read (and tested) apart from the processes and the clock.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One look at the daemon, ``at`` seconds after the run started."""

    at: float
    pid: int | None  # the daemon process looked at (it changes at a restart)
    rss_mb: float | None  # VmRSS; None while no daemon runs
    healthz: int | None  # /healthz's status; None when nothing answered
    health: str  # /healthz's first line ("ok", the reason), or why nothing answered
    pending: int | None  # the pending changes /metrics counts, all audiences; None when unread
    acked: int  # identify calls the stand-in answered 2xx since the run started


@dataclass
class Outage:
    """One scheduled outage and what it did: ``start`` and ``end`` in seconds from the run's start
    (``end`` = the fault is gone: the stand-in answers again, the lock is released, the new daemon
    started; a signal's end is its own time)."""

    name: str
    planned: float
    seconds: float  # how long it is meant to last
    start: float | None = None
    end: float | None = None
    recovered: float | None = None  # when delivery had resumed, for good (see recovery())
    relapses: int = 0  # healthy stretches after the end that did not last
    notes: list[str] = field(default_factory=list)

    @property
    def recovery(self) -> float | None:
        """Seconds from the end until delivery resumed; None if it did not within the window."""
        if self.end is None or self.recovered is None:
            return None
        return self.recovered - self.end


def healthy(sample: Sample) -> bool:
    return sample.healthz == 200 and sample.health == "ok"


def recovery(
    samples: Sequence[Sample], end: float, until: float, stable: float, *, accept_cut: bool = True
) -> tuple[float | None, int]:
    """When delivery resumed after an outage that ended at ``end``, looking at samples up to
    ``until`` (the next outage's start, or the run's end), and how many times it relapsed.

    Resumed means: /healthz answers 200 ``ok``, and delivery goes on (an identify acknowledged
    since ``end``, or nothing pending), and /healthz stays healthy for ``stable`` seconds after
    (or up to ``until``, which may cut the stretch short). A healthy stretch that fails again
    sooner is a relapse, and the recovery is the start of a later stretch that lasts. Without
    ``accept_cut``, a stretch still short of ``stable`` at ``until`` does not count (a look while
    the run goes on: it may yet fail).
    """
    window = [s for s in samples if end <= s.at <= until]
    if not window:
        return None, 0
    acked_at_end = window[0].acked
    relapses = 0
    candidate: float | None = None
    for sample in window:
        if not healthy(sample):
            if candidate is not None:
                relapses += 1
                candidate = None
            continue
        delivering = sample.acked > acked_at_end or sample.pending == 0
        if candidate is None and delivering:
            candidate = sample.at
        if candidate is not None and sample.at - candidate >= stable:
            return candidate, relapses
    # A stretch still healthy when the window closed counts only if it reached the window's end.
    if accept_cut and candidate is not None and window[-1].at >= until - 1.5 * _period(window):
        return candidate, relapses
    return None, relapses


def _period(samples: Sequence[Sample]) -> float:
    if len(samples) < 2:
        return 0.0
    return (samples[-1].at - samples[0].at) / (len(samples) - 1)


def rss_at(samples: Sequence[Sample], at: float) -> float | None:
    """The RSS of the sample nearest to ``at`` that has one."""
    known = [s for s in samples if s.rss_mb is not None]
    if not known:
        return None
    return min(known, key=lambda s: abs(s.at - at)).rss_mb


def rss_slope(samples: Sequence[Sample], warmup: float) -> tuple[float | None, int]:
    """The RSS's growth in MB per hour, and the number of samples it rests on.

    A least-squares slope over each daemon process's samples after its own first ``warmup``
    seconds, pooled across processes (one slope, an intercept per process): the restart in
    the middle of a run would otherwise read as a drop, or its warm-up as a leak.
    """
    by_pid: dict[int, list[Sample]] = {}
    for sample in samples:
        if sample.pid is not None and sample.rss_mb is not None:
            by_pid.setdefault(sample.pid, []).append(sample)
    numerator = denominator = 0.0
    count = 0
    for series in by_pid.values():
        kept = [s for s in series if s.at - series[0].at >= warmup]
        if len(kept) < 2:
            continue
        mean_t = sum(s.at for s in kept) / len(kept)
        mean_r = sum(s.rss_mb or 0.0 for s in kept) / len(kept)
        numerator += sum((s.at - mean_t) * ((s.rss_mb or 0.0) - mean_r) for s in kept)
        denominator += sum((s.at - mean_t) ** 2 for s in kept)
        count += len(kept)
    if denominator == 0:
        return None, count
    return numerator / denominator * 3600, count


def rss_levels(
    samples: Sequence[Sample], marks: Sequence[tuple[str, float]]
) -> list[tuple[str, float | None]]:
    """The median RSS of each stretch between ``marks`` (label, seconds: where a stretch
    starts; the last runs to the end), per daemon process so that a restart starts its own.

    What a slope can't tell apart: a leak raises every stretch over the one before it; a cost
    paid once (a cache that fills, the heap's high-water mark at the first outage) raises one
    and the rest stay level.
    """
    levels: list[tuple[str, float | None]] = []
    bounds = [*(at for _, at in marks[1:]), float("inf")]
    for (label, start), end in zip(marks, bounds, strict=True):
        window = [x for x in samples if start <= x.at < end and x.rss_mb is not None]
        by_pid: dict[int | None, list[float]] = {}
        for x in window:
            by_pid.setdefault(x.pid, []).append(x.rss_mb or 0.0)
        if not by_pid:
            levels.append((label, None))
        for n, values in enumerate(by_pid.values()):
            levels.append((label if n == 0 else f"{label}, next process", statistics.median(values)))
    return levels


def mb(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def write_samples(path: Path, samples: Sequence[Sample]) -> None:
    """Every sample, for a plot of the run (RSS, health, pending, acknowledged calls over time)."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([f.name for f in dataclasses.fields(Sample)])
        writer.writerows(dataclasses.astuple(x) for x in samples)


def first_signs(samples: Sequence[Sample], end: float, until: float) -> list[str]:
    """When /healthz first answered ok, and an identify was first acknowledged, after ``end``:
    what to read a recovery that was missed (or came late) by."""
    window = [x for x in samples if end <= x.at <= until]
    if not window:
        return []
    notes = []
    ok = next((x.at for x in window if healthy(x)), None)
    acked = next((x.at for x in window if x.acked > window[0].acked), None)
    notes.append(f"/healthz ok after {ok - end:.0f} s" if ok is not None else "/healthz never ok")
    notes.append(f"first ack after {acked - end:.0f} s" if acked is not None else "no ack")
    return notes
