"""The daemon caps glibc's malloc arenas itself, unless the environment already does."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from audiencesync.daemon.arenas import ARENAS, M_ARENA_MAX, Trimmer, limit_arenas


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
    assert calls == [(M_ARENA_MAX, 2)]


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
