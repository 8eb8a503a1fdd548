"""The Gleap client against the loopback stand-in, and its pure helpers."""

from __future__ import annotations

import asyncio
import bisect
import socket
import time
from datetime import UTC, datetime

import httpx
import pytest

from audiencesync.config.loading import GleapConfig, Secret
from audiencesync.errors import GleapAuthError, GleapError
from audiencesync.gleap.api import MAX_CUSTOM_KEYS, event_date, identify_body, identify_url, track_event
from audiencesync.gleap.client import Answer, GleapClient
from audiencesync.gleap.http import parse_retry_after, retryable
from audiencesync.gleap.ratelimit import LATENESS_SECONDS, TokenBucket
from tests.conftest import TOKEN
from tests.gleap_standin import GleapStandIn


def identify(gleap: GleapStandIn, user_id: str = "u1", **config: object) -> tuple[Answer, int]:
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=30, max_retries=3, **config)  # type: ignore[arg-type]

    async def go() -> tuple[Answer, int]:
        async with GleapClient(settings, Secret(TOKEN), backoff_initial=0.01) as client:
            answer = await client.identify(user_id, {"vip": True})
            return answer, answer.retries

    return asyncio.run(go())


def test_identify_sends_the_token_and_the_body(gleap: GleapStandIn) -> None:
    answer, retries = identify(gleap)
    assert answer.ok and retries == 0
    [request] = gleap.requests
    assert request.method == "POST" and request.path == "/admin/identify?preventLastActivityUpdate=true"
    assert request.headers["api-token"] == TOKEN
    assert request.body == {"vip": True, "userId": "u1"}


def test_identify_takes_exactly_gleaps_limit_of_custom_keys_and_refuses_one_more(gleap: GleapStandIn) -> None:
    # The planner splits a user's attributes into calls of at most MAX_CUSTOM_KEYS; one that
    # carries exactly that many goes out (the stand-in enforces Gleap's limit too).
    settings = GleapConfig(base_url=gleap.base_url, timeout_seconds=30, max_retries=3)
    full = {f"k{i:02d}": True for i in range(MAX_CUSTOM_KEYS)}

    async def go() -> Answer:
        async with GleapClient(settings, Secret(TOKEN)) as client:
            with pytest.raises(
                ValueError, match=f"36 custom keys in one call; Gleap takes {MAX_CUSTOM_KEYS}"
            ):
                await client.identify("u1", full | {"one_more": True})
            return await client.identify("u1", full)

    assert asyncio.run(go()).ok
    [request] = gleap.requests  # the refused one never went out
    assert len(request.body) == MAX_CUSTOM_KEYS + 1  # and userId


def test_the_client_keeps_a_connection_for_each_call_it_may_have_in_flight(gleap: GleapStandIn) -> None:
    # Its pool is max_concurrency connections, all kept between calls: no call waits for a
    # connection (PoolTimeout), and none is opened anew. httpx's default keeps only 20.
    n = 25
    settings = GleapConfig(
        base_url=gleap.base_url, timeout_seconds=30, max_concurrency=n, requests_per_minute=600_000
    )

    async def burst(client: GleapClient) -> None:
        gleap.hold()  # every call waits at the stand-in until all n are there at once
        calls = [asyncio.create_task(client.identify(f"u{i}", {"vip": True})) for i in range(n)]
        assert await asyncio.to_thread(gleap.wait_held, n, 30), "not every call got a connection"
        gleap.release()
        assert all(answer.ok for answer in await asyncio.gather(*calls))

    async def go() -> None:
        async with GleapClient(settings, Secret(TOKEN)) as client:
            await burst(client)
            await burst(client)

    asyncio.run(go())
    assert len(gleap.identify_calls) == 2 * n and gleap.connections_opened == n


def test_429_is_retried_after_the_pause_it_asks_for(gleap: GleapStandIn) -> None:
    gleap.fail_next(1, 429, retry_after="1")
    started = time.monotonic()
    answer, retries = identify(gleap)
    elapsed = time.monotonic() - started
    assert answer.ok and retries == 1 and elapsed >= 0.9


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_transient_statuses_are_retried(gleap: GleapStandIn, status: int) -> None:
    gleap.fail_next(2, status)
    answer, retries = identify(gleap)
    assert answer.ok and retries == 2


def test_dropped_connection_is_retried(gleap: GleapStandIn) -> None:
    gleap.drop_next(1)
    answer, retries = identify(gleap)
    assert answer.ok and retries == 1


def test_giving_up_reports_the_last_failure(gleap: GleapStandIn) -> None:
    gleap.fail_next(10, 503, body="overloaded")
    answer, retries = identify(gleap)
    assert not answer.ok and answer.status == 503 and retries == 3
    assert answer.error is not None and "gave up after 4 attempts" in answer.error


@pytest.mark.parametrize("status", [400, 404, 422])
def test_permanent_failures_are_returned_with_the_text(gleap: GleapStandIn, status: int) -> None:
    gleap.fail_user("u1", status, body='{"message": "nope"}')
    answer, retries = identify(gleap)
    assert answer.status == status and retries == 0
    assert answer.error == f'HTTP {status}: {{"message": "nope"}}'


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_raise(gleap: GleapStandIn, status: int) -> None:
    if status == 401:
        gleap.set_token("other")
    else:
        gleap.fail_next(1, 403)
    with pytest.raises(GleapAuthError) as info:
        identify(gleap)
    assert info.value.status == status and TOKEN not in str(info.value)


def check_token(base_url: str) -> None:
    settings = GleapConfig(base_url=base_url, timeout_seconds=30, max_retries=0)

    async def go() -> None:
        async with GleapClient(settings, Secret(TOKEN)) as client:
            await client.check_token()

    asyncio.run(go())


def test_check_token_asks_gleap_and_passes_on_a_2xx(gleap: GleapStandIn) -> None:
    check_token(gleap.base_url)
    [request] = gleap.requests
    assert (request.method, request.path, request.headers["api-token"]) == ("GET", "/admin/auth", TOKEN)


@pytest.mark.parametrize("status", [401, 403])
def test_check_token_says_the_token_is_refused_on_401_and_403(gleap: GleapStandIn, status: int) -> None:
    if status == 401:
        gleap.set_token("other")
    else:
        gleap.fail_auth_next(1, 403)
    with pytest.raises(GleapAuthError) as info:
        check_token(gleap.base_url)
    assert info.value.status == status and TOKEN not in str(info.value)


@pytest.mark.parametrize("status", [404, 500])
def test_check_token_names_any_other_status_and_its_text(gleap: GleapStandIn, status: int) -> None:
    # Not a verdict on the token: a plain GleapError that quotes Gleap's answer.
    gleap.fail_auth_next(1, status, body="no such thing")
    with pytest.raises(GleapError) as info:
        check_token(gleap.base_url)
    assert type(info.value) is GleapError
    assert str(info.value) == f"Gleap answered {status} to /admin/auth: no such thing"


def test_check_token_says_how_to_fix_an_unreachable_gleap() -> None:
    # A port bound and not listening refuses the connection, and nobody else can take it meanwhile.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        with pytest.raises(GleapError) as info:
            check_token(base_url)
    assert str(info.value) == (
        f"cannot reach Gleap at {base_url} (ConnectError). Fix: check [gleap] base_url and the network"
    )


def test_identify_url_is_the_base_url_the_path_and_the_query() -> None:
    assert identify_url(GleapConfig(base_url="https://gleap.example")) == (
        "https://gleap.example/admin/identify?preventLastActivityUpdate=true"
    )
    plain = GleapConfig(base_url="https://gleap.example", prevent_last_activity_update=False)
    assert identify_url(plain) == "https://gleap.example/admin/identify"


def test_a_base_url_with_a_path_keeps_it_in_every_call() -> None:
    # An on-premise Gleap (or a proxy) under a path: each call goes below it, with one slash.
    # A transport seam records the URLs (the stand-in serves no prefix).
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={})

    settings = GleapConfig(base_url="https://gleap.example/on-prem", max_retries=0)
    at = datetime(2026, 1, 1, tzinfo=UTC)

    async def go() -> None:
        async with GleapClient(settings, Secret(TOKEN), transport=httpx.MockTransport(answer)) as client:
            await client.check_token()
            assert (await client.identify("u1", {"vip": True})).ok
            assert (await client.track([track_event("u1", "Audience Entered", at, {})])).ok
            assert (await client.delete_contact("u1")).ok

    asyncio.run(go())
    root = "https://gleap.example/on-prem/admin"
    assert seen == [
        f"{root}/auth",
        f"{root}/identify?preventLastActivityUpdate=true",
        f"{root}/track",
        f"{root}/contacts/u1",
    ]


def test_identify_body_keeps_user_id_last_and_authoritative() -> None:
    assert identify_body("u1", {"a": True}) == {"a": True, "userId": "u1"}


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("99999") == 300.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_parse_retry_after_reads_a_date_without_a_zone_as_utc() -> None:
    # RFC 2822's "-0000" zone parses to a naive datetime: it is read as UTC, not refused.
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 -0000", now) == 30.0
    # Without ``now``, the real clock: a date years ahead is capped, one years back is 0.
    assert parse_retry_after("Thu, 01 Jan 2099 12:00:00 GMT") == 300.0
    assert parse_retry_after(" Thu, 01 Jan 2009 12:00:00 GMT ") == 0.0


def test_only_408_429_and_the_5xx_but_501_are_retried() -> None:
    # 600 and up is no 5xx: a status outside HTTP's classes is a verdict, not a passing fault.
    assert [s for s in (399, 400, 407, 408, 429, 499, 500, 501, 599, 600) if retryable(s)] == [
        408,
        429,
        500,
        599,
    ]


def test_token_bucket_paces_and_pauses() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(60, burst=2, clock=lambda: now[0], sleep=sleep)

    async def take(n: int) -> None:
        for _ in range(n):
            await bucket.acquire()

    # 2 from the burst, then one each 61/58 s: the burst is within the minute, spread over one
    # more second for the calls' lateness (LATENESS_SECONDS)
    asyncio.run(take(4))
    assert now[0] == pytest.approx(2 * 61 / 58)
    bucket.pause(5)
    bucket.pause(5)  # a second 429 in the same moment does not add up
    before = now[0]
    asyncio.run(take(1))
    assert now[0] == pytest.approx(before + 5 + 61 / 58)
    assert slept


@pytest.mark.parametrize("late", [False, True])
@pytest.mark.parametrize(("per_minute", "burst"), [(1200, None), (1000, None), (60, 2), (7, None), (1, None)])
def test_no_minute_ever_holds_more_than_the_limit(per_minute: int, burst: int | None, late: bool) -> None:
    # A sliding minute, as Gleap's limit and the stand-in count it; fed from the bucket's
    # first moment (a full burst) for ten minutes of a fake clock. ``late``: a busy client that
    # stalls for LATENESS_SECONDS every 90 s: the calls that took their token in a stall reach
    # the server together at its end, on the heels of the ones before them.
    now = [0.0]

    def arrival(taken: float) -> float:
        into = taken % 90
        return taken - into + LATENESS_SECONDS if late and into < LATENESS_SECONDS else taken

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    bucket = TokenBucket(per_minute, burst=burst, clock=lambda: now[0], sleep=sleep)
    times: list[float] = []

    async def take_for(seconds: float) -> None:
        while now[0] < seconds:
            await bucket.acquire()
            times.append(arrival(now[0]))

    asyncio.run(take_for(600))
    busiest = max(bisect.bisect_left(times, start + 60) - i for i, start in enumerate(times))
    assert busiest <= per_minute
    assert len(times) >= 0.95 * per_minute * 10 or per_minute < 20  # a tiny limit loses its burst


def test_secret_hides_itself() -> None:
    secret = Secret("s3cr3t")
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in str(secret) and "s3cr3t" not in f"{secret}"
    assert secret.reveal() == "s3cr3t"


def test_progress_lines_come_at_least_every_interval(caplog: pytest.LogCaptureFixture) -> None:
    from audiencesync.delivery.progress_log import ProgressLog

    class FakeStore:
        def pending_count(self, audience_ids: object) -> int:
            return 900

    now = [0.0]
    progress = ProgressLog(FakeStore(), [1], lambda: now[0], every=60)  # type: ignore[arg-type]
    caplog.set_level("INFO")
    for _ in range(100):  # 100 answers over 100 s
        now[0] += 1
        progress.sent(1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("delivering:")]
    assert lines == ["delivering: 60 sent, 900 remaining, 1.0 calls/s, ETA 15m00s"]


def test_progress_asks_for_its_audiences_counts_the_rate_and_the_end_of_the_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from audiencesync.delivery.progress_log import ProgressLog

    class Remaining:
        def __init__(self) -> None:
            self.asked: list[object] = []

        def pending_count(self, audience_ids: object) -> int:
            self.asked.append(audience_ids)
            return 30

    store, now = Remaining(), [1000.0]
    progress = ProgressLog(store, [4, 7], lambda: now[0], every=0.25)  # type: ignore[arg-type]
    caplog.set_level("INFO")
    progress.done()  # nothing sent, at once: no line
    now[0] += 0.5
    progress.sent(0)  # past the interval, nothing sent yet: no rate, so no ETA
    now[0] += 0.25
    progress.sent(6)  # 6 in 0.75 s
    progress.sent(2)  # within the interval: counted, no line
    now[0] += 1.25
    progress.done()  # 8 in 2 s
    assert store.asked == [[4, 7], [4, 7]]
    assert [r.getMessage() for r in caplog.records] == [
        "delivering: 0 sent, 30 remaining, 0.0 calls/s, ETA unknown",
        "delivering: 6 sent, 30 remaining, 8.0 calls/s, ETA 0m03s",
        "delivery pass done: 8 sent in 0m02s",
    ]
    caplog.clear()
    quick = ProgressLog(store, [4], lambda: now[0], every=0.25)  # type: ignore[arg-type]
    quick.sent(3)
    quick.done()  # sent, but within the interval: no line either
    idle = ProgressLog(store, [4], lambda: now[0], every=0.25)  # type: ignore[arg-type]
    now[0] += 1
    idle.done()  # long, but nothing sent
    assert caplog.records == []


def test_a_progress_duration_reads_in_minutes_then_in_hours() -> None:
    from audiencesync.delivery.progress_log import _duration

    texts = [_duration(s) for s in (0, 59.9, 61, 3599, 3600, 3725, 7199, 90000, float("inf"))]
    assert texts == ["0m00s", "0m59s", "1m01s", "59m59s", "1h00m", "1h02m", "1h59m", "25h00m", "unknown"]


def test_the_stand_in_answers_no_sooner_than_its_latency() -> None:
    # The benchmark's "50 ms a call" row relies on it; a lower bound, so no clock race.
    with GleapStandIn(TOKEN, latency_seconds=0.2) as slow:
        started = time.monotonic()
        answer, _ = identify(slow)
        elapsed = time.monotonic() - started
    assert answer.ok
    assert elapsed >= 0.2
    assert slow.identify_calls == [{"vip": True, "userId": "u1"}]


def test_an_events_date_is_utc_whatever_the_hosts_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    # A host set to another zone (a server in New York) still sends UTC, marked Z.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        at = datetime(2026, 12, 6, 9, 30, 15, 123456, tzinfo=UTC)
        assert event_date(at) == "2026-12-06T09:30:15.123Z"
    finally:
        monkeypatch.undo()
        time.tzset()
