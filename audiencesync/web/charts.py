"""The status page's charts, drawn on the server: coordinates in, SVG geometry out.

Only numbers and labels here; ``templates/charts.html`` turns a ``Chart``
into SVG, so every label (an audience's name, a time) is escaped by the same
template engine as the rest of the page, and the browser runs no script to
draw. Times are UTC, and the axes say so.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from audiencesync.web.pages import RunPoint

TIME_FORMAT = "%m-%d %H:%M"


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    title: str  # the tooltip: when, and the value


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    title: str
    left: float  # the plot area
    top: float
    right: float
    bottom: float
    x_label: str = ""
    y_label: str = ""
    line: str = ""  # a polyline's points, "x,y x,y ..."
    points: list[Point] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    zero: float | None = None  # the y of the value 0, when the chart has negatives
    legend: list[tuple[str, str]] = field(default_factory=list)  # (css class, label)
    spark: bool = False


def nice_max(value: float) -> float:
    """The axis' top: 1, 2, 2.5 or 5 times a power of ten, at least ``value`` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return float(step * power)
    return 10.0 * power  # pragma: no cover - the loop ends at 10


def _count(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def _x_scale(times: Sequence[datetime], left: float, right: float) -> list[float]:
    """Times to x: proportional to time, so uneven gaps between runs look uneven."""
    if not times:
        return []
    first, last = times[0].timestamp(), times[-1].timestamp()
    if last == first:
        return [(left + right) / 2] * len(times)
    return [left + (t.timestamp() - first) / (last - first) * (right - left) for t in times]


def _x_ticks(times: Sequence[datetime], xs: Sequence[float], most: int = 5) -> list[Tick]:
    if not times:
        return []
    step = max(1, math.ceil(len(times) / most))
    picked = list(range(0, len(times), step))
    if picked[-1] != len(times) - 1 and len(times) > 1:
        picked[-1] = len(times) - 1  # the last run is always labelled
    return [Tick(xs[i], times[i].strftime(TIME_FORMAT)) for i in picked]


def members(points: Sequence[RunPoint], *, title: str, spark: bool = False) -> Chart:
    """Members after each applied refresh, on a time axis. ``spark``: the overview's small one."""
    width, height = (160, 36) if spark else (720, 260)
    left, top, right, bottom = (
        (3.0, 3.0, width - 3.0, height - 3.0) if spark else (64.0, 16.0, width - 44.0, height - 52.0)
    )
    top_value = nice_max(max((p.members for p in points), default=0))
    # A sparkline spans its own lowest to highest: from 0, a churn of 1% would draw a flat line.
    low = min((p.members for p in points), default=0) if spark else 0
    high = max((p.members for p in points), default=0) if spark else top_value
    xs = _x_scale([p.started_at for p in points], left, right)

    def y(value: float) -> float:
        if high == low:
            return (top + bottom) / 2
        return bottom - (value - low) / (high - low) * (bottom - top)

    chart_points = [
        Point(x, y(p.members), f"{p.started_at:%Y-%m-%d %H:%M} UTC: {p.members:,} members (run {p.run_id})")
        for x, p in zip(xs, points, strict=True)
    ]
    return Chart(
        width,
        height,
        title,
        left,
        top,
        right,
        bottom,
        x_label="" if spark else "run started (UTC)",
        y_label="" if spark else "members",
        line=" ".join(f"{p.x:.1f},{p.y:.1f}" for p in chart_points),
        points=chart_points,
        x_ticks=[] if spark else _x_ticks([p.started_at for p in points], xs),
        y_ticks=[] if spark else [Tick(y(top_value * i / 4), _count(top_value * i / 4)) for i in range(5)],
        spark=spark,
    )


def changes(points: Sequence[RunPoint], *, title: str) -> Chart:
    """Entered (up) and left (down) per applied refresh, a pair of bars per run, on a time axis."""
    width, height = 720, 276
    left, top, right, bottom = 64.0, 32.0, width - 44.0, height - 52.0  # the legend above the plot
    # The scale is the incremental runs': a first sync's thousands would flatten the churn to
    # nothing. Its bar is cut at the top (marked, and its tooltip says the real count).
    usual = [max(p.entered, p.left) for p in points if p.mode == "incremental"]
    top_value = nice_max(max(usual or [max((max(p.entered, p.left) for p in points), default=0)]))
    middle = (top + bottom) / 2
    half = bottom - middle
    # Bars at the runs' times; inset so the first and last bars stay inside the plot.
    inset = 8.0
    xs = _x_scale([p.started_at for p in points], left + inset, right - inset)
    gaps = [b - a for a, b in itertools.pairwise(xs) if b > a]
    bar = max(1.0, min(6.0, (min(gaps) if gaps else 12.0) / 2.5))
    bars: list[Bar] = []
    for x, p in zip(xs, points, strict=True):
        when = f"{p.started_at:%Y-%m-%d %H:%M} UTC, run {p.run_id}"
        up = min(p.entered / top_value, 1.0) * half
        down = min(p.left / top_value, 1.0) * half
        cut_up = " cut" if p.entered > top_value else ""
        cut_down = " cut" if p.left > top_value else ""
        bars.append(
            Bar(
                x - bar, middle - up, bar, up, "entered" + cut_up, f"{when} ({p.mode}): {p.entered:,} entered"
            )
        )
        bars.append(Bar(x, middle, bar, down, "left" + cut_down, f"{when} ({p.mode}): {p.left:,} left"))
    ticks = [Tick(middle - half * i / 2, _count(top_value * i / 2)) for i in (2, 1, 0)]
    ticks += [Tick(middle + half * i / 2, _count(top_value * i / 2)) for i in (1, 2)]
    return Chart(
        width,
        height,
        title,
        left,
        top,
        right,
        bottom,
        x_label="run started (UTC)",
        y_label="users per run",
        bars=bars,
        x_ticks=_x_ticks([p.started_at for p in points], xs),
        y_ticks=ticks,
        zero=middle,
        legend=[("entered", "entered (up)"), ("left", "left (down)")],
    )
