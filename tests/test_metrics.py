"""/metrics and `status` beside traits, contact fields and events: counters and gauges, on both stores."""

from __future__ import annotations

import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.daemon.metrics import Metrics
from audiencesync.store import store as store_mod
from audiencesync.store.schema import sync_runs
from audiencesync.store.store import Store
from audiencesync.sync.cycle import Syncer
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_contact_fields import audience, people
from tests.test_daemon import SCHEDULE, SYNC, wait_for
from tests.test_daemon_hardening import InProcess
from tests.test_traits import set_trait

WITH_EVENTS = (
    audience("Paying", "user_id, email, plan").replace("segment = 'a'\"", "segment = 'a'\"\nevents = true")
    + """
[[traits]]
name = "Tier"
source = "main"
query = "SELECT user_id, value FROM traits WHERE name = 'plan'"
"""
)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def refresh_all(config: Config) -> Store:
    """A refresh of every property, no delivery: what a cycle owes Gleap before its calls go out."""
    store = Store(store_mod.engine_for(config.store))
    syncer = Syncer(config, store)
    try:
        for prop in config.properties:
            run = syncer.refresh(prop, "cycle-1")
            syncer.finish(run)
    finally:
        syncer.sources.dispose()
    return store


def test_gauges_count_fields_events_and_traits_pending(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(
        source,
        [
            {"user_id": "u1", "email": "a@x.io", "plan": "pro"},
            {"user_id": "u2", "email": "b@x.io"},
            {"user_id": "u3"},  # a member without fields
        ],
    )
    set_trait(source, {"u1": 10, "u2": "gold"})
    config = make_config(gleap.base_url, audiences=WITH_EVENTS)
    store = refresh_all(config)
    try:
        metrics = Metrics(store.status)
        assert sample(metrics, "audiencesync_pending_changes", audience="paying") == 3
        assert sample(metrics, "audiencesync_pending_field_changes", audience="paying") == 2
        assert sample(metrics, "audiencesync_pending_events", audience="paying") == 3
        assert sample(metrics, "audiencesync_parked_events", audience="paying") == 0
        # A trait is a property like an audience: its pending values have the same gauges, and its kind.
        info = "audiencesync_property_info"
        assert sample(metrics, info, audience="tier", kind="trait", state="live") == 1
        assert sample(metrics, info, audience="paying", kind="audience", state="live") == 1
        assert sample(metrics, "audiencesync_pending_changes", audience="tier") == 2
        assert sample(metrics, "audiencesync_members", audience="tier") == 2
        assert (
            sample(metrics, "audiencesync_pending_field_changes", audience="tier") == 0
        )  # values, not fields
        by_key = {row.key: row for row in store.status()}
        assert (by_key["paying"].fields_pending, by_key["tier"].fields_pending) == (2, 0)
    finally:
        store.engine.dispose()


def test_a_field_change_is_pending_until_acknowledged_and_a_leaver_owes_no_fields(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    rows = [{"user_id": f"u{i}", "email": f"{i}@x.io", "plan": "free"} for i in range(4)]
    people(source, rows)
    config = make_config(gleap.base_url, audiences=audience("Paying", "user_id, email, plan"))
    from tests.test_sync import cycle

    cycle(config)  # everything acknowledged
    rows[0]["plan"] = "pro"  # u0's fields change, u3 leaves
    people(source, rows[:3])
    store = refresh_all(config)
    try:
        (row,) = store.status()
        assert (row.pending, row.fields_pending) == (2, 1)
        assert sample(Metrics(store.status), "audiencesync_pending_field_changes", audience="paying") == 1
    finally:
        store.engine.dispose()
    cycle(config)
    store = Store(store_mod.engine_for(config.store))
    try:
        (row,) = store.status()
        assert (row.pending, row.fields_pending) == (0, 0)
    finally:
        store.engine.dispose()


def test_the_daemon_counts_track_calls_beside_identify_calls(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(source, [{"user_id": f"u{i}", "email": f"{i}@x.io"} for i in range(5)])
    set_trait(source, {"u1": 1})
    config = make_config(gleap.base_url, audiences=WITH_EVENTS, sync=SYNC, extra=SCHEDULE)
    gleap.fail_track_next(1, 503)  # one retried track attempt
    with InProcess(config) as running:
        metrics = running.core.metrics
        wait_for(lambda: len(gleap.events) == 5, what="the five entries posted")
        wait_for(
            lambda: sample(metrics, "audiencesync_track_events_total", status="200") == 5,
            what="the track call counted",
        )
        # One call, unless a refresh lands mid-pass: the events of the users not yet identified
        # then go in the next pass's call. Either way the metric counts what Gleap accepted.
        wait_for(
            lambda: sample(metrics, "audiencesync_track_calls_total", status="200") == len(gleap.track_calls),
            what="every track call Gleap accepted counted",
        )
        assert len(gleap.track_calls) in (1, 2)
        # Five users, one call each, unless the trait's refresh lands mid-pass: then u1's
        # trait value goes in a call of its own. Either way the metric counts what Gleap got.
        wait_for(
            lambda: (
                sample(metrics, "audiencesync_identify_calls_total", status="200")
                == len(gleap.identify_calls)
            ),
            what="every identify call Gleap answered counted",
        )
        assert len(gleap.identify_calls) in (5, 6)
        assert (sample(metrics, "audiencesync_retries_total") or 0) >= 1
        # The gauge reads the store, where the batch's answer is recorded just after it is counted.
        wait_for(
            lambda: sample(metrics, "audiencesync_pending_events", audience="paying") == 0,
            what="no event left pending",
        )
    engine = sa.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            acked = conn.execute(sa.text("SELECT count(*) FROM events WHERE acked_at IS NOT NULL")).scalar()
        assert acked == 5
    finally:
        engine.dispose()


def test_a_run_closed_after_a_later_refresh_keeps_its_own_snapshot_s_members(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """The daemon closes a run when its delivery ends, and the next scheduled refresh may have
    applied its own snapshot by then. The run's summary and row still count the members its
    refresh applied (200 entered from none: 200 members, not the later 182); a held refresh
    counts those the store still holds."""
    source.set([f"u{i:03d}" for i in range(200)])
    config = make_config(gleap.base_url)
    [prop] = config.properties
    store = Store(store_mod.engine_for(config.store))
    syncer = Syncer(config, store)
    try:
        first = syncer.refresh(prop, "cycle-1")
        source.set([f"u{i:03d}" for i in range(20, 202)])
        second = syncer.refresh(prop, "cycle-2")
        syncer.finish(first)
        syncer.finish(second)
        source.set([])  # every member gone: the removal guard holds it
        held = syncer.refresh(prop, "cycle-3")
        syncer.finish(held)
    finally:
        syncer.sources.dispose()
    assert (first.report.members, first.report.entered) == (200, 200)
    assert "members=200 entered=200 " in first.report.summary()
    assert (second.report.members, second.report.entered, second.report.left) == (182, 2, 20)
    assert (held.report.status, held.report.members) == ("held", 182)
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(sync_runs.c.members).order_by(sync_runs.c.id)).scalars().all()
    assert rows == [200, 182, 182]
