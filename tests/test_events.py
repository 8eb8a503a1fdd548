"""Audience Entered / Exited events: made with the refresh, sent after the identify, batched,
split on a 400, re-sent when the outcome is unknown; on both stores, against the stand-in."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.delivery.track import EventSender
from audiencesync.errors import GleapAuthError
from audiencesync.gleap.api import event_date
from audiencesync.gleap.client import Answer, GleapClient, Try
from audiencesync.lifecycle.prune import Pruner
from audiencesync.store import audit, store as store_mod
from audiencesync.store.events import DueEvent, EventOutcome, Outbox
from audiencesync.store.schema import events, sync_runs
from audiencesync.store.store import Store
from audiencesync.sync.cycle import PlannedCall, PlannedTrack, Syncer
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import TRACK_PATH, GleapStandIn, RecordedRequest, track_problem
from tests.test_daemon import SCHEDULE, SYNC, Daemon, daemons, wait_for
from tests.test_sync import cycle, only

__all__ = ["daemons"]  # the daemon tests' fixture, used here too

EVENTS_ON = """
[[audiences]]
name = "Segment A"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'a'"
events = true
"""


def event_rows(config: Config) -> list[dict[str, object]]:
    engine = store_mod.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(events).order_by(events.c.id)).mappings().all()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()


def track_requests(gleap: GleapStandIn) -> list[RecordedRequest]:
    return [r for r in gleap.requests if r.path.startswith("/admin/track")]


def test_entries_and_exits_become_events_after_the_identify(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)
    report = cycle(config)
    assert report.complete, only(report)
    sent = gleap.events
    assert [(e["userId"], e["name"]) for e in sent] == [
        ("u1", "Audience Entered"),
        ("u2", "Audience Entered"),
    ]
    assert sent[0]["data"] == {"audience_key": "segment_a", "audience_name": "Segment A"}
    stored = event_rows(config)
    assert sent[0]["date"] == event_date(stored[0]["at"])  # type: ignore[arg-type]
    assert all(row["acked_at"] is not None and row["sends"] == 1 for row in stored)
    # Every identify came before the track call that carried its events.
    paths = [r.path.split("?")[0] for r in gleap.requests]
    assert paths == ["/admin/identify", "/admin/identify", "/admin/track"]

    gleap.reset_log()
    source.set(["u2", "u3"])
    cycle(config)
    assert sorted((e["userId"], e["name"]) for e in gleap.events) == [
        ("u1", "Audience Exited"),
        ("u3", "Audience Entered"),
    ]
    assert only(cycle(config)).status == "succeeded"


def test_names_and_the_default_come_from_the_settings(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u3"])
    source.set(["u1"], segment="b")
    audiences = """
    [[audiences]]
    name = "Segment A"
    source = "main"
    query = "SELECT user_id FROM members WHERE segment = 'a'"

    [[audiences]]
    name = "Segment B"
    source = "main"
    query = "SELECT user_id FROM members WHERE segment = 'b'"
    events = false
    """
    extra = 'events = true\nentered_event = "Joined"\nexited_event = "Left"'
    config = make_config(gleap.base_url, audiences=audiences, extra_gleap=extra)
    cycle(config)
    assert [(e["userId"], e["name"], e["data"]["audience_key"]) for e in gleap.events] == [
        ("u1", "Joined", "segment_a"),
        ("u3", "Joined", "segment_a"),
    ]
    gleap.reset_log()
    source.set(["u2", "u3"])
    cycle(config)
    assert sorted((e["userId"], e["name"]) for e in gleap.events) == [("u1", "Left"), ("u2", "Joined")]


def test_events_go_in_batches_of_track_batch_size(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    members = [f"u{i}" for i in range(7)]
    source.set(members)
    config = make_config(gleap.base_url, audiences=EVENTS_ON, extra_gleap="track_batch_size = 3")
    report = cycle(config)
    assert [len(batch) for batch in gleap.track_calls] == [3, 3, 1]
    assert [e["userId"] for e in gleap.events] == members
    assert (only(report).events_sent, only(report).events_pending) == (7, 0)
    assert all(r.body == {"events": b} for r, b in zip(track_requests(gleap), gleap.track_calls, strict=True))


def test_an_event_waits_for_its_identify_even_when_the_identify_fails_first(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)
    gleap.fail_user("u1", 503, times=4)  # every try of this cycle: no verdict
    report = cycle(config)
    assert [e["userId"] for e in gleap.events] == ["u2"]
    assert (only(report).events_sent, only(report).events_pending) == (1, 1)

    report = cycle(config)
    assert [e["userId"] for e in gleap.events] == ["u2", "u1"]
    assert only(report).events_pending == 0
    # u1's event came after the identify that set u1's membership.
    order = [
        ("identify", r.body["userId"]) if "identify" in r.path else ("track", r.body["events"][0]["userId"])
        for r in gleap.requests
        if r.status == 200
    ]
    assert order.index(("identify", "u1")) < order.index(("track", "u1"))


def test_a_user_who_enters_and_leaves_before_delivery_gets_both_events_in_order(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)
    gleap.fail_user("u1", 503, times=4)
    cycle(config)
    source.set(["u2"])
    report = cycle(config)
    assert report.complete
    assert [(e["userId"], e["name"]) for e in gleap.events] == [
        ("u2", "Audience Entered"),
        ("u1", "Audience Entered"),
        ("u1", "Audience Exited"),
    ]
    # Gleap may have applied the lost true: the false went out before both events.
    identifies = [r.body for r in gleap.requests if "identify" in r.path and r.status == 200]
    assert identifies[-1] == {"userId": "u1", "segment_a": False}


def test_a_refused_batch_is_split_to_find_the_bad_event(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    members = [f"u{i}" for i in range(1, 6)]
    source.set(members)
    config = make_config(gleap.base_url, audiences=EVENTS_ON, extra="[sync]\nmax_attempts = 2\n")
    gleap.reject_events_of("u3")
    report = cycle(config)
    assert [e["userId"] for e in gleap.events] == ["u1", "u2", "u4", "u5"]
    # 5 -> 400; [u1 u2] ok; [u3 u4 u5] 400; [u3] 400, a verdict; [u4 u5] ok.
    assert [(len(r.body["events"]), r.status) for r in track_requests(gleap)] == [
        (5, 400), (2, 200), (3, 400), (1, 400), (2, 200)
    ]  # fmt: skip
    rows = {row["user_id"]: row for row in event_rows(config)}
    assert rows["u3"]["acked_at"] is None and rows["u3"]["attempts"] == 1
    assert rows["u3"]["last_status"] == 400 and "u3" in str(rows["u3"]["last_error"])
    assert rows["u3"]["sends"] == 3 and not rows["u3"]["unknown"]
    assert rows["u4"]["sends"] == 3 and rows["u1"]["sends"] == 2
    assert (only(report).events_sent, only(report).events_pending) == (4, 1)

    report = cycle(config)  # the second rejection parks it
    assert (only(report).events_pending, only(report).events_parked) == (0, 1)
    engine = store_mod.create_engine(config.store.url)
    with engine.connect() as conn:  # each run counts its events acknowledged and refused (run_history)
        counted = sa.select(sync_runs.c.events_sent, sync_runs.c.events_failed).order_by(sync_runs.c.id)
        assert conn.execute(counted).all() == [(4, 1), (0, 1)]
    store = store_mod.Store(engine)
    (parked,) = store.parked()
    assert (parked.audience, parked.user_id, parked.value, parked.attempts) == (
        "segment_a",
        "u3",
        "Audience Entered",
        2,
    )
    gleap.clear_faults()
    assert store.requeue(user_id="u3") == 1
    engine.dispose()
    report = cycle(config)
    assert gleap.events[-1]["userId"] == "u3" and only(report).events_parked == 0


@pytest.mark.parametrize("fault", ["503", "dropped", "lost answer"])
def test_an_event_batch_without_a_verdict_stays_unknown_and_is_sent_again(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, fault: str
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)  # every fault is answered at once
    if fault == "503":
        gleap.fail_track_next(4, 503)  # the first try and its 3 retries
    elif fault == "dropped":
        gleap.fail_track_next(4, 0)
    else:
        gleap.lose_track_answer_next(4)
    report = cycle(config)
    assert (only(report).events_sent, only(report).events_pending) == (0, 2)
    rows = event_rows(config)
    assert all(row["unknown"] and row["acked_at"] is None and row["sends"] == 4 for row in rows)
    report = cycle(config)
    assert (only(report).events_sent, only(report).events_pending) == (2, 0)
    assert all(not row["unknown"] and row["acked_at"] is not None for row in event_rows(config))
    accepted = [e["userId"] for e in gleap.events]
    assert accepted == (["u1", "u2"] * 5 if fault == "lost answer" else ["u1", "u2"])


@pytest.mark.parametrize("point", ["event-batch:2", "before-event-record:3", "after-event-record:2"])
def test_sigkill_mid_event_batch_then_rerun_converges_within_the_bound(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, point: str
) -> None:
    from tests.test_reliability import sync as sync_process

    members = [f"u{i:03d}" for i in range(200)]
    source.set(members)
    config = make_config(gleap.base_url, token=None, audiences=EVENTS_ON, extra_gleap="track_batch_size = 40")
    token = {"GLEAP_API_TOKEN": TOKEN}
    killed = sync_process(config, env=token | {"AUDIENCESYNC_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(gleap.identify_calls) == 200  # the kill came in the event pass

    rerun = sync_process(config, env=token)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    told = Counter(e["userId"] for e in gleap.events)
    assert set(told) == set(members) and all(e["name"] == "Audience Entered" for e in gleap.events)
    # Only the batch in flight at the kill (sent, its answer not stored) goes out twice.
    assert sum(n - 1 for n in told.values()) <= config.gleap.track_batch_size
    if point.startswith("before-event-record"):
        assert sum(n - 1 for n in told.values()) == 40
    assert all(row["acked_at"] is not None and not row["unknown"] for row in event_rows(config))


def test_prune_deletes_acknowledged_events_and_keeps_the_unsent(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=10)
    source.set(["u1", "u2", "u3"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)
    gleap.reject_events_of("u3")
    engine = store_mod.create_engine(config.store.url)
    syncer = Syncer(config, Store(engine, clock=lambda: long_ago), backoff_initial=0.01)
    try:
        syncer.run_cycle()
    finally:
        syncer.sources.dispose()
    assert [e["userId"] for e in gleap.events] == ["u1", "u2"]

    pruner = Pruner(engine, lambda: datetime.now(UTC), pause_seconds=0)
    # Acknowledged after the cut, or at its very instant: kept (only what Gleap acknowledged
    # before it goes).
    assert pruner.plan(long_ago - timedelta(days=1)).events == 0
    assert pruner.plan(long_ago).events == 0
    cut = datetime.now(UTC) - timedelta(days=5)
    assert pruner.plan(cut).events == 2
    result = pruner.prune(cut, by="cli")
    assert result.finished and result.deleted.events == 2
    assert [(row["user_id"], row["acked_at"]) for row in event_rows(config)] == [("u3", None)]
    assert pruner.last() is not None and pruner.last().events == 2  # type: ignore[union-attr]
    with engine.connect() as conn:  # the run the unsent event came from stays
        run_ids = set(conn.execute(sa.select(sync_runs.c.id)).scalars())
    assert {row["run_id"] for row in event_rows(config)} <= run_ids
    engine.dispose()


def test_the_dry_run_lists_the_track_calls_after_the_identify_calls(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON, extra_gleap="track_batch_size = 2")
    gleap.reject_events_of("u3")
    cycle(config)  # u3's event stays owed
    gleap.clear_faults()
    gleap.reset_log()
    source.set(["u2", "u3", "u4"])
    planned: list[PlannedCall | PlannedTrack] = []
    report = cycle(config, dry_run=True, show_calls=planned.extend)
    assert gleap.requests == [] and report.complete
    identify = [c for c in planned if isinstance(c, PlannedCall)]
    tracks = [c for c in planned if isinstance(c, PlannedTrack)]
    assert planned == identify + tracks  # the events after every identify call
    assert identify == [PlannedCall("u1", {"segment_a": False}), PlannedCall("u4", {"segment_a": True})]
    assert [[(e["userId"], e["name"]) for e in t.events] for t in tracks] == [
        [("u3", "Audience Entered"), ("u1", "Audience Exited")],
        [("u4", "Audience Entered")],
    ]
    assert all(problem is None for t in tracks for problem in [track_problem({"events": t.events})])
    assert (report.calls, report.track_calls, report.events) == (2, 2, 3)

    # Exactly what the sync then sends.
    cycle(config)
    assert [[(e["userId"], e["name"], e["data"]) for e in b] for b in gleap.track_calls] == [
        [(e["userId"], e["name"], e["data"]) for e in t.events] for t in tracks
    ]


def test_audit_user_shows_each_event_with_its_state(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)
    gleap.reject_events_of("u2")
    cycle(config)
    engine = store_mod.create_engine(config.store.url)
    with engine.connect() as conn:
        ok = audit.timeline(conn, "u1")
        refused = audit.timeline(conn, "u2", "segment_a")
    engine.dispose()
    col = {name: i for i, name in enumerate(audit.TIMELINE_COLUMNS)}
    assert [(row[col["event"]], row[col["value"]], row[col["result"]]) for row in ok] == [
        ("entered", True, "acknowledged"),
        ("call", True, "acknowledged"),
        ("track", "Audience Entered", "acknowledged"),
    ]
    track = refused[-1]
    assert tuple(track[col[name]] for name in ("event", "result", "status", "attempt")) == (
        "track",
        "failed",
        400,
        2,  # sent twice (split)
    )
    assert "u2" in track[col["error"]] and track[col["acknowledged_at"]] is None


def test_config_refuses_bad_event_settings(make_config: ConfigFactory) -> None:
    from audiencesync.errors import ConfigError

    config = make_config()
    assert (config.gleap.events, config.gleap.track_batch_size) == (False, 100)
    assert not config.audiences[0].events
    for extra, words in [
        ("track_batch_size = 501", "at most 500"),
        ("track_batch_size = 0", "track_batch_size"),
        ('entered_event = ""', "entered_event"),
        ('exited_event = "Audience Entered"', "different names"),
        ('events = "yes"', "events"),
    ]:
        with pytest.raises(ConfigError) as caught:
            make_config(extra_gleap=extra)
        assert words in str(caught.value), (extra, str(caught.value))


def test_the_daemon_posts_the_events_of_each_cycle(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    first = [f"u{i:02d}" for i in range(30)]
    source.set(first)
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE, audiences=EVENTS_ON)
    daemon = daemons(config)

    def told(name: str) -> set[str]:
        return {e["userId"] for e in gleap.events if e["name"] == name}

    wait_for(lambda: told("Audience Entered") == set(first), what="the first sync's events")
    source.set([*first[5:], "new1"])
    wait_for(lambda: told("Audience Exited") == set(first[:5]), timeout=20, what="the exits")
    wait_for(lambda: "new1" in told("Audience Entered"), what="the entry")
    assert daemon.stop() == 0
    assert len(gleap.events) == 36  # each event once


def test_a_stop_mid_event_batch_cancels_it_after_the_grace_and_the_events_stay_owed(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)
    gleap.reject_events_of("u1")
    gleap.reject_events_of("u2")
    cycle(config)  # identify acknowledged, both events refused once and owed
    gleap.clear_faults()
    gleap.delay_next(1, 60)  # the next request, the track call, hangs
    tracks = gleap.arrivals(TRACK_PATH)

    engine = store_mod.create_engine(config.store.url)
    store = Store(engine)
    syncer = Syncer(config, store, backoff_initial=0.01)
    audience = store.ensure_audience("segment_a", "Segment A")
    run_id = store.start_run("c-stop", audience, "delivery")
    stop = threading.Event()
    done: list[int] = []

    def deliver() -> None:
        deliverer = syncer.deliverer()
        drain = deliverer.drain(
            [audience.id], {audience.id: "segment_a"}, lambda _: run_id, stop=stop, grace_seconds=0.5
        )
        done.append(asyncio.run(drain))

    thread = threading.Thread(target=deliver)
    thread.start()
    # Wait until the batch has reached Gleap, not just until it is marked: the mark is written
    # before the request leaves, and a stop in between sends nothing.
    assert gleap.wait_arrived(TRACK_PATH, tracks + 1), "the event batch never reached Gleap"
    stop.set()
    thread.join(timeout=20)
    assert not thread.is_alive() and done == [0]
    assert gleap.events == []
    # It may have reached Gleap: still marked unknown, still owed.
    assert all(row["unknown"] and row["acked_at"] is None for row in event_rows(config))
    syncer.sources.dispose()
    engine.dispose()

    report = cycle(config)
    assert sorted(e["userId"] for e in gleap.events) == ["u1", "u2"] and only(report).events_pending == 0


# --- EventSender as a unit (seams: the outbox and the client) ------------------------------------


class _Outbox:
    """The outbox's seam: one page of due events, and what the sender does with their marks."""

    def __init__(self, due: list[DueEvent]) -> None:
        self.pages = [due]
        self.marked: list[list[int]] = []
        self.restored: list[list[int]] = []
        self.recorded: list[EventOutcome] = []

    def due(self, audience_ids: object, after: int, limit: int) -> list[DueEvent]:
        return self.pages.pop(0) if self.pages else []

    def mark_unknown(self, batch: list[DueEvent]) -> None:
        self.marked.append([e.id for e in batch])

    def restore_unknown(self, batch: list[DueEvent]) -> None:
        self.restored.append([e.id for e in batch])

    def record(self, outcome: EventOutcome, run_ids: object, **_: object) -> None:
        self.recorded.append(outcome)


class _Client:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer

    async def track(self, bodies: list[dict[str, object]]) -> Answer:
        return self.answer


def _send(outbox: _Outbox, answer: Answer, sender_hook: Callable[[EventSender], None]) -> int:
    sender = EventSender(cast(Outbox, outbox), batch_size=10, max_attempts=3, backoff=(1.0, 60.0))
    sender_hook(sender)
    client = cast(GleapClient, _Client(answer))
    return asyncio.run(sender.send_due(client, [1], lambda _: 1, halted=lambda: False))


def _due(*ids: int) -> list[DueEvent]:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return [DueEvent(i, 1, "gold", f"u{i}", "Audience Entered", "Gold", at) for i in ids]


def test_a_track_call_halted_by_the_breaker_before_it_went_out_gives_the_marks_back() -> None:
    # The breaker opened while the call waited for the limiter: nothing was sent, so nothing is
    # recorded and the events get back the mark they had (not "outcome unknown").
    outbox = _Outbox(_due(1, 2))
    answers: list[tuple[Answer, int]] = []
    halted = Answer(0, "not sent: circuit breaker open", halted=True)
    requests = _send(outbox, halted, lambda s: setattr(s, "on_answer", lambda a, n: answers.append((a, n))))
    assert (requests, outbox.marked, outbox.restored, outbox.recorded, answers) == (
        0,
        [[1, 2]],
        [[1, 2]],
        [],
        [],
    )


def test_every_track_answer_is_told_with_the_number_of_events_it_carried() -> None:
    outbox = _Outbox(_due(1, 2, 3))
    answers: list[tuple[Answer, int]] = []
    ok = Answer(200)
    requests = _send(outbox, ok, lambda s: setattr(s, "on_answer", lambda a, n: answers.append((a, n))))
    assert (requests, answers, outbox.restored) == (1, [(ok, 3)], [])
    assert [(o.status, [e.id for e in o.events]) for o in outbox.recorded] == [(200, [1, 2, 3])]


def test_an_answered_call_is_recorded_as_sent_by_its_last_request() -> None:
    # The call log's sent time is when the request went out, not when the outbox stored the answer.
    went = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    tries = (Try(went, 503, "unknown"), Try(went + timedelta(seconds=3), 200, "acknowledged"))
    outbox = _Outbox(_due(1, 2))
    _send(outbox, Answer(200, retries=1, tries=tries), lambda s: None)
    [outcome] = outbox.recorded
    assert (outcome.status, outcome.sends, outcome.retries, outcome.sent_at) == (200, 2, 1, tries[-1].at)


def test_a_refused_call_that_may_have_been_applied_is_recorded_as_sent_by_its_last_request() -> None:
    # The call log's sent time is when the refused request went out, not when the answer was stored.
    went = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    tries = (Try(went, 0, "unknown", "no answer"), Try(went + timedelta(seconds=7), 401, "rejected"))

    class Refusing:
        async def track(self, bodies: list[dict[str, object]]) -> Answer:
            raise GleapAuthError(401, maybe_applied=True, tries=tries)

    outbox = _Outbox(_due(1, 2))
    sender = EventSender(cast(Outbox, outbox), batch_size=10, max_attempts=3, backoff=(1.0, 60.0))
    with pytest.raises(GleapAuthError):
        asyncio.run(sender.send_due(cast(GleapClient, Refusing()), [1], lambda _: 1, halted=lambda: False))
    [outcome] = outbox.recorded
    assert [e.id for e in outcome.events] == [1, 2] and outcome.unknown
    assert [i for ids in outbox.restored for i in ids] == []  # no mark given back: both may be in Gleap
    assert (outcome.status, outcome.sends, outcome.retries, outcome.sent_at) == (401, 2, 1, tries[-1].at)


class _RefusingU3:
    """Refuses (400) every batch that carries an event of u3."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []

    async def track(self, bodies: list[dict[str, object]]) -> Answer:
        self.batches.append([b["userId"] for b in bodies])
        return Answer(400, "HTTP 400") if any(b["userId"] == "u3" for b in bodies) else Answer(200)


def test_a_split_batch_counts_every_request_it_took(caplog: pytest.LogCaptureFixture) -> None:
    # [1 2 3 4] refused, [1 2] sent, [3 4] refused, [3] refused alone, [4] sent: five requests.
    caplog.set_level("INFO", logger="audiencesync.delivery.track")
    outbox, client = _Outbox(_due(1, 2, 3, 4)), _RefusingU3()
    sender = EventSender(cast(Outbox, outbox), batch_size=10, max_attempts=3, backoff=(1.0, 60.0))
    requests = asyncio.run(sender.send_due(cast(GleapClient, client), [1], lambda _: 1, halted=lambda: False))
    assert client.batches == [["u1", "u2", "u3", "u4"], ["u1", "u2"], ["u3", "u4"], ["u3"], ["u4"]]
    assert requests == 5
    assert [(o.status, [e.id for e in o.events]) for o in outbox.recorded] == [
        (200, [1, 2]),
        (400, [3]),
        (200, [4]),
    ]
    assert [r.getMessage() for r in caplog.records] == [
        "a batch of 4 events was refused (HTTP 400); splitting it",
        "a batch of 2 events was refused (HTTP 400); splitting it",
        "track: 1 event(s) refused: HTTP 400",
    ]


def test_a_half_held_behind_its_users_refused_event_costs_no_request() -> None:
    # [3 3' 3'' 4] refused, [3 3'] refused, [3] refused alone: u3's later events are held, so
    # [3'] is never sent, nor is 3'' beside 4: four requests, not one more for the held half.
    at = datetime(2026, 1, 1, tzinfo=UTC)
    due = [DueEvent(i, 1, "gold", f"u{n}", "Audience Entered", "Gold", at) for i, n in enumerate("3334", 1)]
    outbox, client = _Outbox(due), _RefusingU3()
    sender = EventSender(cast(Outbox, outbox), batch_size=10, max_attempts=3, backoff=(1.0, 60.0))
    requests = asyncio.run(sender.send_due(cast(GleapClient, client), [1], lambda _: 1, halted=lambda: False))
    assert client.batches == [["u3", "u3", "u3", "u4"], ["u3", "u3"], ["u3"], ["u4"]]
    assert requests == 4
    assert outbox.restored == [[2], [3]]  # held: their marks back, still owed
    assert [(o.status, [e.id for e in o.events]) for o in outbox.recorded] == [(400, [1]), (200, [4])]


@pytest.mark.parametrize(
    ("point", "recorded"), [("event-batch", []), ("before-event-record", []), ("after-event-record", [200])]
)
def test_the_event_failpoints_sit_around_the_record(
    monkeypatch: pytest.MonkeyPatch, point: str, recorded: list[int]
) -> None:
    # In-process (raise, not SIGKILL): the crash tests rely on where each named point is reached.
    monkeypatch.setenv("AUDIENCESYNC_FAILPOINT", f"{point}:1:raise")
    outbox = _Outbox(_due(1, 2))
    with pytest.raises(RuntimeError, match=f"failpoint {point} reached"):
        _send(outbox, Answer(200), lambda s: None)
    assert outbox.marked == [[1, 2]] and [o.status for o in outbox.recorded] == recorded


def test_a_pass_reads_page_after_page_and_counts_the_requests_of_all() -> None:
    class Pages(_Outbox):
        def __init__(self) -> None:
            super().__init__([])
            self.pages = [_due(1, 2), _due(3)]
            self.asked: list[int] = []

        def due(self, audience_ids: object, after: int, limit: int) -> list[DueEvent]:
            self.asked.append(after)
            return super().due(audience_ids, after, limit)

    outbox = Pages()
    assert _send(outbox, Answer(200), lambda s: None) == 2
    assert outbox.asked == [0, 2, 3] and outbox.marked == [[1, 2], [3]]
    assert [[e.id for e in o.events] for o in outbox.recorded] == [[1, 2], [3]]
