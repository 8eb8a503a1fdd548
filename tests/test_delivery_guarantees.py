"""The delivery guarantees (docs/guarantees.md), each pinned by a test that fails when the code breaks it
(issue 19, parts A.2 and D): the unknown mark after a verdict on a retry, the circuit breaker's two rules,
any 2xx acknowledges, no cookies, answers recorded at once, the removal guard at its boundary. Against the
loopback stand-in, on both stores."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync import values
from audiencesync.config.loading import Config
from audiencesync.config.secret import Secret
from audiencesync.delivery.record_batches import RECORD_BATCH, next_batch
from audiencesync.gleap.client import GleapClient
from audiencesync.lifecycle.forget import Forgetter
from audiencesync.store import store as store_mod
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_contact_fields import audience, people
from tests.test_outcomes import KEY, cycle, row
from tests.test_sync import only


def call_log(config: Config, user_id: str) -> list[tuple[bool, int, int, str]]:
    """(value, attempt, status, outcome) of each request for this user, oldest first."""
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT value, attempt, status, outcome FROM call_log WHERE user_id = :u ORDER BY call_id"
            ),
            {"u": user_id},
        ).all()
    engine.dispose()
    return [(bool(r.value), r.attempt, r.status, r.outcome) for r in rows]


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- A.2: a call that may have been applied stays unknown, whatever its retry is answered -------------


@pytest.mark.parametrize("first", ["lose", 500], ids=["answer-lost", "5xx"])
@pytest.mark.parametrize("verdict", [422, 401])
def test_a_verdict_on_the_retry_of_a_call_that_may_have_been_applied_keeps_it_unknown(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, first: str | int, verdict: int
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    assert cycle(config).complete
    # u1 leaves: the false may reach Gleap (applied, the answer lost; or a 5xx), then its retry
    # gets a verdict: a 4xx on the call, or 401 on the token.
    source.set(["u2"])
    gleap.script_next(first, verdict)
    report = cycle(config)
    if first == "lose":
        assert gleap.contacts["u1"][KEY] is False
    marked = row(config, "u1")
    assert marked is not None and marked["unknown"], "the verdict cleared the unknown mark"
    assert only(report).unknown == 1
    # What the audit and the run's counts show: the verdict, two requests, one of them a retry.
    assert marked["last_status"] == verdict and str(verdict) in str(marked["last_error"])
    assert only(report).retries == 1
    # The call log agrees with the store: a request with no verdict, then the verdict.
    assert call_log(config, "u1")[-2:] == [
        (False, 1, 0 if first == "lose" else 500, "unknown"),
        (False, 2, verdict, "rejected"),
    ]
    # u1 comes back: Gleap may hold false, so true goes out again.
    source.set(["u1", "u2"])
    gleap.reset_log()
    report = cycle(config)
    assert report.complete, report.audiences
    assert gleap.identify_calls == [{KEY: True, "userId": "u1"}]
    assert gleap.contacts["u1"][KEY] is True
    settled = row(config, "u1")
    assert settled is not None and not settled["unknown"]


@pytest.mark.parametrize("verdict", [422, 401])
def test_an_event_that_may_have_been_applied_stays_unknown_after_a_verdict_on_its_retry(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, verdict: int
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, extra_gleap="events = true")
    # The identify; then the track call is applied and its answer lost, its retry answered 503,
    # and the retry after that refused.
    gleap.script_next(200, "lose", 503, verdict)
    cycle(config)
    assert [e["userId"] for e in gleap.events] == ["u1"]
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        event = conn.execute(
            sa.text("SELECT unknown, acked_at, last_status, last_error, sends FROM events")
        ).one()
        retries = conn.execute(sa.text("SELECT SUM(retries) FROM sync_runs")).scalar_one()
    engine.dispose()
    assert event.acked_at is None and event.last_status == verdict
    assert event.unknown, "the verdict cleared the event's unknown mark"
    # What the audit and the run's counts show: the refusal, three requests, two of them retries.
    assert str(verdict) in event.last_error and (event.sends, retries) == (3, 2)


# --- D: the circuit breaker's rules --------------------------------------------------------------------


def test_one_user_failing_alone_never_opens_the_breaker(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """ "At least two users": with nobody else to succeed in between, one user's four failures in a row
    (max_retries = 3) are past the threshold of 3 and still don't open it."""
    source.set(["u1"])
    config = make_config(gleap.base_url, extra_gleap="breaker_failures = 3")
    gleap.fail_user("u1", 503, times=None)
    report = cycle(config)
    assert len(gleap.requests) == 4  # the call's whole retry budget: the breaker never stopped it
    assert report.aborted is None and only(report).pending == 1


def test_a_success_in_between_resets_the_breakers_count(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """ "In a row": two users each fail twice then succeed, one after the other (one sender). Four
    failures across two users, never three in a row: the breaker (threshold 3) stays closed."""
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, extra_gleap="breaker_failures = 3")
    config = dataclasses.replace(config, gleap=dataclasses.replace(config.gleap, max_concurrency=1))
    gleap.fail_user("u1", 503, times=2)
    gleap.fail_user("u2", 503, times=2)
    report = cycle(config)
    assert report.aborted is None and report.complete, report.audiences
    assert [r.status for r in gleap.requests] == [503, 503, 200] * 2


# --- D: any 2xx acknowledges; no cookies ---------------------------------------------------------------


def test_any_2xx_acknowledges_an_identify_and_a_deletion(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    gleap.script_next(201, 204)
    report = cycle(config)
    assert report.complete and only(report).sent == 2, report.audiences
    assert sorted(r.status for r in gleap.requests) == [201, 204]
    assert sorted(call_log(config, "u1") + call_log(config, "u2")) == [
        (True, 1, 201, "acknowledged"),
        (True, 1, 204, "acknowledged"),
    ]
    assert not row(config, "u1")["unknown"] and row(config, "u1")["acked"]  # type: ignore[index]
    # A contact deletion answered 204 is done too.
    gleap.script_next(204)
    engine = store_mod.engine_for(config.store)
    try:
        forgetter = Forgetter(engine, client=lambda: GleapClient(config.gleap, Secret(TOKEN)))
        done = forgetter.forget(["u1"], in_gleap=True)
    finally:
        engine.dispose()
    assert done.complete and done.kept == [] and gleap.deleted_contacts == ["u1"]


def test_a_cookie_gleap_sets_is_never_sent_back(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url)
    gleap.set_cookie("session=abc123; Path=/")
    gleap.script_next(503)  # the retry goes out after an answer that set the cookie
    assert cycle(config).complete
    assert [r.status for r in gleap.requests] == [503, 200]
    assert [r.headers.get("cookie") for r in gleap.requests] == [None, None]


# --- D: answers are recorded as they come, not at the end of a batch's wait ------------------------------


def test_an_answer_is_in_the_store_while_the_next_one_is_still_awaited(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """The batch of answers closes ~50 ms after its first answer (RECORD_LINGER): the one answer in
    hand is recorded while the other call waits, held by the stand-in, for as long as it takes."""
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, timeout_seconds=30)
    gleap.hold(after=1)  # the first identify is answered; the second waits for release()
    done = threading.Event()

    def deliver() -> None:
        cycle(config)
        done.set()

    worker = threading.Thread(target=deliver, daemon=True)
    worker.start()
    try:
        assert gleap.wait_held(1), "the second call never arrived"

        def acknowledged() -> bool:
            return any((r := row(config, u)) is not None and r["acked"] for u in ("u1", "u2"))

        # Seconds to spare over 50 ms; far less than a batch that waited for the held answer.
        assert wait_until(acknowledged, 3.0), "the answer in hand was not recorded"
        assert not done.is_set()
    finally:
        gleap.release()
        worker.join(30)
    assert done.is_set()


# --- D: the mass-removal guard at its boundary ----------------------------------------------------------


def test_the_removal_guard_allows_exactly_the_fraction_and_holds_one_more(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    members = [f"u{i}" for i in range(8)]
    source.set(members)
    config = make_config(gleap.base_url, sync='retry_backoff = "0s"\nmax_removal_fraction = 0.25')
    assert cycle(config).complete
    source.set(members[3:])  # 3 of 8 would leave: over 0.25 x 8 = 2
    report = cycle(config)
    assert only(report).status == "held" and "would remove 3 of 8" in (only(report).error or "")
    source.set(members[2:])  # exactly 2 of 8: allowed
    report = cycle(config)
    assert report.complete and only(report).status != "held", only(report).error
    assert sorted(u for u, c in gleap.contacts.items() if c[KEY] is False) == ["u0", "u1"]


def test_answers_are_recorded_in_batches_of_record_batch_until_the_pass_ends() -> None:
    """``next_batch`` as a unit: a full batch at once, a short one when the queue runs dry, and
    the end of the pass (None) with or without answers before it."""

    async def scenario() -> list[tuple[list[Any], bool]]:
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[Any] = asyncio.Queue()
        got = []
        for i in range(RECORD_BATCH + 2):
            answers.put_nowait(i)
        got.append(await next_batch(answers))  # full: no wait for more
        got.append(await next_batch(answers))  # the 2 left, then the linger runs out
        answers.put_nowait("x")
        # Arrives while the batch lingers (the queue was empty): it joins the batch.
        loop.call_soon(answers.put_nowait, "y")
        got.append(await next_batch(answers))
        answers.put_nowait("z")
        answers.put_nowait(None)
        got.append(await next_batch(answers))
        answers.put_nowait(None)
        got.append(await next_batch(answers))
        return got

    got = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert got == [
        (list(range(RECORD_BATCH)), False),
        ([RECORD_BATCH, RECORD_BATCH + 1], False),
        (["x", "y"], False),
        (["z"], True),
        ([], True),
    ]


def test_the_call_log_records_the_value_each_request_of_an_identify_carried(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(source, [{"user_id": "u1", "plan": "pro"}])
    config = make_config(gleap.base_url, audiences=audience("Segment A", "user_id, plan"))
    gleap.fail_next(1, 503)  # two requests: the 503 and its retry, each logged with what it carried
    cycle(config)
    assert gleap.contacts["u1"]["plan"] == "pro"
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        logged = conn.execute(
            sa.text("SELECT attempt, value, data FROM call_log WHERE user_id = 'u1' ORDER BY attempt")
        ).all()
    engine.dispose()
    carried = values.encode({"plan": "pro"})
    assert [(r.attempt, bool(r.value), r.data) for r in logged] == [(1, True, carried), (2, True, carried)]
