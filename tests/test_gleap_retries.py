"""A Gleap call's retries against the stand-in: its waits, the breaker and the limiter, and what
each request of it records (the call log's time, status, outcome and text)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from audiencesync.config.loading import GleapConfig, Secret
from audiencesync.errors import GleapAuthError
from audiencesync.gleap import client as client_mod
from audiencesync.gleap.api import track_event
from audiencesync.gleap.breaker import HALF_OPEN, CircuitBreaker, Trials
from audiencesync.gleap.client import Answer, GleapClient
from audiencesync.gleap.ratelimit import TokenBucket
from tests.conftest import TOKEN
from tests.gleap_standin import GleapStandIn
from tests.test_gleap import identify


class _SleepLog(CircuitBreaker):
    """A breaker whose backoff sleeps are noted and skipped (a unit seam: the HTTP stays real)."""

    def __init__(self, threshold: int = 100) -> None:
        super().__init__(threshold)
        self.slept: list[float] = []
        self.sleeping = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.sleeping.set()


async def _reached(event: asyncio.Event, call: asyncio.Task[Answer]) -> None:
    """Wait until the call sets ``event``. A call that ends first (a bug raising in its retry
    loop) fails the test at once with its error, rather than leaving the test waiting for ever."""
    reached = asyncio.create_task(event.wait())
    await asyncio.wait([reached, call], return_when=asyncio.FIRST_COMPLETED)
    if not reached.done():
        reached.cancel()
        raise AssertionError(f"the call ended before it got there: {call.result()!r}")


def _client(gleap: GleapStandIn, breaker: CircuitBreaker, limiter: TokenBucket | None = None) -> GleapClient:
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=1, max_retries=3)
    return GleapClient(settings, Secret(TOKEN), breaker=breaker, limiter=limiter, backoff_initial=0.01)


@pytest.mark.parametrize("status", [503, 500, 502])
def test_retry_after_on_a_5xx_is_honoured(gleap: GleapStandIn, status: int) -> None:
    """Only the 429 path pauses the shared limiter; a 5xx's Retry-After is the call's own wait."""
    gleap.fail_next(1, status, retry_after="7")
    gleap.fail_next(1, status, retry_after="Thu, 01 Jan 1970 00:00:00 GMT")  # in the past: no wait
    breaker = _SleepLog()

    async def go() -> Answer:
        async with _client(gleap, breaker) as client:
            return await client.identify("u1", {"vip": True})

    answer = asyncio.run(go())
    assert answer.ok and answer.retries == 2
    assert breaker.slept == [7.0, 0.0]


def test_a_retry_the_breaker_stopped_during_its_backoff_is_not_sent(gleap: GleapStandIn) -> None:
    class Backoff(_SleepLog):
        async def sleep(self, seconds: float) -> None:
            await super().sleep(seconds)
            await CircuitBreaker.sleep(self, 60)  # until the breaker opens

    gleap.fail_next(1, 503)
    breaker = Backoff(threshold=2)

    async def go() -> Answer:
        async with _client(gleap, breaker) as client:
            call = asyncio.create_task(client.identify("u1", {"vip": True}))
            await _reached(breaker.sleeping, call)  # the 503 is in; the retry waits
            breaker.failure("u2", "HTTP 503")  # another user's failure opens the breaker
            return await call

    answer = asyncio.run(go())
    assert breaker.is_open and [r.status for r in gleap.requests] == [503]
    # The call ends on its last answer: a 5xx, which may have been applied.
    assert answer.status == 503 and answer.maybe_applied and not answer.halted


def test_a_call_waiting_on_the_limiter_when_the_breaker_opens_is_not_sent(gleap: GleapStandIn) -> None:
    class Gate(TokenBucket):
        def __init__(self) -> None:
            super().__init__(600_000)
            self.waiting = asyncio.Event()
            self.open = asyncio.Event()

        async def acquire(self) -> None:
            self.waiting.set()
            await self.open.wait()

    breaker = CircuitBreaker(1, min_users=1)
    gate = Gate()

    async def go() -> Answer:
        async with _client(gleap, breaker, gate) as client:
            call = asyncio.create_task(client.identify("u1", {"vip": True}))
            await _reached(gate.waiting, call)
            breaker.failure("u2", "HTTP 503")  # Gleap is down for everyone meanwhile
            gate.open.set()
            return await call

    answer = asyncio.run(go())
    assert gleap.requests == []
    assert answer.halted and not answer.maybe_applied and answer.tries == ()
    assert answer.error == "not sent: Gleap is failing for everyone (circuit breaker open)"


def _paced(gleap: GleapStandIn, max_retries: int) -> tuple[GleapClient, list[float]]:
    """A client whose limiter pauses (a 429's) pass on a fake clock; returns the clock too."""
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = TokenBucket(600, clock=lambda: now[0], sleep=sleep)
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=30, max_retries=max_retries)
    return GleapClient(settings, Secret(TOKEN), limiter=limiter, breaker=_SleepLog()), now


def test_429s_do_not_use_up_a_calls_retries(gleap: GleapStandIn) -> None:
    # "Later", not "wrong": three 429s in a row and one retry allowed, and the call still gets through.
    gleap.fail_next(3, 429, retry_after="5")
    client, now = _paced(gleap, max_retries=1)

    async def go() -> Answer:
        async with client:
            return await client.identify("u1", {"vip": True})

    answer = asyncio.run(go())
    assert (answer.status, answer.rate_limited, answer.retries) == (200, 3, 3)
    assert [r.status for r in gleap.requests] == [429, 429, 429, 200] and now[0] >= 15
    # The pause is the shared limiter's alone: the call's own wait adds nothing to it.
    assert isinstance(client.breaker, _SleepLog) and client.breaker.slept == [0.0, 0.0, 0.0]


def test_a_call_refused_after_a_429_may_have_been_applied(gleap: GleapStandIn) -> None:
    # Only a failed connect is certainly not sent: a request answered 429 reached Gleap.
    gleap.script_next(429, 401)
    client, _ = _paced(gleap, max_retries=3)

    async def go() -> Answer:
        async with client:
            return await client.identify("u1", {"vip": True})

    with pytest.raises(GleapAuthError) as info:
        asyncio.run(go())
    assert info.value.maybe_applied and [t.outcome for t in info.value.tries] == ["rate_limited", "rejected"]


def test_a_retry_stopped_by_the_breaker_at_the_limiter_counts_the_attempts_made(gleap: GleapStandIn) -> None:
    class Gate(TokenBucket):
        """Lets the first two requests through; the third waits until the test opens it."""

        def __init__(self) -> None:
            super().__init__(600_000)
            self.calls = 0
            self.waiting = asyncio.Event()
            self.open = asyncio.Event()

        async def acquire(self) -> None:
            self.calls += 1
            if self.calls == 3:
                self.waiting.set()
                await self.open.wait()

    gleap.fail_next(1, 429, retry_after="0")
    gleap.fail_next(1, 503)
    breaker, gate = _SleepLog(threshold=2), Gate()

    async def go() -> Answer:
        async with _client(gleap, breaker, gate) as client:
            call = asyncio.create_task(client.identify("u1", {"vip": True}))
            await _reached(gate.waiting, call)  # a 429, a 503, and the second retry waits on the limiter
            breaker.failure("u2", "HTTP 503")  # another user's failure opens the breaker
            gate.open.set()
            return await call

    answer = asyncio.run(go())
    assert breaker.is_open and [r.status for r in gleap.requests] == [429, 503]
    assert answer.status == 503 and answer.maybe_applied and (answer.rate_limited, answer.retries) == (1, 1)
    assert answer.error is not None and answer.error.startswith(
        "gave up after 2 attempts (circuit breaker open)"
    )


def test_each_request_of_a_call_is_noted_with_its_time_status_outcome_and_text(
    gleap: GleapStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the call log keeps, and what the breaker is told (a 429 is no failure of Gleap's).
    went = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    # The client's own monotonic clock (only its timing of requests reads it): each request
    # takes 2 s by it, read once as it goes out and once as its answer comes.
    ticks = itertools.count(step=2.0)
    monkeypatch.setattr(client_mod, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=30, max_retries=3)
    breaker = _SleepLog()
    gleap.fail_next(1, 503, body="overloaded")
    gleap.fail_next(1, 429, retry_after="0")
    gleap.fail_next(1, 401)

    async def go() -> None:
        async with GleapClient(settings, Secret(TOKEN), breaker=breaker, now=lambda: went) as client:
            await client.identify("u1", {"vip": True})

    with pytest.raises(GleapAuthError) as info:
        asyncio.run(go())
    tries = info.value.tries
    assert [(t.at, t.status, t.outcome, t.error) for t in tries] == [
        (went, 503, "unknown", "HTTP 503 overloaded"),
        (went, 429, "rate_limited", "HTTP 429"),
        (went, 401, "rejected", "HTTP 401"),
    ]
    assert [t.elapsed_ms for t in tries] == [2000, 2000, 2000]  # in milliseconds
    assert breaker.last_error == "HTTP 503 overloaded" and not breaker.is_open


def test_a_call_with_no_answer_ends_on_status_0_and_says_whether_it_left(gleap: GleapStandIn) -> None:
    # Dropped after it was sent: Gleap may have applied it. Never connected: it certainly did not.
    gleap.drop_next(2)
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=30, max_retries=1)

    async def go(config: GleapConfig) -> Answer:
        async with GleapClient(config, Secret(TOKEN), breaker=_SleepLog()) as client:
            return await client.identify("u1", {"vip": True})

    dropped = asyncio.run(go(settings))
    assert (dropped.status, dropped.maybe_applied, dropped.permanent) == (0, True, False)
    assert dropped.error == "gave up after 2 attempts: connection failed (RemoteProtocolError)"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = asyncio.run(
            go(GleapConfig(base_url=f"http://127.0.0.1:{closed.getsockname()[1]}", max_retries=1))
        )
    assert (refused.status, refused.maybe_applied, refused.permanent) == (0, False, False)
    assert refused.error == "gave up after 2 attempts: cannot connect (ConnectError)"
    assert [t.outcome for t in refused.tries] == ["not_sent", "not_sent"]


def test_a_refusal_quotes_at_most_500_characters_of_gleaps_answer(gleap: GleapStandIn) -> None:
    gleap.fail_user("u1", 422, body="x" * 600)
    answer, _ = identify(gleap)
    assert answer.error == "HTTP 422: " + "x" * 500


def test_a_call_with_no_answer_in_time_ends_on_status_0_and_may_have_been_applied(
    gleap: GleapStandIn,
) -> None:
    gleap.delay_next(1, 5.0)  # far past the client's 0.2 s; the stand-in stops waiting when it stops
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=0.2, max_retries=0)

    async def go() -> Answer:
        async with GleapClient(settings, Secret(TOKEN), breaker=_SleepLog()) as client:
            return await client.identify("u1", {"vip": True})

    answer = asyncio.run(go())
    assert (answer.status, answer.maybe_applied, answer.permanent) == (0, True, False)
    assert answer.error == "gave up after 1 attempts: no answer within 0.2 s"


def test_a_call_that_gives_up_counts_its_429s_among_its_attempts(gleap: GleapStandIn) -> None:
    # 429s don't use up the call's retries, but they are attempts: the message counts every request.
    gleap.fail_next(2, 429, retry_after="0")
    gleap.fail_next(4, 503)
    breaker = _SleepLog()

    async def go() -> Answer:
        async with _client(gleap, breaker) as client:  # max_retries=3
            return await client.identify("u1", {"vip": True})

    answer = asyncio.run(go())
    sent = len(gleap.requests)
    assert sent == 6
    assert answer.error is not None and answer.error.startswith("gave up after 6 attempts: ")


def test_failed_track_calls_of_two_users_open_the_breaker(gleap: GleapStandIn) -> None:
    # A track call counts for its first event's user, so Gleap failing the events of two users
    # opens the breaker as identify calls would (one user's failures alone would not).
    gleap.fail_track_next(2, 503)
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=1, max_retries=0)
    breaker = _SleepLog(threshold=2)
    at = datetime(2026, 1, 1, tzinfo=UTC)

    async def go() -> list[Answer]:
        async with GleapClient(settings, Secret(TOKEN), breaker=breaker) as client:
            return [await client.track([track_event(u, "Audience Entered", at, {})]) for u in ("u1", "u2")]

    assert [a.status for a in asyncio.run(go())] == [503, 503]
    assert breaker.is_open and breaker.users == {"track:u1", "track:u2"}


def test_a_calls_retries_back_off_from_half_a_second_by_default(gleap: GleapStandIn) -> None:
    # Doubling from 0.5 s, each wait plus up to 0.5 s of jitter: what `forget`'s deletions get
    # (a delivery pass hands the client the syncer's own setting, 0.5 s too).
    gleap.fail_next(2, 503)
    breaker = _SleepLog()
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=30, max_retries=3)

    async def go() -> Answer:
        async with GleapClient(settings, Secret(TOKEN), breaker=breaker) as client:
            return await client.identify("u1", {"vip": True})

    assert asyncio.run(go()).ok
    first, second = breaker.slept
    assert 0.5 <= first <= 1.0 and 1.0 <= second <= 1.5


def test_a_trial_request_answered_keeps_its_place_among_the_trials(gleap: GleapStandIn) -> None:
    # Half-open, a request that got a verdict on Gleap's health (a failure or a success) is one
    # of the trials for good; only one with no verdict (a 429, never sent) gives its place back.
    # Otherwise a probe would let out more than its trial calls.
    gleap.fail_next(1, 503)
    breaker = CircuitBreaker.probing(3, Trials(calls=4, failure_rate=0.5))
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=30, max_retries=0)

    async def go() -> list[int]:
        async with GleapClient(settings, Secret(TOKEN), breaker=breaker) as client:
            return [(await client.identify(u, {"vip": True})).status for u in ("u1", "u2")]

    assert asyncio.run(go()) == [503, 200]
    assert breaker.state == HALF_OPEN and breaker.admitted == 2  # undecided: 1 of 2 failed
