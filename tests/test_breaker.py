"""The circuit breaker as a unit: where exactly it opens, what it keeps, its half-open form.

The suite's delivery tests only see the breaker open or stay shut somewhere along
thousands of failures; these pin its boundaries, which mutation testing showed
nothing else does (scripts/mutate).
"""

from __future__ import annotations

import asyncio
import time

from audiencesync.gleap.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Trials


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


# --- half-open: the trial calls after an outage (issue 22) --------------------------------------


def _probing(trials: int = 10, rate: float = 0.5, threshold: int = 3) -> tuple[CircuitBreaker, list[str]]:
    changes: list[str] = []
    breaker = CircuitBreaker.probing(
        threshold,
        Trials(trials, rate),
        clock=lambda: 42.0,
        on_change=lambda b: changes.append(b.state),
    )
    return breaker, changes


def _admit(breaker: CircuitBreaker, n: int) -> None:
    async def take() -> None:
        for _ in range(n):
            assert await asyncio.wait_for(breaker.admit(), 1)

    asyncio.run(take())


def test_half_open_lets_out_only_the_trial_calls_the_rest_wait_for_the_verdict() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        breaker, _ = _probing(trials=3)
        for _ in range(3):
            assert await breaker.admit()
        waiting = asyncio.create_task(breaker.admit())
        await asyncio.sleep(0.01)
        held = not waiting.done()  # a 4th request does not go out before the verdict
        breaker.success("u1")
        breaker.success("u2")  # 2 of 3 answered well: at most 1 of 3 may fail (50%), so it closes
        let_through = await asyncio.wait_for(waiting, 5)
        return held, let_through, breaker.state == CLOSED

    assert asyncio.run(scenario()) == (True, True, True)


def test_requests_waiting_when_the_trials_reopen_it_are_not_sent() -> None:
    async def scenario() -> tuple[bool, float | None]:
        breaker, _ = _probing(trials=2, rate=0.0)
        assert await breaker.admit() and await breaker.admit()
        waiting = asyncio.create_task(breaker.admit())
        await asyncio.sleep(0)
        breaker.failure("u1", "HTTP 503")
        breaker.failure("u2", "HTTP 503")  # rate 0: any failure, from two users, reopens it
        return await asyncio.wait_for(waiting, 5), breaker.opened_at

    assert asyncio.run(scenario()) == (False, 42.0)


def test_it_closes_when_at_most_the_rate_of_trials_failed() -> None:
    breaker, changes = _probing()
    _admit(breaker, 10)
    for i in range(5):
        breaker.failure(f"u{i}", "HTTP 500")  # 5 of 10 = 50%: still allowed
        assert breaker.state == HALF_OPEN
    for i in range(4):
        breaker.success(f"v{i}")
        assert breaker.state == HALF_OPEN  # one trial left, which could still make it 6 of 10
    breaker.success("v4")
    assert breaker.state == CLOSED and changes == [CLOSED] and breaker.verdict == (5, 10)


def test_it_reopens_as_soon_as_more_than_the_rate_of_trials_failed() -> None:
    breaker, changes = _probing()
    _admit(breaker, 10)
    breaker.success("v0")
    for i in range(5):
        breaker.failure(f"u{i}", "HTTP 500")
    assert breaker.state == HALF_OPEN
    assert breaker.opened_at is None  # half-open is not open
    breaker.failure("u5", "HTTP 502")  # 6 of 10: certain now, whatever the other 4 answer
    assert breaker.is_open and breaker.opened_at == 42.0 and changes == [OPEN]
    assert breaker.verdict == (6, 7) and breaker.last_error == "HTTP 502"


def test_two_users_failing_are_enough_to_reopen_it_before_every_trial_is_answered() -> None:
    breaker, _ = _probing()
    _admit(breaker, 10)
    for _ in range(3):
        breaker.failure("u1", "HTTP 503")
        breaker.failure("u2", "HTTP 503")
    assert breaker.is_open and breaker.verdict == (6, 6)


def test_it_closes_as_soon_as_the_failures_to_come_could_not_reopen_it() -> None:
    breaker, _ = _probing()
    _admit(breaker, 10)
    for i in range(4):
        breaker.success(f"v{i}")
    assert breaker.state == HALF_OPEN  # 6 unanswered could all fail: 6 of 10
    breaker.success("v4")  # at worst 5 of 10 now
    assert breaker.state == CLOSED and breaker.verdict == (0, 5)


def test_once_closed_the_normal_threshold_rules_at_once() -> None:
    breaker, _ = _probing(threshold=3)
    _admit(breaker, 10)
    breaker.failure("u0", "HTTP 500")
    for i in range(5):
        breaker.success(f"v{i}")
    assert breaker.state == CLOSED
    # The trial's failure is not counted in the run of failures in a row.
    assert (breaker.failures, breaker.users) == (0, set())
    breaker.failure("u1", "HTTP 500")  # one failure no longer ends anything
    breaker.failure("u2", "HTTP 500")
    assert breaker.state == CLOSED
    breaker.success("v9")
    breaker.failure("u1", "HTTP 500")
    breaker.failure("u2", "HTTP 500")
    breaker.failure("u3", "HTTP 500")  # threshold 3 in a row, two users or more: open
    assert breaker.is_open and breaker.verdict is None


def test_one_users_retries_do_not_reopen_it_while_others_were_tried() -> None:
    breaker, _ = _probing()
    _admit(breaker, 10)
    for _ in range(6):
        breaker.failure("poisoned", "HTTP 500")  # more than half of the trials, but one user
    assert breaker.state == HALF_OPEN
    for i in range(4):
        breaker.success(f"v{i}")
    assert breaker.state == CLOSED and breaker.verdict == (6, 10)


def test_a_trial_without_a_verdict_gives_its_place_to_a_waiting_request() -> None:
    breaker, changes = _probing(trials=1)

    async def scenario() -> tuple[bool, int]:
        assert await breaker.admit()
        waiting = asyncio.create_task(breaker.admit())
        await asyncio.sleep(0)
        breaker.void()  # a 429, a refused token, cancelled: no word on Gleap's health
        admitted = await asyncio.wait_for(waiting, 5)
        return admitted and breaker.state == HALF_OPEN and not changes, breaker.admitted

    assert asyncio.run(scenario()) == (True, 1)


def test_a_pass_that_ends_before_every_trial_is_judged_on_those_answered() -> None:
    breaker, _ = _probing()
    _admit(breaker, 3)
    breaker.settle()
    assert breaker.state == HALF_OPEN  # nothing answered: no verdict
    breaker.success("v0")
    breaker.failure("u0", "HTTP 500")
    breaker.settle()  # 1 of 2 failed: 50%
    assert breaker.state == CLOSED and breaker.verdict == (1, 2)

    breaker, _ = _probing()
    _admit(breaker, 3)
    breaker.success("v0")
    breaker.failure("u0", "HTTP 500")
    breaker.failure("u1", "HTTP 500")
    breaker.settle()  # 2 of 3 failed, for two users
    assert breaker.is_open and breaker.verdict == (2, 3)


def test_a_pass_of_a_single_user_failing_reopens_it() -> None:
    # The only user tried: its failures are all the evidence there is.
    breaker, _ = _probing()
    _admit(breaker, 3)
    for _ in range(3):
        breaker.failure("u0", "timed out")
    assert breaker.state == HALF_OPEN  # not before the pass ends: other users may still be tried
    breaker.settle()
    assert breaker.is_open


def test_a_backoff_sleep_ends_when_the_trials_reopen_it() -> None:
    async def scenario() -> bool:
        breaker, _ = _probing(trials=2, rate=0.0)
        assert await breaker.admit()
        sleeper = asyncio.create_task(breaker.sleep(60))
        await asyncio.sleep(0)
        breaker.failure("u1", "HTTP 503")
        breaker.failure("u2", "HTTP 503")
        await asyncio.wait_for(sleeper, 30)
        return breaker.is_open

    assert asyncio.run(scenario())


def test_the_trial_failure_rate_is_exact() -> None:
    # In floats 0.57 * 100 is 56.99999999999999: 57 failures of 100 would reopen it.
    assert not Trials(100, 0.57).too_many(57, 100) and Trials(100, 0.57).too_many(58, 100)
    assert not Trials(10, 0.5).too_many(5, 10) and Trials(10, 0.5).too_many(6, 10)
    assert Trials(10, 0.0).too_many(1, 10) and not Trials(10, 0.0).too_many(0, 10)
