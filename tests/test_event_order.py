"""The order of a user's Audience Entered / Exited events, and what an owed event may wait on.

A user's events in one audience go out in the order they were seen, through split batches
and backoffs; nothing of another audience (paused, removed, a parked identify) holds them
back. On both stores, against the stand-in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from audiencesync.config.loading import Config
from audiencesync.store import database, store as store_mod
from audiencesync.store.events import HELD_BEHIND_PARKED
from audiencesync.store.schema import events
from audiencesync.store.store import Store
from audiencesync.sync.cycle import PlannedCall, PlannedTrack, Syncer
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_events import EVENTS_ON, event_rows, track_requests
from tests.test_sync import cycle, only

TWO_AUDIENCES = """
[[audiences]]
name = "Segment A"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'a'"
events = true
{a_extra}

[[audiences]]
name = "Segment B"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'b'"
events = true
"""

ONLY_B = """
[[audiences]]
name = "Segment B"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'b'"
events = true
"""


IN_AND_OUT = [("u1", "segment_a", "Audience Entered"), ("u1", "segment_a", "Audience Exited")]


def told(gleap: GleapStandIn) -> list[tuple[str, str, str]]:
    """(user, audience key, event name) of every event Gleap accepted, in arrival order."""
    return [(e["userId"], e["data"]["audience_key"], e["name"]) for e in gleap.events]


def planned(config: Config) -> list[PlannedCall | PlannedTrack]:
    calls: list[PlannedCall | PlannedTrack] = []
    cycle(config, dry_run=True, show_calls=calls.extend)
    return calls


def store_for(config: Config) -> Store:
    return Store(store_mod.create_engine(config.store.url))


def test_a_split_batch_holds_a_users_later_event_behind_their_refused_one(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON, extra="[sync]\nmax_attempts = 3\n")
    gleap.fail_user("u1", 503, times=4)  # u1's true: no verdict this cycle, so its event waits
    cycle(config)
    assert told(gleap) == [("u2", "segment_a", "Audience Entered")]
    source.set(["u2"])  # u1 leaves before Gleap acknowledged the true: the false goes, then both events
    gleap.reset_log()
    # [entered, exited] -> 400, split; [entered] -> 400, a verdict; [exited] must not go.
    gleap.fail_track_next(2, 400)
    report = cycle(config)
    assert [(len(r.body["events"]), r.status) for r in track_requests(gleap)] == [(2, 400), (1, 400)]
    assert told(gleap) == []
    rows = {row["name"]: row for row in event_rows(config) if row["user_id"] == "u1"}
    entered, exited = rows["Audience Entered"], rows["Audience Exited"]
    assert (entered["attempts"], entered["sends"], entered["last_status"]) == (1, 2, 400)
    # Held: never sent, so it keeps the mark it had (none) and its attempt budget.
    assert (exited["sends"], exited["attempts"], exited["unknown"]) == (0, 0, False)
    assert only(report).events_pending == 2

    report = cycle(config)  # the refusal passed: both, in order
    assert told(gleap) == IN_AND_OUT
    assert only(report).events_pending == 0


def test_a_split_batch_still_sends_the_other_users_events_beside_a_held_one(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3"])
    extra = "[sync]\nmax_attempts = 3\nmax_removal_fraction = 1.0\n"
    config = make_config(gleap.base_url, audiences=EVENTS_ON, extra=extra)
    gleap.fail_user("u1", 503, times=4)  # u1's true: no verdict this cycle, so its event waits
    cycle(config)
    assert told(gleap) == [("u2", "segment_a", "Audience Entered"), ("u3", "segment_a", "Audience Entered")]
    source.set(["u3"])  # u1 and u2 leave
    gleap.reset_log()
    # [u1 entered, u1 exited, u2 exited] -> 400, split; [u1 entered] -> 400, a verdict;
    # [u1 exited, u2 exited]: u1's is held behind the refused one, u2's goes all the same.
    gleap.fail_track_next(2, 400)
    report = cycle(config)
    assert [(len(r.body["events"]), r.status) for r in track_requests(gleap)] == [
        (3, 400),
        (1, 400),
        (1, 200),
    ]
    assert told(gleap) == [("u2", "segment_a", "Audience Exited")]
    assert only(report).events_pending == 2


def test_a_users_event_waits_while_their_earlier_event_backs_off(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    audiences = EVENTS_ON + "allow_empty = true\n"
    config = make_config(gleap.base_url, audiences=audiences, sync='retry_backoff = "1h"')
    gleap.fail_track_next(4, 503)  # the entry's track call and its retries: no verdict, backoff 1 h
    cycle(config)
    assert told(gleap) == []
    source.set([])
    assert planned(config) == [PlannedCall("u1", {"segment_a": False})]  # and no track call
    report = cycle(config)  # the false is acknowledged; the exit's identify is done, but the entry backs off
    assert gleap.identify_calls[-1] == {"userId": "u1", "segment_a": False}
    assert told(gleap) == [] and only(report).events_pending == 2
    assert planned(config) == []  # the dry run says so too

    later = datetime.now(UTC) + timedelta(hours=2)
    engine = store_mod.create_engine(config.store.url)
    syncer = Syncer(config, Store(engine, clock=lambda: later), backoff_initial=0.01)
    try:
        syncer.run_cycle()
    finally:
        syncer.sources.dispose()
        engine.dispose()
    assert told(gleap) == IN_AND_OUT


def test_a_parked_event_holds_its_users_later_events_of_that_audience_until_retry(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    audiences = EVENTS_ON + "allow_empty = true\n"
    config = make_config(gleap.base_url, audiences=audiences, extra="[sync]\nmax_attempts = 1\n")
    gleap.fail_track_next(1, 400)
    cycle(config)  # the entry refused once: parked
    source.set([])
    report = cycle(config)  # the exit is made parked behind it
    assert told(gleap) == [] and (only(report).events_pending, only(report).events_parked) == (0, 2)
    store = store_for(config)
    # Seen where: the refused event with Gleap's answer, and the one held behind it, with why.
    assert [(p.audience, p.user_id, p.value, p.last_status, p.last_error) for p in store.parked()] == [
        ("segment_a", "u1", "Audience Entered", 400, "HTTP 400"),
        ("segment_a", "u1", "Audience Exited", None, HELD_BEHIND_PARKED),
    ]
    assert store.requeue(audience_key="segment_a") == 2  # any filter of `retry` covers both
    store.engine.dispose()
    # Requeued as new: a full attempt budget, no backoff, nothing parked.
    fresh = (0, 0, None, None)
    rows = event_rows(config)
    assert [(r["attempts"], r["failures"], r["next_attempt_at"], r["parked_at"]) for r in rows] == [fresh] * 2
    report = cycle(config)
    assert told(gleap) == IN_AND_OUT
    assert (only(report).events_pending, only(report).events_parked) == (0, 0)


def test_a_split_batch_parks_a_users_later_event_with_their_refused_one(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON, extra="[sync]\nmax_attempts = 1\n")
    gleap.fail_user("u1", 503, times=4)
    cycle(config)
    source.set(["u2"])
    gleap.fail_track_next(2, 400)  # [entered, exited] -> 400; [entered] -> 400: parked; [exited] held
    report = cycle(config)
    assert told(gleap) == [("u2", "segment_a", "Audience Entered")]
    assert (only(report).events_pending, only(report).events_parked) == (0, 2)
    rows = {row["name"]: row for row in event_rows(config) if row["user_id"] == "u1"}
    assert rows["Audience Exited"]["last_error"] == HELD_BEHIND_PARKED
    assert rows["Audience Exited"]["sends"] == 0
    store = store_for(config)
    assert store.requeue(user_id="u1") == 2
    store.engine.dispose()
    cycle(config)
    assert told(gleap)[1:] == IN_AND_OUT


@pytest.mark.parametrize("how", ["removed", "paused"])
def test_an_owed_event_of_an_audience_not_delivered_holds_back_no_other_audience(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, how: str
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, audiences=TWO_AUDIENCES.format(a_extra=""))
    gleap.fail_track_next(4, 503)  # u1's entry in A: no verdict, owed
    cycle(config)
    assert told(gleap) == []
    assert [(r["user_id"], r["acked_at"]) for r in event_rows(config)] == [("u1", None)]

    audiences = ONLY_B if how == "removed" else TWO_AUDIENCES.format(a_extra="enabled = false")
    config = make_config(gleap.base_url, audiences=audiences)
    source.set(["u1"], segment="b")
    report = cycle(config)
    assert told(gleap) == [("u1", "segment_b", "Audience Entered")]
    assert only(report, "segment_b").events_pending == 0 and report.complete

    # A's event still waits with its audience, and goes out once A is delivered again.
    config = make_config(gleap.base_url, audiences=TWO_AUDIENCES.format(a_extra=""))
    report = cycle(config)
    assert told(gleap)[1:] == [("u1", "segment_a", "Audience Entered")]
    assert report.complete, report


def test_a_parked_identify_in_one_audience_holds_back_no_event_of_another(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(
        gleap.base_url, audiences=TWO_AUDIENCES.format(a_extra=""), extra="[sync]\nmax_attempts = 1\n"
    )
    gleap.fail_user("u1", 400, times=1)  # u1's true in A refused once: parked
    cycle(config)
    assert gleap.identify_calls == [] and told(gleap) == []
    source.set(["u1"], segment="b")
    report = cycle(config)  # B's true alone (A's is parked), acknowledged
    assert gleap.identify_calls == [{"userId": "u1", "segment_b": True}]
    assert told(gleap) == [("u1", "segment_b", "Audience Entered")]
    assert only(report, "segment_b").events_pending == 0
    # A's event waits with its identify, which `failures` lists; `retry` releases both.
    store = store_for(config)
    assert [(p.audience, p.user_id, p.value) for p in store.parked()] == [("segment_a", "u1", True)]
    assert store.requeue(audience_key="segment_a") == 1
    store.engine.dispose()
    report = cycle(config)
    assert gleap.identify_calls[-1] == {"userId": "u1", "segment_a": True}
    assert told(gleap)[1:] == [("u1", "segment_a", "Audience Entered")]
    assert report.complete, report


def test_0011_parks_the_owed_events_an_older_store_left_behind_a_parked_one(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    audiences = EVENTS_ON + "allow_empty = true\n"
    config = make_config(gleap.base_url, audiences=audiences, extra="[sync]\nmax_attempts = 1\n")
    gleap.fail_track_next(1, 400)
    cycle(config)  # the entry parked
    source.set([])
    cycle(config)
    engine = store_mod.create_engine(config.store.url)
    with engine.begin() as conn:  # as a store before 0011 has it: the exit owed, not parked
        conn.execute(sa.update(events).where(events.c.name == "Audience Exited").values(parked_at=None))
        command.downgrade(database._alembic_config(conn), "0010_web")
    store_mod.upgrade(engine)
    store = Store(engine)
    assert [(p.value, p.last_error) for p in store.parked()] == [
        ("Audience Entered", "HTTP 400"),
        ("Audience Exited", HELD_BEHIND_PARKED),
    ]
    assert store.event_counts(store.ensure_audience("segment_a", "Segment A").id) == (0, 2)
    engine.dispose()


def test_a_page_of_only_a_failed_users_events_does_not_end_the_pass_before_the_others(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """Pages of one event: u1's entry is refused, the next page holds only u1's exit (held
    behind it in this pass), and u3's entry on the page after it still goes in the same pass."""
    source.set(["u1"])
    extra = "[sync]\nmax_attempts = 3\nmax_removal_fraction = 1.0\n"
    config = make_config(gleap.base_url, audiences=EVENTS_ON, extra=extra, extra_gleap="track_batch_size = 1")
    gleap.fail_user("u1", 503, times=4)  # u1's true: no verdict this cycle, so its entry waits
    cycle(config)
    assert told(gleap) == []
    source.set(["u3"])  # u1 leaves (its false goes, then both its events), u3 enters
    gleap.reset_log()
    gleap.fail_track_next(1, 400)  # u1's entry, alone on the first page: a verdict
    report = cycle(config)
    assert [r.body["events"][0]["userId"] for r in track_requests(gleap)] == ["u1", "u3"]
    assert told(gleap) == [("u3", "segment_a", "Audience Entered")]
    assert only(report).events_pending == 2  # u1's two, in order next time

    cycle(config)
    assert told(gleap)[1:] == IN_AND_OUT


def test_a_users_event_backing_off_in_one_audience_holds_back_no_event_of_another(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(
        gleap.base_url, audiences=TWO_AUDIENCES.format(a_extra=""), sync='retry_backoff = "1h"'
    )
    gleap.fail_track_next(4, 503)  # u1's entry in A and its retries: no verdict, backing off for 1 h
    cycle(config)
    assert told(gleap) == []
    source.set(["u1"], segment="b")
    report = cycle(config)  # u1's later entry in B is due: it goes now, A's backoff is A's alone
    assert told(gleap) == [("u1", "segment_b", "Audience Entered")]
    assert only(report, "segment_b").events_pending == 0
    assert only(report).events_pending == 1
