"""glibc's malloc arenas: at most two in the daemon, however it is started.

glibc gives threads arenas of their own (up to 8 per core). The daemon allocates from a
dozen threads, some short-lived (a delivery pass's event loop, a source query's timer), and
the memory they free stays scattered in those arenas, kept by the process: RSS crept up while
the heap in use stayed flat (README: Memory over time). The systemd unit and the container set
``MALLOC_ARENA_MAX=2``; this does the same for a daemon started any other way. An operator's own
``MALLOC_ARENA_MAX`` wins. Elsewhere (not Linux, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's <malloc.h>
ARENAS = 2


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
    call = mallopt()
    # glibc returns 1 on success; musl's mallopt is a stub that returns 0.
    if call is None or call(M_ARENA_MAX, count) != 1:
        return None
    log.debug("malloc arenas capped at %d", count)
    return count
