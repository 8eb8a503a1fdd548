"""The daemon caps glibc's malloc arenas and fixes its mmap threshold itself, unless the
environment already does; and it trims the heap."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from audiencesync.daemon.arenas import (
    ARENAS,
    M_ARENA_MAX,
    M_MMAP_THRESHOLD,
    MMAP_THRESHOLD,
    Trimmer,
    limit_arenas,
    pin_mmap_threshold,
)


def recorder(result: int) -> tuple[list[tuple[int, int]], Callable[[], Callable[[int, int], int]]]:
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return result

    return calls, lambda: mallopt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas are Linux's")
def test_the_cap_is_set_through_mallopt() -> None:
    calls, loader = recorder(1)
    assert limit_arenas(environ={}, mallopt=loader) == ARENAS
    assert calls == [(M_ARENA_MAX, 1)]


def test_the_operator_s_own_setting_wins() -> None:
    calls, loader = recorder(1)
    assert limit_arenas(environ={"MALLOC_ARENA_MAX": "8"}, mallopt=loader) is None
    assert calls == []


def test_without_glibc_nothing_is_set() -> None:
    assert limit_arenas(environ={}, mallopt=lambda: None) is None
    _, stub = recorder(0)  # musl's mallopt: a stub that refuses
    assert limit_arenas(environ={}, mallopt=stub) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas are Linux's")
def test_the_real_libc_takes_it() -> None:
    # This machine's glibc accepts the cap (mallopt answers 1): what `audiencesync run` does.
    assert limit_arenas(environ={}) == ARENAS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's threshold is Linux's")
def test_the_mmap_threshold_is_fixed_through_mallopt() -> None:
    calls, loader = recorder(1)
    assert pin_mmap_threshold(environ={}, mallopt=loader) == MMAP_THRESHOLD == 128 * 1024
    assert calls == [(M_MMAP_THRESHOLD, 128 * 1024)]


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=1048576"},
    ],
)
def test_the_operator_s_own_threshold_wins(environ: dict[str, str]) -> None:
    calls, loader = recorder(1)
    assert pin_mmap_threshold(environ=environ, mallopt=loader) is None
    assert calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's threshold is Linux's")
def test_other_tunables_leave_the_threshold_to_the_daemon() -> None:
    calls, loader = recorder(1)
    assert pin_mmap_threshold(environ={"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, mallopt=loader)
    assert calls == [(M_MMAP_THRESHOLD, MMAP_THRESHOLD)]


def test_without_glibc_no_threshold_is_set() -> None:
    assert pin_mmap_threshold(environ={}, mallopt=lambda: None) is None
    _, stub = recorder(0)
    assert pin_mmap_threshold(environ={}, mallopt=stub) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's threshold is Linux's")
def test_the_real_libc_takes_the_threshold() -> None:
    assert pin_mmap_threshold(environ={}) == MMAP_THRESHOLD


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_the_trimmer_gives_memory_back_at_most_once_a_period() -> None:
    trims: list[int] = []

    def malloc_trim(pad: int) -> int:
        trims.append(pad)
        return 1

    clock = FakeClock()
    trimmer = Trimmer(60.0, clock=clock, malloc_trim=lambda: malloc_trim)
    assert not trimmer()  # the first look only starts the period
    clock.now = 59.9
    assert not trimmer()
    clock.now = 60.0
    assert trimmer()
    assert trims == [0]  # no padding kept at the heap's top
    for now in (60.1, 100.0, 119.9):
        clock.now = now
        assert not trimmer()
    clock.now = 120.0
    assert trimmer()
    assert trims == [0, 0] and trimmer.trims == 2


def test_without_glibc_the_trimmer_does_nothing() -> None:
    clock = FakeClock()
    trimmer = Trimmer(1.0, clock=clock, malloc_trim=lambda: None)
    clock.now = 10.0
    assert not trimmer()
    assert trimmer.trims == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_the_real_libc_trims() -> None:
    clock = FakeClock()
    trimmer = Trimmer(1.0, clock=clock)
    trimmer()
    clock.now = 1.0
    assert trimmer() and trimmer.trims == 1


# In a process of its own: malloc a block above the threshold, free it, then malloc a smaller
# one still above 128 KiB, and see whether it got pages of its own (mallinfo2's hblkhd).
_THRESHOLD_PROBE = """
import ctypes, sys
from audiencesync.daemon.arenas import pin_mmap_threshold

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "pinned":
    assert pin_mmap_threshold(environ={}) is not None
libc.free(libc.malloc(8 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(512 << 10)
print(libc.mallinfo2().hblkhd - before >= 512 << 10)
libc.free(block)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's threshold is Linux's")
@pytest.mark.parametrize(("mode", "own_pages"), [("glibc's default", "False"), ("pinned", "True")])
def test_a_freed_large_block_no_longer_moves_the_threshold(mode: str, own_pages: str) -> None:
    # glibc's default raises the threshold to 8 MB once the 8 MB block is freed, so the next
    # 512 KiB block comes from the heap; pinned, it still gets pages of its own, given back on free.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run(
        [sys.executable, "-c", _THRESHOLD_PROBE, mode], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == own_pages


# In a process of its own: cap the arenas (or not), start threads that each allocate from C,
# and count the arenas malloc_info(3) reports.
_ARENAS_PROBE = """
import sys, threading
from audiencesync.daemon.arenas import limit_arenas, malloc_info

if sys.argv[1] == "capped":
    assert limit_arenas(environ={}) is not None
held = []
def allocate():
    held.append(bytearray(100_000))  # from C's malloc, in this thread's arena
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(malloc_info().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's arenas are Linux's")
def test_capped_every_thread_allocates_from_the_one_arena() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    counts = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", _ARENAS_PROBE, mode],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for mode in ("glibc's default", "capped")
    }
    assert counts["glibc's default"] > 1  # each new thread took an arena of its own
    assert counts["capped"] == ARENAS == 1
