"""glibc's malloc arenas: one in the daemon, however it is started, and trimmed.

glibc gives threads arenas of their own (up to 8 per core). The daemon allocates from a
dozen threads, some short-lived (a delivery pass's event loop, a source query's timer), and
the memory they free stays scattered in those arenas, kept by the process: RSS crept up while
the heap in use stayed flat (docs/performance.md: Memory over time). Two arenas still left each
outage's burst of work free memory in the arena its threads did not come back to: in 42-minute
probes at the soak's pace with an outage every 10 minutes, RSS rose 4.2 (SQLite) and 6.7 MB/h
(PostgreSQL) after the warm-up with two, 0.8 and 2.9 MB/h with one. The GIL already lets one
thread at a time run Python, and glibc's per-thread cache serves most small blocks without the
arena's lock, so sharing one costs the daemon nothing measurable. The systemd unit and the
container set ``MALLOC_ARENA_MAX=1``; this does the same for a daemon started any other way. An
operator's own ``MALLOC_ARENA_MAX`` wins. Elsewhere (not Linux, musl) it does nothing.

Even in one arena, what a burst of work frees (a refresh's rows, a delivery pass's calls) is
scattered among what stays in use, and glibc gives back to the system only the free memory at
the top of its heap: the rest stayed in the process, a few MB more after each burst of another
shape. ``Trimmer`` hands the free pages back (``malloc_trim``), at most once a minute.

glibc also moves its mmap threshold: a block larger than it gets pages of its own, given back
as soon as it is freed, but freeing one raises the threshold to that block's size (up to
32 MB), so from then on blocks of that size come from the heap, where they are freed among
blocks still in use. In 10-minute probes at the soak's size, glibc's free memory grew from 3.1
to 4.7 MB (a PostgreSQL store) and 6.4 to 9.0 MB (SQLite) before any outage; with the threshold
fixed it held at 1.5-2.1 and 5.1-6.0 MB, and RSS was 1.6 and 4 MB lower (docs/performance.md).
``pin_mmap_threshold`` sets it to glibc's own starting value, 128 KiB, which turns the
adjustment off (mallopt(3)).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
M_ARENA_MAX = -8
ARENAS = 1
MMAP_THRESHOLD = 128 * 1024  # glibc's default, before any adjustment
# The environment's own ways of setting the threshold; either wins over ours.
ENV_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
TUNABLE_MMAP_THRESHOLD = "glibc.malloc.mmap_threshold"  # in GLIBC_TUNABLES


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        return ctypes.CDLL(None).mallopt  # the process's own libc
    except (OSError, AttributeError):
        return None


def limit_arenas(
    count: int = ARENAS,
    *,
    environ: Mapping[str, str] = os.environ,
    mallopt: Callable[[], Callable[[int, int], int] | None] = _mallopt,
) -> int | None:
    """Cap malloc's arenas at ``count``, before the daemon starts its threads. Returns the cap
    set, or None when left as it was (set by the environment, or no glibc)."""
    if "MALLOC_ARENA_MAX" in environ or not sys.platform.startswith("linux"):
        return None
    if not _set(M_ARENA_MAX, count, mallopt):
        return None
    log.debug("malloc arenas capped at %d", count)
    return count


def _set(param: int, value: int, mallopt: Callable[[], Callable[[int, int], int] | None]) -> bool:
    call = mallopt()
    # glibc returns 1 on success; musl's mallopt is a stub that returns 0.
    return call is not None and call(param, value) == 1


def pin_mmap_threshold(
    size: int = MMAP_THRESHOLD,
    *,
    environ: Mapping[str, str] = os.environ,
    mallopt: Callable[[], Callable[[int, int], int] | None] = _mallopt,
) -> int | None:
    """Fix malloc's mmap threshold at ``size`` bytes, which stops glibc from raising it as
    large blocks are freed. Returns the threshold set, or None when left as it was (set by
    ``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES``, or no glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    if ENV_MMAP_THRESHOLD in environ or TUNABLE_MMAP_THRESHOLD in environ.get("GLIBC_TUNABLES", ""):
        return None
    if not _set(M_MMAP_THRESHOLD, size, mallopt):
        return None
    log.debug("malloc's mmap threshold fixed at %d bytes", size)
    return size


def tune_malloc(environ: Mapping[str, str] = os.environ) -> None:
    """What the daemon sets before it starts its threads: the arenas' cap and the threshold."""
    limit_arenas(environ=environ)
    pin_mmap_threshold(environ=environ)


def malloc_info() -> str | None:
    """What glibc's arenas hold, as malloc_info(3) writes it (XML: each arena's ``<heap>``, its
    free chunks by size), or None without glibc. For diagnosis (``bench.memory_probe``) and the
    tests that count the arenas; it writes through a temporary file, as the call needs a FILE*."""
    try:
        libc = ctypes.CDLL(None)
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    with tempfile.NamedTemporaryFile() as f:
        fp = libc.fopen(f.name.encode(), b"w")
        if not fp:
            return None
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        return f.read().decode()


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class Trimmer:
    """Give malloc's free pages back to the system, at most once per ``every`` seconds.

    Called from the daemon's main loop, which wakes every fraction of a second; a trim walks
    the arenas under their locks (a millisecond or two for the daemon's heap), so it is spaced
    out. Without glibc it does nothing.
    """

    def __init__(
        self,
        every: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        malloc_trim: Callable[[], Callable[[int], int] | None] = _malloc_trim,
    ) -> None:
        self.every = every
        self.clock = clock
        self._trim = malloc_trim() if sys.platform.startswith("linux") else None
        self._last: float | None = None
        self.trims = 0

    def __call__(self) -> bool:
        """Trim if the last trim is ``every`` seconds old (the first call waits that long too).
        Returns whether it trimmed."""
        now = self.clock()
        if self._last is None:
            self._last = now
        if self._trim is None or now - self._last < self.every:
            return False
        self._last = now
        self._trim(0)  # 0: keep no padding at the top of the heap
        self.trims += 1
        return True
