"""Hardened delivery: unknown outcomes, per-user backoff, retryable statuses, Gleap's documented
limits, the circuit breaker and counts that agree. Against the loopback stand-in, on both stores."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from datetime import datetime, timedelta
from typing import cast

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from audiencesync.alerts import attention
from audiencesync.config.loading import Config
from audiencesync.daemon.metrics import Metrics
from audiencesync.delivery.unknown_marks import UnknownMarks
from audiencesync.gleap.http import retryable
from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import store as store_mod
from audiencesync.store.schema import contact_fields, memberships, sync_runs
from audiencesync.store.store import PendingChange, Store
from audiencesync.sync.cycle import CycleReport, Syncer
from audiencesync.web.app import WebApp
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import cli
from tests.test_reliability import assert_converged, sync
from tests.test_sync import only

KEY = "segment_a"


class Clock:
    """A store clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = store_mod.utc_now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def cycle(config: Config, clock: Clock | None = None, **kwargs: object) -> CycleReport:
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine, clock=clock or store_mod.utc_now), backoff_initial=0.01)
    try:
        return syncer.run_cycle(**kwargs)  # type: ignore[arg-type]
    finally:
        syncer.sources.dispose()
        engine.dispose()


def row(config: Config, user_id: str) -> dict[str, object] | None:
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        found = conn.execute(sa.select(memberships).where(memberships.c.user_id == user_id)).one_or_none()
    engine.dispose()
    return dict(found._mapping) if found is not None else None


def last_run(config: Config) -> dict[str, object]:
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        found = conn.execute(sa.select(sync_runs).order_by(sync_runs.c.id.desc()).limit(1)).one()
    engine.dispose()
    return dict(found._mapping)


# --- A1: unknown outcomes -----------------------------------------------------------


def test_an_acknowledged_calls_contact_fields_are_recorded_as_gleap_holds_them(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """What Gleap holds of each field is what a 2xx acknowledged (`contact_fields`): the next
    change of the field is compared with it; a refused call records nothing."""
    source.set(["u1", "u2"])
    gleap.fail_user("u2", 422, body="nope")
    audiences = """
        [[audiences]]
        name = "Segment A"
        source = "main"
        query = "SELECT user_id, 'pro' AS plan FROM members WHERE segment = 'a'"
    """
    config = make_config(gleap.base_url, audiences=audiences)
    cycle(config)
    assert gleap.contacts["u1"]["plan"] == "pro"
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        c = contact_fields.c
        held = conn.execute(sa.select(c.user_id, c.field, c.value))
        assert [tuple(r) for r in held] == [("u1", "plan", '"pro"')]
    engine.dispose()


def test_lost_answer_then_flip_back_to_the_acknowledged_value_is_still_sent(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    assert cycle(config).complete
    # u1 leaves; Gleap applies the false, but every answer is lost (4 attempts).
    source.set(["u2"])
    gleap.lose_answer_next(4)
    report = cycle(config)
    assert gleap.contacts["u1"][KEY] is False
    assert only(report).unknown == 1 and not report.complete
    # The run counts the call whose outcome it left unknown (audit runs' `unknown`), once.
    assert last_run(config)["unknown"] == 1
    # The source flips back to what Gleap last acknowledged. Gleap may hold false: send true.
    source.set(["u1", "u2"])
    gleap.reset_log()
    report = cycle(config)
    assert report.complete, report.audiences
    assert gleap.identify_calls == [{KEY: True, "userId": "u1"}]
    assert gleap.contacts["u1"][KEY] is True
    settled = row(config, "u1")
    assert settled is not None and not settled["unknown"]


def test_lost_answer_for_a_new_member_who_then_leaves_sends_false(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url)
    assert cycle(config).complete
    source.set(["u1", "n1"])
    gleap.lose_answer_next(4)
    cycle(config)
    assert gleap.contacts["n1"][KEY] is True  # applied, though we never heard so
    source.set(["u1"])  # n1 leaves before any acknowledgement
    gleap.reset_log()
    report = cycle(config)
    assert report.complete
    assert gleap.identify_calls == [{KEY: False, "userId": "n1"}]
    assert row(config, "n1") is None  # acknowledged false: nothing left to keep


def test_a_refused_connection_is_not_an_unknown_outcome(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    down = make_config("http://127.0.0.1:9")  # nothing listens: the request never leaves
    report = cycle(down)
    assert only(report).unknown == 0 and only(report).pending == 1
    source.set([])
    allowed = make_config(gleap.base_url, audiences=_ALLOW_EMPTY)
    report = cycle(allowed)
    assert report.complete and gleap.identify_calls == []  # Gleap never had u1


_ALLOW_EMPTY = """
    [[audiences]]
    name = "Segment A"
    source = "main"
    query = "SELECT user_id FROM members WHERE segment = 'a'"
    allow_empty = true
"""


def test_a_killed_call_stays_unknown_and_the_flip_back_is_sent(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """The write-ahead mark: a crash after the call left, before its answer was stored."""
    source.set(["u1"])
    config = make_config(gleap.base_url, token=None)
    env = {"GLEAP_API_TOKEN": TOKEN}
    assert sync(config, env=env).returncode == 0
    source.set([], "a")
    released = make_config(gleap.base_url, token=None, audiences=_ALLOW_EMPTY)
    # Die just after Gleap's first answer arrives, before it is recorded.
    killed = sync(released, env=env | {"AUDIENCESYNC_FAILPOINT": "before-record:1"})
    assert gleap.contacts["u1"][KEY] is False
    assert killed.returncode != 0
    source.set(["u1"])
    gleap.reset_log()
    assert sync(released, env=env).returncode == 0
    assert gleap.contacts["u1"][KEY] is True


# --- A2: per-user backoff, parking only for verdicts ---------------------------------------


def test_transient_failures_back_off_per_user_and_never_park(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(
        gleap.base_url, sync='max_attempts = 2\nretry_backoff = "1m"\nretry_backoff_max = "4m"'
    )
    clock = Clock()
    gleap.fail_user("u1", 503, times=None)
    cycle(config, clock)
    first = row(config, "u1")
    assert first is not None and first["failures"] == 1 and first["parked_at"] is None
    assert first["next_attempt_at"] == clock.now + timedelta(minutes=1)
    gleap.reset_log()
    cycle(config, clock)  # too early: u1 is not tried again
    assert gleap.requests == []
    delays = []
    for _ in range(5):
        before = row(config, "u1")
        assert before is not None
        clock.now = before["next_attempt_at"]  # type: ignore[assignment]
        cycle(config, clock)
        after = row(config, "u1")
        assert after is not None and after["parked_at"] is None  # 5xx is never a verdict
        delays.append(after["next_attempt_at"] - clock.now)  # type: ignore[operator]
    assert delays == [timedelta(minutes=m) for m in (2, 4, 4, 4, 4)]  # doubling, capped
    gleap.clear_faults()
    clock.advance(240)
    report = cycle(config, clock)
    assert report.complete and gleap.contacts["u1"][KEY] is True


def test_verdicts_park_after_max_attempts_spread_over_time(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, sync='max_attempts = 3\nretry_backoff = "1m"')
    clock = Clock()
    gleap.fail_user("u1", 422, body='{"message": "bad user"}', times=None)
    for expected in (1, 2):
        cycle(config, clock)
        r = row(config, "u1")
        assert r is not None and r["attempts"] == expected and r["parked_at"] is None
        cycle(config, clock)  # within the backoff: not tried, not counted
        assert row(config, "u1")["attempts"] == expected  # type: ignore[index]
        clock.advance(3600)
    cycle(config, clock)
    r = row(config, "u1")
    assert r is not None and r["attempts"] == 3 and r["parked_at"] is not None


@pytest.mark.parametrize(
    ("status", "expected"),
    [(408, True), (429, True), (500, True), (502, True), (520, True), (599, True), (501, False)]
    + [(s, False) for s in (400, 401, 403, 404, 409, 422, 423)],
)
def test_retryable_statuses(status: int, expected: bool) -> None:
    assert retryable(status) is expected


@pytest.mark.parametrize(("status", "verdict"), [(520, False), (501, True), (423, True)])
def test_statuses_beyond_the_usual_five_are_classified(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, status: int, verdict: bool
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url)
    gleap.fail_user("u1", status, times=None)
    cycle(config)
    calls = len(gleap.requests)
    r = row(config, "u1")
    assert r is not None
    assert calls == (1 if verdict else 4)  # a verdict isn't retried; 520 is, up to max_retries
    assert r["attempts"] == (1 if verdict else 0)
    assert bool(r["unknown"]) is (not verdict)  # a 5xx may have been applied


# --- D13 and D14: Gleap's documented behaviour ----------------------------------------------


def test_identify_leaves_last_activity_alone_unless_told(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    cycle(make_config(gleap.base_url))
    assert [r.path for r in gleap.requests] == ["/admin/identify?preventLastActivityUpdate=true"]
    gleap.reset_log()
    source.set(["u1", "u2"])
    cycle(make_config(gleap.base_url, extra_gleap="prevent_last_activity_update = false"))
    assert [r.path for r in gleap.requests if r.body and r.body.get("userId") == "u2"] == ["/admin/identify"]


def test_sixty_audiences_for_one_user_go_in_calls_of_at_most_35_keys(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    audiences = "".join(
        f'\n[[audiences]]\nname = "Segment {i:02d}"\nsource = "main"\n'
        f"query = \"SELECT user_id FROM members WHERE segment = 'a'\"\n"
        for i in range(60)
    )
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=audiences)
    report = cycle(config)
    assert report.complete and report.calls == 4
    sizes = sorted(len(body) - 1 for body in gleap.identify_calls)
    assert sizes == [25, 25, 35, 35]
    assert all(r.status == 200 for r in gleap.requests)  # the stand-in refuses more than 35
    assert gleap.contacts["u1"] == {"userId": "u1", **{f"segment_{i:02d}": True for i in range(60)}}
    # Each call is acknowledged on its own: the second call of u2 failing leaves only its keys pending.
    source.set(["u1"])
    gleap.reset_log()
    gleap.fail_next(1, 400)
    report = cycle(config)
    assert sum(a.pending for a in report.audiences) in (25, 35)


# --- B7: the circuit breaker ----------------------------------------------------------------


def test_gleap_down_for_everyone_ends_the_run_fast_and_loses_nothing(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    members = [f"u{i:05d}" for i in range(2_000)]
    source.set(members)
    config = make_config(gleap.base_url, token=None)
    gleap.fail_next(100_000, 503, body="upstream down")
    started = time.monotonic()
    result = sync(config, env={"GLEAP_API_TOKEN": TOKEN})
    elapsed = time.monotonic() - started
    assert result.returncode == 5, result.stdout + result.stderr
    assert f"Gleap at {gleap.base_url} is failing" in result.stderr and "HTTP 503" in result.stderr
    # One clear error, not a warning per user (only those that gave up before it opened).
    assert result.stderr.count("refused") <= config.gleap.max_concurrency
    # Far fewer attempts than 2,000 users x 4 attempts: it stopped at the breaker.
    assert len(gleap.requests) <= 20 + 4 * config.gleap.max_concurrency
    assert elapsed < 120
    engine = store_mod.engine_for(config.store)
    store = Store(engine)
    status = store.status()[0]
    assert status.pending == 2_000 and status.parked == 0
    assert store.lease_holder() is None  # the lease was released
    engine.dispose()
    gleap.clear_faults()
    later = make_config(gleap.base_url, token=None, sync='retry_backoff = "0s"')
    assert sync(later, env={"GLEAP_API_TOKEN": TOKEN}).returncode == 0
    assert_converged(gleap, members)


def test_one_failing_user_does_not_open_the_breaker(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([f"u{i:03d}" for i in range(50)])
    config = make_config(gleap.base_url, extra_gleap="breaker_failures = 3")
    gleap.fail_user("u000", 503, times=None)
    report = cycle(config)
    assert report.aborted is None and only(report).sent == 49 and only(report).pending == 1


def test_calls_the_open_breaker_stops_count_no_negative_retries(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """A call stopped by the breaker on its first failure made no retry: 0, not -1 (which the
    daemon's /metrics counter refused, turning the outage into a 'delivery failed')."""
    source.set([f"u{i:03d}" for i in range(20)])
    config = make_config(gleap.base_url, extra_gleap="breaker_failures = 2")
    gleap.fail_next(100_000, 503)
    report = cycle(config)
    assert report.aborted is not None
    assert only(report).retries >= 0
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT min(retries) FROM sync_runs")).scalar_one() >= 0
    engine.dispose()


# --- E18: counts that agree ----------------------------------------------------------------


def test_pending_parked_and_unknown_agree_between_the_summary_and_status(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3", "u4"])
    config = make_config(gleap.base_url, sync='max_attempts = 1\nretry_backoff = "0s"')
    gleap.fail_user("u1", 400, times=None)  # parked at once
    gleap.fail_user("u2", 503, times=None)  # pending, outcome unknown
    report = cycle(config)
    a = only(report)
    assert (a.sent, a.pending, a.parked, a.unknown) == (2, 1, 1, 1)
    assert a.status == "partial"
    assert "parked=1" in a.summary() and "unknown=1" in a.summary()
    engine = store_mod.engine_for(config.store)
    [status] = Store(engine).status()
    assert (status.pending, status.parked, status.unknown) == (a.pending, a.parked, a.unknown)
    # The same words and numbers on every surface: `status` (json, csv), /metrics and the web page.
    listing = json.loads(cli(config, "status", "--format", "json").stdout)["audiences"][0]
    counted = (listing["pending"], listing["parked"], listing["unknown"], listing["events_parked"])
    assert counted == (1, 1, 1, 0)
    assert (listing["failed"], listing["events_failed"]) == (1, 0)  # the deprecated aliases
    [csv_row] = csv.DictReader(io.StringIO(cli(config, "status", "--format", "csv").stdout))
    assert (csv_row["pending"], csv_row["parked"], csv_row["unknown"]) == ("1", "1", "1")
    assert "failed" not in csv_row and "events_failed" not in csv_row
    metrics = Metrics(Store(engine).status)
    gauges = {
        name: metrics.registry.get_sample_value(name, {"audience": KEY})
        for name in ("pending_changes", "parked_changes", "unknown_outcome_changes", "parked_events")
        for name in [f"audiencesync_{name}"]
    }
    assert list(gauges.values()) == [1, 1, 1, 0]

    def seen() -> attention.Attention:
        with engine.connect() as conn:
            return attention.read(conn, lifecycle.states(config), store_mod.utc_now())

    app = WebApp(
        engine, token=None, configured=lambda: lifecycle.states(config), health=lambda: (True, "ok"),
        clock=store_mod.utc_now, attention=seen,
    )  # fmt: skip
    overview, page = wsgi_get(app, "/"), wsgi_get(app, f"/audiences/{KEY}")
    engine.dispose()
    cells = re.findall(r'<td class="num[^"]*">(\d+)</td>', overview)
    # members, pending, unknown, the last run's calls not acknowledged (u1 refused, u2 unanswered), parked
    assert cells == ["4", "1", "1", "2", "1"], cells
    assert ">not acked</th>" in overview and ">failed</th>" not in overview
    assert re.search(r'<span class="n">1</span> pending.*<span class="n">1</span> unknown', page, re.S)
    assert '<span class="n bad">1</span> parked' in page
    assert ">failed</th>" not in page


def wsgi_get(app: WebApp, path: str) -> str:
    """A page of the WSGI app, called directly (no server: the test reads what it renders)."""
    answer: list[str] = []
    where, _, query = path.partition("?")
    environ = {"PATH_INFO": where, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    body = app(environ, lambda status, headers: answer.append(status))
    assert answer == ["200 OK"], (path, answer)
    return b"".join(body).decode()


# --- the call log: every request, retries included ----------------------------------------


def test_every_request_is_logged_with_its_attempt_status_outcome_and_keys(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url)
    gleap.fail_next(1, 503, body="busy")
    assert cycle(config).complete
    gleap.fail_user("u2", 422, body="bad user")
    source.set(["u1", "u2", "u3"])
    cycle(config)
    source.set(["u2", "u3"])
    cycle(config)
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        logged = conn.execute(
            sa.text(
                "SELECT user_id, audience_key, value, attempt, status, outcome, error, elapsed_ms "
                "FROM call_log WHERE user_id <> 'u3' ORDER BY user_id, call_id"
            )
        ).all()
        runs = (
            conn.execute(
                sa.text("SELECT run_id FROM call_log WHERE user_id <> 'u3' ORDER BY user_id, call_id")
            )
            .scalars()
            .all()
        )
        run_ids = conn.execute(sa.text("SELECT id FROM sync_runs ORDER BY id")).scalars().all()
    engine.dispose()
    assert [tuple(r[:6]) for r in logged] == [
        ("u1", KEY, True, 1, 503, "unknown"),
        ("u1", KEY, True, 2, 200, "acknowledged"),
        ("u1", KEY, False, 1, 200, "acknowledged"),
        ("u2", KEY, True, 1, 422, "rejected"),
        ("u2", KEY, True, 1, 422, "rejected"),  # the next run tries again
    ]
    assert "busy" in logged[0].error and logged[3].error == "HTTP 422: bad user"
    assert all(r.elapsed_ms is not None and r.elapsed_ms >= 0 for r in logged)
    assert runs == [run_ids[0], run_ids[0], run_ids[2], run_ids[1], run_ids[2]]


def test_the_marks_of_calls_never_sent_are_given_back_at_the_end_of_the_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Marks:
        """The store's seam: what was marked, what was given back."""

        def __init__(self) -> None:
            self.marked: list[list[PendingChange]] = []
            self.restored: list[list[PendingChange]] = []
            self.broken = False

        def mark_unknown(self, changes: list[PendingChange]) -> None:
            self.marked.append(list(changes))

        def restore_unknown(self, changes: list[PendingChange]) -> None:
            if self.broken:
                raise SQLAlchemyError("database is locked")
            self.restored.append(list(changes))

    store = Marks()
    marks = UnknownMarks(cast(Store, store))
    a, b, c = PendingChange(1, "u1", True), PendingChange(1, "u2", True), PendingChange(2, "u1", False)
    marks.mark([a, b, c])
    marks.sent([a, b])  # handed to a sender: the mark stays until the answer is stored
    marks.unsent([b])  # given back by the sender, never sent
    marks.restore()
    marks.restore()  # nothing left open: the store is not asked again
    assert (store.marked, store.restored) == ([[a, b, c]], [[c, b]])
    # The store fails: harmless (they stay pending, marked), so it is logged, not raised.
    store.broken = True
    marks.mark([a, c])
    caplog.set_level("WARNING")
    marks.restore()
    assert [r.getMessage() for r in caplog.records] == [
        "could not clear the marks of 2 unsent call(s): database is locked"
    ]
