"""The circuit breaker as a unit: where exactly it opens, what it keeps, its probing form.

The suite's delivery tests only see the breaker open or stay shut somewhere along
thousands of failures; these pin its boundaries, which mutation testing showed
nothing else does (scripts/mutate).
"""

from __future__ import annotations

import asyncio
import time

from audiencesync.breaker import CircuitBreaker


def test_it_opens_on_exactly_the_threshold_th_failure_once_two_users_failed() -> None:
    now = [100.0]
    breaker = CircuitBreaker(3, clock=lambda: now[0])
    breaker.failure("u1", "HTTP 503")
    breaker.failure("u2", "HTTP 503")
    assert not breaker.is_open and breaker.failures == 2  # one short of the threshold
    now[0] = 107.0
    breaker.failure("u1", "timed out")
    assert breaker.is_open and breaker.opened_at == 107.0
    assert (breaker.failures, breaker.users) == (3, {"u1", "u2"})


def test_it_keeps_the_last_error_for_the_message_that_stops_the_pass() -> None:
    breaker = CircuitBreaker(2)
    breaker.failure("u1", "HTTP 503: unavailable")
    breaker.failure("u2", "connection refused")
    assert breaker.is_open and breaker.last_error == "connection refused"


def test_the_probing_breaker_opens_on_the_first_failure_of_any_user() -> None:
    probe = CircuitBreaker.probing(clock=lambda: 5.0)
    assert not probe.is_open
    probe.failure("u1", "HTTP 502")
    assert probe.is_open and probe.opened_at == 5.0


def test_a_backoff_sleep_ends_when_the_breaker_opens() -> None:
    async def scenario() -> float:
        breaker = CircuitBreaker(1, min_users=1)
        started = time.monotonic()
        sleeper = asyncio.create_task(breaker.sleep(60))
        await asyncio.sleep(0)  # the sleep is waiting
        breaker.failure("u1", "HTTP 503")
        await asyncio.wait_for(sleeper, 30)
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 30  # cut short, far from its 60 s


def test_a_success_between_failures_starts_the_count_again() -> None:
    # "threshold failures in a row": two, a success, two more is not three in a row.
    breaker = CircuitBreaker(3)
    breaker.failure("u1", "HTTP 503")
    breaker.failure("u2", "HTTP 503")
    breaker.success()
    assert (breaker.failures, breaker.users) == (0, set())
    breaker.failure("u1", "HTTP 503")
    breaker.failure("u2", "HTTP 503")
    assert not breaker.is_open and breaker.failures == 2
    breaker.failure("u3", "HTTP 503")
    assert breaker.is_open


def test_a_success_forgets_the_users_who_failed_before_it() -> None:
    # After the success only u2 fails: one poisoned user, so the breaker stays shut.
    breaker = CircuitBreaker(3)
    breaker.failure("u1", "HTTP 503")
    breaker.success()
    for _ in range(3):
        breaker.failure("u2", "HTTP 400")
    assert not breaker.is_open and breaker.users == {"u2"}


def test_a_success_does_not_shut_an_open_breaker() -> None:
    breaker = CircuitBreaker(2)
    breaker.failure("u1", "HTTP 503")
    breaker.failure("u2", "HTTP 503")
    breaker.success()
    assert breaker.is_open and breaker.failures == 2
