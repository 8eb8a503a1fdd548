"""The daemon caps glibc's malloc arenas itself, unless the environment already does."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from audiencesync.arenas import ARENAS, M_ARENA_MAX, limit_arenas


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
