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
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

from audiencesync.daemon.arenas import malloc_info


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


_MALLINFO_FIELDS: tuple[str, ...] = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks")
_MALLINFO_FIELDS += ("fsmblks", "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO_FIELDS]


def rss_parts() -> dict[str, float]:
    """RSS split: anonymous (heaps, pymalloc's arenas, stacks) and file-backed (code, mmapped
    files); and tracemalloc's own memory (its traces and interned tracebacks, which grow as new
    tracebacks appear), to subtract from RSS when tracing."""
    out: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            out[line.split(":")[0].lower() + "_mb"] = round(int(line.split()[1]) / 1024, 2)
    if tracemalloc.is_tracing():
        out["tracemalloc_own_mb"] = round(tracemalloc.get_tracemalloc_memory() / 2**20, 2)
    return out


def pymalloc() -> dict[str, float]:
    """Python's own allocator (its 1 MiB arenas are mmapped: not in glibc's counts): arenas held,
    and of their bytes, how many are in use by objects. An arena is given back only when all of it
    is free, so arenas held while the bytes in use stay flat is fragmentation."""
    out: dict[str, float] = {}
    with tempfile.TemporaryFile() as f, contextlib.suppress(OSError, AttributeError):
        saved = os.dup(2)  # _debugmallocstats writes to C's stderr
        try:
            sys.stderr.flush()
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        for line in f.read().decode(errors="replace").splitlines():
            key, _, value = line.partition("=")
            key = key.strip()
            if key == "# arenas allocated current":
                out["pymalloc_arenas"] = int(value.replace(",", ""))
            elif key.startswith("# bytes in allocated blocks"):
                out["pymalloc_used_mb"] = round(int(value.replace(",", "")) / 2**20, 2)
    return out


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
        out["malloc_mmapped_mb"] = round(info.hblkhd / 2**20, 2)
    with contextlib.suppress(OSError, AttributeError):
        sqlite = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
        sqlite.sqlite3_memory_used.restype = ctypes.c_int64
        out["sqlite_mb"] = round(sqlite.sqlite3_memory_used() / 2**20, 2)
        sqlite.sqlite3_memory_highwater.restype = ctypes.c_int64
        out["sqlite_high_mb"] = round(sqlite.sqlite3_memory_highwater(0) / 2**20, 2)
    return out


def malloc_free_sizes() -> dict[str, float]:
    """glibc's free memory by the size of its free chunks (malloc_info(3), all arenas): chunks
    under a page sit between blocks in use and ``malloc_trim`` can't give them back; larger ones
    it can, page by page. ``free_lt1k_mb`` ... ``free_ge64k_mb``."""
    import xml.etree.ElementTree as ET

    info = malloc_info()
    try:
        root = ET.fromstring(info) if info else None
    except ET.ParseError:
        root = None
    if root is None:
        return {}
    buckets = {"lt1k": 1024, "1k_4k": 4096, "4k_64k": 65536, "ge64k": float("inf")}
    totals = dict.fromkeys(buckets, 0)
    for heap in root.iter("heap"):
        for size in heap.iter("size"):
            low = int(size.get("from", 0))
            name = next(k for k, top in buckets.items() if low < top)
            totals[name] += int(size.get("total", 0))
    return {f"free_{k}_mb": round(v / 2**20, 2) for k, v in totals.items()}


def store_sizes(engine: Any) -> dict[str, Any]:
    """What the store holds, which decides how much of it SQLite's page caches (up to
    ``cache_size`` per pooled connection) can fill: the rows of its growing tables, the file
    and its WAL, and the pool's connections (each with a page cache of its own)."""
    out: dict[str, Any] = {}
    pool = engine.pool
    for name in ("checkedin", "checkedout", "overflow"):
        with contextlib.suppress(Exception):
            out[f"pool_{name}"] = getattr(pool, name)()
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if path:
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                out[f"file{suffix or ''}_mb"] = round(Path(path + suffix).stat().st_size / 2**20, 2)
    with contextlib.suppress(Exception), engine.connect() as conn:
        for table in ("calls", "call_values", "membership_changes", "sync_runs", "memberships"):
            with contextlib.suppress(Exception):
                out[f"rows_{table}"] = conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
            conn.rollback()
        if engine.dialect.name == "sqlite":
            out["cache_size"] = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    return out


_DBSTATUS = {"cache": 1, "schema": 2, "stmt": 3}  # SQLITE_DBSTATUS_CACHE_USED, _SCHEMA_USED, _STMT_USED


def sqlite_connections(engines: dict[str, Any]) -> dict[str, Any]:
    """SQLite's memory per pooled connection that is checked in (page cache, schema, prepared
    statements: sqlite3_db_status), summed per engine, with the connection count. The handle is
    read from the sqlite3 module's connection object (its first field after the object header,
    CPython 3.11's Modules/_sqlite/connection.h): a probe's trick, not the daemon's."""
    out: dict[str, Any] = {}
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    except OSError:
        return out
    for label, engine in engines.items():
        if engine.dialect.name != "sqlite":
            continue
        queue = getattr(engine.pool, "_pool", None)
        records = list(getattr(queue, "queue", ()))
        totals = dict.fromkeys(_DBSTATUS, 0)
        for record in records:
            raw = getattr(record, "dbapi_connection", None)
            if raw is None:
                continue
            handle = ctypes.c_void_p.from_address(id(raw) + sys.getsizeof(object())).value
            for name, op in _DBSTATUS.items():
                cur, high = ctypes.c_int(), ctypes.c_int()
                db = ctypes.c_void_p(handle)
                if lib.sqlite3_db_status(db, op, ctypes.byref(cur), ctypes.byref(high), 0) == 0:
                    totals[name] += cur.value
            stmts, stage = _statements(lib, handle)
            totals["stmts"] = totals.get("stmts", 0) + stmts
            totals["stage_stmts"] = totals.get("stage_stmts", 0) + stage
        out[f"{label}_conns"] = len(records)
        out[f"{label}_stmts"] = totals.pop("stmts", 0)
        out[f"{label}_stage_stmts"] = totals.pop("stage_stmts", 0)
        out |= {f"{label}_{name}_mb": round(v / 2**20, 2) for name, v in totals.items()}
    return out


def _heap_mb() -> float:
    gc.collect()
    return c_heap().get("malloc_used_mb", 0.0) + pymalloc().get("pymalloc_used_mb", 0.0)


def held_by_caches(engine: Any) -> None:
    """What two things that only grow with the run's variety hold, measured by emptying them
    (glibc's and pymalloc's memory in use, before and after):

    - psycopg's query cache (128 query texts, each parsed into its parts), where each length of
      an expanded IN list is a text of its own;
    - the store's pooled connections, beyond as many new ones used once: a driver's buffers grow
      to the largest message the connection has carried (libpq keeps that size for its life)."""
    queries = sys.modules.get("psycopg._queries")
    if queries is not None:
        before = _heap_mb()
        queries._query2pg.cache_clear()
        queries._query2pg_client.cache_clear()
        print(f"\npsycopg's query cache held {before - _heap_mb():.2f} MB")
    count = engine.pool.checkedin()
    before = _heap_mb()
    engine.dispose()  # the checked-in connections only; a checked-out one goes when returned
    empty = _heap_mb()
    fresh = [engine.connect() for _ in range(count)]
    for conn in fresh:
        conn.exec_driver_sql("SELECT 1")
    for conn in fresh:
        conn.close()
    print(
        f"{count} pooled connections held {before - empty:.2f} MB; {count} new ones, used once, "
        f"hold {_heap_mb() - empty:.2f} MB"
    )


def _statements(lib: Any, handle: int | None) -> tuple[int, int]:
    """How many prepared statements a connection holds (the sqlite3 module keeps up to
    ``cached_statements``, 128, per connection), and how many of them name a refresh's stage."""
    lib.sqlite3_next_stmt.restype = ctypes.c_void_p
    lib.sqlite3_next_stmt.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.sqlite3_sql.restype = ctypes.c_char_p
    lib.sqlite3_sql.argtypes = [ctypes.c_void_p]
    count = stage = 0
    stmt = lib.sqlite3_next_stmt(handle, None)
    while stmt:
        count += 1
        stage += b"stage_" in (lib.sqlite3_sql(stmt) or b"")
        stmt = lib.sqlite3_next_stmt(handle, stmt)
    return count, stage


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
    # psycopg's own: each query text it has parsed (up to 128, each under 4 KB), so each length of
    # an expanded IN list is one more entry.
    queries = sys.modules.get("psycopg._queries")
    for attr in ("_query2pg", "_query2pg_client"):
        info = getattr(getattr(queries, attr, None), "cache_info", None)
        if callable(info):
            sizes[f"psycopg.{attr}"] = info().currsize
    for name, module in list(sys.modules.items()):
        if not name.startswith("audiencesync"):
            continue
        for attr, value in list(vars(module).items()):
            info = getattr(value, "cache_info", None)
            if callable(info):
                sizes[f"{name.rsplit('.', 1)[-1]}.{attr}"] = info().currsize
    return sizes


def dump_cache(daemon: Any, texts: Path | None = None) -> None:
    """The store engine's cached compiled statements, grouped by their first words: which
    statements come in many shapes."""
    cache = daemon.engine._compiled_cache or {}
    shapes = collections.Counter(" ".join(str(compiled).split())[:150] for compiled in list(cache.values()))
    if texts is not None:  # every statement in full, one a line: which ones come in many shapes
        texts.write_text("".join(" ".join(str(compiled).split()) + "\n" for compiled in list(cache.values())))
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


def survivors(top: int) -> None:
    """What was allocated since tracemalloc started and is still alive (after a collection),
    grouped by traceback, then stop tracing: what an event left behind, when tracing the whole
    run would slow the daemon too much."""
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, linecache.__file__)]
    )
    tracemalloc.stop()
    stats = snapshot.statistics("traceback")
    total = sum(s.size for s in stats)
    print(f"  survivors: {total / 1024:.1f} KiB in {sum(s.count for s in stats)} blocks")
    for stat in stats[:top]:
        print(f"  {stat.size / 1024:8.1f} KiB  {stat.count:6d} blocks")
        frames = list(stat.traceback)
        for frame in frames[-8:]:
            line = linecache.getline(frame.filename, frame.lineno).strip()
            print(f"      {short(frame.filename)}:{frame.lineno}  {line[:90]}")
    by_file = snapshot.statistics("filename")
    print(
        "  by file: "
        + ", ".join(f"{short(str(s.traceback[0].filename))} {s.size // 1024} KiB" for s in by_file[:12])
    )


def short(path: str) -> str:
    for marker in ("site-packages/", "/audiencesync/", "/lib/python3"):
        if marker in path:
            return (
                path.split(marker, 1)[1]
                if marker != "/audiencesync/"
                else "audiencesync/" + path.split(marker, 1)[1]
            )
    return path
