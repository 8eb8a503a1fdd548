"""End to end: source DB -> store -> the loopback Gleap stand-in, over real sockets, on both stores."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.delivery.record_batches import RECORD_BATCH, RECORD_WINDOW
from audiencesync.errors import MissingTokenError
from audiencesync.gleap.api import identify_body
from audiencesync.store import store as store_mod
from audiencesync.store.store import Outcome, Store
from audiencesync.sync.cycle import AudienceReport, CycleReport, PlannedCall, Syncer
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn

TWO_AUDIENCES = """
[[audiences]]
name = "Segment A"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'a'"

[[audiences]]
name = "Segment B"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'b'"
"""


def cycle(config: Config, **kwargs: object) -> CycleReport:
    engine = store_mod.create_engine(config.store.url)
    store_mod.upgrade(engine)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01)
    try:
        return syncer.run_cycle(**kwargs)  # type: ignore[arg-type]
    finally:
        syncer.sources.dispose()
        engine.dispose()


def calls(gleap: GleapStandIn) -> dict[str, dict[str, object]]:
    """userId -> body of each acknowledged identify since the last reset."""
    bodies = {}
    for body in gleap.identify_calls:
        assert body["userId"] not in bodies, f"{body['userId']} was sent twice"
        bodies[body["userId"]] = body
    return bodies


def only(report: CycleReport, key: str = "segment_a") -> AudienceReport:
    return next(a for a in report.audiences if a.key == key)


def test_first_sync_pushes_every_member_then_no_change_sends_nothing(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([f"u{i}" for i in range(25)])
    config = make_config(gleap.base_url)
    report = cycle(config)
    assert report.complete
    assert calls(gleap) == {f"u{i}": {"userId": f"u{i}", "segment_a": True} for i in range(25)}
    assert all(r.headers["api-token"] == TOKEN for r in gleap.requests)
    a = only(report)
    assert (a.mode, a.status, a.members, a.entered, a.sent, a.pending) == (
        "initial",
        "succeeded",
        25,
        25,
        25,
        0,
    )

    gleap.reset_log()
    report = cycle(config)
    assert report.complete and gleap.requests == []
    assert only(report).mode == "incremental"


def test_churn_sends_only_the_changed_users_with_the_right_values(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3"])
    config = make_config(gleap.base_url)
    cycle(config)
    source.set(["u2", "u3", "u4"])
    gleap.reset_log()
    report = cycle(config)
    assert calls(gleap) == {
        "u1": {"userId": "u1", "segment_a": False},
        "u4": {"userId": "u4", "segment_a": True},
    }
    assert {k: v["segment_a"] for k, v in gleap.contacts.items()} == {
        "u1": False,
        "u2": True,
        "u3": True,
        "u4": True,
    }
    a = only(report)
    assert (a.members, a.entered, a.left, a.sent) == (3, 1, 1, 2)


def test_one_call_carries_all_of_a_users_audiences(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"], "a")
    source.set(["u2", "u3"], "b")
    report = cycle(make_config(gleap.base_url, audiences=TWO_AUDIENCES))
    assert report.complete and report.calls == 3
    assert calls(gleap)["u2"] == {"userId": "u2", "segment_a": True, "segment_b": True}


def test_a_users_400_does_not_block_the_others_and_is_retried_next_run(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    source.set([f"u{i}" for i in range(10)])
    gleap.fail_user("u3", 400, body='{"message": "invalid userId"}', times=1)
    config = make_config(gleap.base_url)
    report = cycle(config)
    assert not report.complete
    a = only(report)
    assert (a.status, a.sent, a.failed, a.pending) == ("partial", 9, 1, 1)
    assert set(gleap.contacts) == {f"u{i}" for i in range(10)} - {"u3"}
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        error = conn.execute(sa.text("SELECT last_error FROM memberships WHERE user_id = 'u3'")).scalar_one()
    engine.dispose()
    assert "400" in error and "invalid userId" in error

    gleap.reset_log()
    report = cycle(config)
    assert report.complete and list(calls(gleap)) == ["u3"]


def test_transient_faults_are_retried_within_the_run(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([f"u{i}" for i in range(6)])
    gleap.fail_next(1, 429, retry_after="0")
    gleap.fail_next(1, 503)
    gleap.drop_next(1)
    report = cycle(make_config(gleap.base_url))
    assert report.complete and report.retries >= 3
    assert set(gleap.contacts) == {f"u{i}" for i in range(6)}


def test_exhausted_retries_leave_the_change_pending_for_the_next_run(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    gleap.fail_next(4, 500)  # max_retries = 3: four attempts in all
    config = make_config(gleap.base_url)
    report = cycle(config)
    assert not report.complete and only(report).pending == 1
    assert gleap.contacts == {}
    report = cycle(config)
    assert report.complete and set(gleap.contacts) == {"u1"}


def test_slow_answer_times_out_and_is_retried(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    gleap.delay_next(1, 3.0)  # past timeout_seconds = 2
    report = cycle(make_config(gleap.base_url, timeout_seconds=2))
    assert report.complete and report.retries >= 1
    assert set(gleap.contacts) == {"u1"}


def test_401_stops_the_cycle_and_nothing_is_marked_delivered(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([f"u{i}" for i in range(50)])
    gleap.set_token("rotated")
    config = make_config(gleap.base_url)
    report = cycle(config)
    assert report.aborted is not None and "token" in str(report.aborted)
    assert TOKEN not in str(report.aborted)
    a = only(report)
    assert (a.status, a.sent, a.pending) == ("aborted", 0, 50)
    # Stopped at once: far fewer calls than users.
    assert len(gleap.requests) <= config.gleap.max_concurrency
    gleap.set_token(TOKEN)
    report = cycle(config)
    assert report.complete and len(gleap.contacts) == 50


def test_flip_before_delivery_sends_only_the_latest_value(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    cycle(config)
    gleap.set_token("down")  # Gleap refuses everything for a while
    source.set(["u2", "u3"])
    cycle(config)  # u1 -> false and u3 -> true stay pending
    source.set(["u1", "u2"])  # u1 back (Gleap still has true), u3 gone (Gleap never had it)
    gleap.set_token(TOKEN)
    gleap.reset_log()
    report = cycle(config)
    assert report.complete and gleap.identify_calls == []
    assert set(gleap.contacts) == {"u1", "u2"}


def test_null_blank_and_duplicate_ids(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", None, "", "   ", "u1", 42, 42.0, "x" * 300, "bad\nid"])
    report = cycle(make_config(gleap.base_url))
    assert set(calls(gleap)) == {"u1", "42"}
    a = only(report)
    assert (a.members, a.skipped_rows, a.duplicate_rows) == (2, 5, 2)
    assert any("longer than 255" in s for s in a.invalid_samples)


def test_source_failure_is_isolated_and_keeps_the_snapshot(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    broken = TWO_AUDIENCES.replace("segment = 'b'", "segmnt = 'b'")
    source.set(["u1"], "a")
    source.set(["u2"], "b")
    config = make_config(gleap.base_url, audiences=TWO_AUDIENCES)
    cycle(config)
    source.set(["u1", "u5"], "a")
    gleap.reset_log()
    report = cycle(make_config(gleap.base_url, audiences=broken))
    assert not report.complete
    b = only(report, "segment_b")
    assert b.status == "failed" and b.error is not None
    assert "segment_b" in b.error and "'main'" in b.error
    assert list(calls(gleap)) == ["u5"]
    engine = store_mod.create_engine(store_url)
    assert Store(engine).memberships_of("segment_b") == {"u2": (True, True)}
    engine.dispose()


def test_query_without_user_id_column_is_a_clear_error(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    audiences = """
        [[audiences]]
        name = "Segment A"
        source = "main"
        query = "SELECT user_id AS id FROM members"
    """
    report = cycle(make_config(gleap.base_url, audiences=audiences))
    assert "no 'user_id'" in (only(report).error or "")


def test_full_resync_resends_every_member(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    cycle(config)
    gleap.reset_log()
    report = cycle(config, full=True)
    assert report.complete and only(report).mode == "full"
    assert set(calls(gleap)) == {"u1", "u2"}
    gleap.reset_log()
    cycle(config)
    assert gleap.identify_calls == []


def test_audience_selection(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
    source.set(["u1"], "a")
    source.set(["u2"], "b")
    report = cycle(make_config(gleap.base_url, audiences=TWO_AUDIENCES), keys=["segment_b"])
    assert [a.key for a in report.audiences] == ["segment_b"]
    assert list(calls(gleap)) == ["u2"]


def test_dry_run_prints_the_exact_calls_and_changes_nothing(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    cycle(config)
    source.set(["u2", "u3"])

    def snapshot() -> dict[str, list[tuple[object, ...]]]:
        engine = sa.create_engine(store_url)
        with engine.connect() as conn:
            tables = ["audiences", "memberships", "sync_runs", "membership_changes", "calls", "call_values"]
            data = {
                t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY 1, 2"))]
                for t in tables
            }
        engine.dispose()
        return data

    before = snapshot()
    gleap.reset_log()
    planned: list[PlannedCall] = []
    report = cycle(config, dry_run=True, show_calls=planned.extend)
    assert report.complete and report.calls == 2
    assert gleap.requests == []
    assert planned == [PlannedCall("u1", {"segment_a": False}), PlannedCall("u3", {"segment_a": True})]
    assert snapshot() == before
    # ...and the real cycle then makes exactly those calls.
    cycle(config)
    sent = sorted(gleap.identify_calls, key=lambda b: str(b["userId"]))
    assert sent == [identify_body(c.user_id, c.attributes) for c in planned]


def test_dry_run_counts_the_calls_left_unread(make_config: ConfigFactory, source: SourceDB) -> None:
    source.set(["u1", "u2", "u3"])
    seen: list[PlannedCall] = []
    report = cycle(make_config(), dry_run=True, show_calls=lambda calls: seen.append(next(calls)))
    assert len(seen) == 1 and report.calls == 3


def test_dry_run_needs_no_token_but_a_real_run_does(make_config: ConfigFactory, source: SourceDB) -> None:
    source.set(["u1"])
    config = make_config(token=None)
    assert cycle(config, dry_run=True).calls == 1
    with pytest.raises(MissingTokenError):
        cycle(config)


def test_many_members_across_pages(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
    source.set([f"user-{i:05d}" for i in range(1_234)], "a")
    source.set([f"user-{i:05d}" for i in range(0, 1_234, 3)], "b")
    config = make_config(gleap.base_url, audiences=TWO_AUDIENCES)
    report = cycle(config)
    assert report.complete and report.calls == 1_234 and len(gleap.contacts) == 1_234
    assert sum(1 for c in gleap.contacts.values() if c.get("segment_b")) == 412


THREE_AUDIENCES = (
    TWO_AUDIENCES
    + """
[[audiences]]
name = "Segment C"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'c'"
"""
)


def test_a_pass_over_three_overlapping_audiences_calls_each_user_exactly_once(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """No per-user set: a user's due changes in all three go in their one call, whichever
    audience's cursor reaches them first, while calls are still in flight or after they failed."""
    a = [f"u{i:03d}" for i in range(0, 400)]
    b = [f"u{i:03d}" for i in range(100, 600, 2)]
    c = [f"u{i:03d}" for i in range(0, 600, 3)]
    source.set(a, "a")
    source.set(b, "b")
    source.set(c, "c")
    distinct = set(a) | set(b) | set(c)
    config = make_config(gleap.base_url, audiences=THREE_AUDIENCES)  # retry_backoff = "0s"
    gleap.delay_next(60, 0.05)  # calls in flight while the other cursors reach their users
    gleap.fail_user("u102", 400, times=1)  # a verdict: due again at once, but not in this pass
    gleap.fail_user("u300", 503)  # no verdict after the retries: the same
    engine = store_mod.create_engine(config.store.url)
    store_mod.upgrade(engine)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01, page_size=7)  # many turns
    try:
        report = syncer.run_cycle()
    finally:
        syncer.sources.dispose()
        engine.dispose()

    bodies = [r.body for r in gleap.requests if r.path.startswith("/admin/identify")]
    users = Counter(body["userId"] for body in bodies)
    assert set(users) == distinct
    assert report.calls == len(distinct)
    # One call each; u300's is four requests (max_retries = 3).
    assert {u: n for u, n in users.items() if n != 1} == {"u300": 4}
    failed = next(body for body in bodies if body["userId"] == "u102")  # in a, b and c: one call
    assert (failed["segment_a"], failed["segment_b"], failed["segment_c"]) == (True, True, True)
    gleap.clear_faults()
    report = cycle(config)
    assert report.complete and report.calls == 2  # the two failed users, in the next pass


class _HeldRecords(Store):
    """A store whose first record waits until the test lets it go."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(engine)
        self.release = threading.Event()
        self.waiting = threading.Event()
        self.batches: list[int] = []

    def record(self, results: Sequence[Outcome], run_ids: dict[int, int], **kwargs: Any) -> None:
        if not self.batches:
            self.waiting.set()
            assert self.release.wait(60)
        self.batches.append(len(results))
        super().record(results, run_ids, **kwargs)


def test_answers_not_yet_recorded_are_bounded_by_the_record_window(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """While the store records nothing, calls stop at max_concurrency + RECORD_WINDOW: the crash bound."""
    users = [f"u{i:04d}" for i in range(400)]
    source.set(users)
    config = make_config(gleap.base_url)
    bound = config.gleap.max_concurrency + RECORD_WINDOW
    engine = store_mod.create_engine(config.store.url)
    store_mod.upgrade(engine)
    store = _HeldRecords(engine)
    syncer = Syncer(config, store, backoff_initial=0.01)
    result: list[CycleReport] = []
    worker = threading.Thread(target=lambda: result.append(syncer.run_cycle()))
    worker.start()
    try:
        assert store.waiting.wait(60), "no answer came to be recorded"
        deadline = time.monotonic() + 30
        while len(gleap.identify_calls) < bound and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for a call past the bound to show up, were there one
        assert len(gleap.identify_calls) == bound
    finally:
        store.release.set()
        worker.join(60)
        syncer.sources.dispose()
        engine.dispose()
    assert result and result[0].complete and set(gleap.contacts) == set(users)
    assert sum(store.batches) == len(users) and max(store.batches) <= RECORD_BATCH
