"""What bench/memory_probe.py measures in the daemon's process: RSS, the C heap (glibc's malloc
and SQLite's own allocator, which tracemalloc does not see), gc's objects by type, the caches
that fill as shapes of statements appear, tracemalloc's growers, and the slope of a series."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import gc
import linecache
import sys
import tracemalloc
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


_MALLINFO_FIELDS: tuple[str, ...] = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks")
_MALLINFO_FIELDS += ("fsmblks", "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO_FIELDS]


def c_heap() -> dict[str, float]:
    """What the C heap holds, which tracemalloc does not see: glibc's malloc (in use, and free
    but kept: fragmentation), and SQLite's own allocator (page caches, prepared statements)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
        out["malloc_used_mb"] = round((info.uordblks + info.hblkhd) / 2**20, 2)
        out["malloc_free_mb"] = round(info.fordblks / 2**20, 2)
    with contextlib.suppress(OSError, AttributeError):
        sqlite = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        sqlite.sqlite3_memory_used.restype = ctypes.c_int64
        out["sqlite_mb"] = round(sqlite.sqlite3_memory_used() / 2**20, 2)
    return out


def trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def cache_sizes(daemon: Any) -> dict[str, int]:
    """The sizes of the caches that fill as shapes of statements appear: SQLAlchemy's compiled
    cache of the store's engine and the source engines', and every functools cache of audiencesync."""
    sizes = {"sa_store": len(daemon.engine._compiled_cache or ())}
    engines = getattr(daemon.syncer.sources, "_engines", {})
    sizes["sa_sources"] = sum(len(e._compiled_cache or ()) for e in engines.values())
    for name, module in list(sys.modules.items()):
        if not name.startswith("audiencesync"):
            continue
        for attr, value in list(vars(module).items()):
            info = getattr(value, "cache_info", None)
            if callable(info):
                sizes[f"{name.rsplit('.', 1)[-1]}.{attr}"] = info().currsize
    return sizes


def dump_cache(daemon: Any) -> None:
    """The store engine's cached compiled statements, grouped by their first words: which
    statements come in many shapes."""
    cache = daemon.engine._compiled_cache or {}
    shapes = collections.Counter(" ".join(str(compiled).split())[:150] for compiled in list(cache.values()))
    print(f"\n{len(cache)} compiled statements cached; most repeated starts:")
    for text, n in shapes.most_common(15):
        print(f"  {n:4d}  {text}")


def slope_mb_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return 3600 * sxy / sxx if sxx else 0.0


def show_growth(snapshot: tracemalloc.Snapshot, previous: tracemalloc.Snapshot, top: int) -> None:
    stats = snapshot.compare_to(previous, "traceback")
    for stat in [s for s in stats if s.size_diff > 0][:top]:
        now = stat.size / 1024
        print(f"  +{stat.size_diff / 1024:8.1f} KiB  +{stat.count_diff:6d} blocks (now {now:.1f} KiB)")
        frames = [f for f in stat.traceback if "/tracemalloc.py" not in f.filename]
        ours = [f for f in frames if "audiencesync" in f.filename] or frames
        for frame in ours[-6:]:
            line = linecache.getline(frame.filename, frame.lineno).strip()
            print(f"      {short(frame.filename)}:{frame.lineno}  {line[:90]}")


def short(path: str) -> str:
    for marker in ("site-packages/", "/audiencesync/", "/lib/python3"):
        if marker in path:
            return (
                path.split(marker, 1)[1]
                if marker != "/audiencesync/"
                else "audiencesync/" + path.split(marker, 1)[1]
            )
    return path
