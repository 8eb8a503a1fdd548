"""Computed traits end to end: source values -> store -> the loopback Gleap stand-in, on both stores."""

from __future__ import annotations

import signal
import sqlite3
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.errors import ConfigError
from audiencesync.gleap.api import identify_body
from audiencesync.store import store as store_mod
from audiencesync.store.schema import memberships
from audiencesync.store.store import Store
from audiencesync.sync.cycle import CycleReport, PlannedCall, Syncer
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_reliability import resend_bound, resent, start, sync
from tests.test_sync import only

PLAN = """
[[audiences]]
name = "Segment A"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'a'"

[[traits]]
name = "Tier"
source = "main"
query = "SELECT user_id, value FROM traits WHERE name = 'plan'"
"""


def set_trait(source: SourceDB, rows: dict[str, Any], name: str = "plan") -> None:
    with sqlite3.connect(source.path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS traits (name TEXT, user_id TEXT, value)")
        conn.execute("DELETE FROM traits WHERE name = ?", (name,))
        conn.executemany("INSERT INTO traits VALUES (?, ?, ?)", [(name, u, v) for u, v in rows.items()])
    conn.close()


def cycle(config: Config, **kwargs: Any) -> CycleReport:
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01)
    try:
        return syncer.run_cycle(**kwargs)
    finally:
        syncer.sources.dispose()
        engine.dispose()


def trait_config(make_config: ConfigFactory, gleap: GleapStandIn, extra: str = "", **kw: Any) -> Config:
    return make_config(gleap.base_url, audiences=PLAN + extra, **kw)


# --- values -------------------------------------------------------------------------


# The values' one form (values.canonical) is tested in tests/test_values.py.


# --- config ---------------------------------------------------------------------------


def test_trait_keys_may_not_collide_with_an_audience_or_a_contact_field(
    make_config: ConfigFactory, gleap: GleapStandIn
) -> None:
    clash = PLAN.replace('name = "Tier"', 'name = "Tier"\nkey = "segment_a"')
    with pytest.raises(ConfigError, match="already used by audience 'Segment A'"):
        make_config(gleap.base_url, audiences=clash)
    with pytest.raises(ConfigError, match="collides with Gleap's contact field 'plan'"):
        make_config(gleap.base_url, audiences=PLAN.replace('name = "Tier"', 'name = "Tier"\nkey = "plan"'))
    with pytest.raises(ConfigError, match=r"traits\]\] #1 \('Tier'\).missing.*can't be a trait's value"):
        make_config(gleap.base_url, audiences=PLAN + "missing = [1]\n")


def test_traits_are_configured_like_audiences(make_config: ConfigFactory, gleap: GleapStandIn) -> None:
    config = trait_config(make_config, gleap, 'interval = "2h"\nmissing = "none"\nallow_empty = true\n')
    (trait,) = config.traits
    assert (trait.key, trait.kind, trait.interval, trait.missing, trait.allow_empty) == (
        "tier",
        "trait",
        7200,
        '"none"',
        True,
    )
    assert [p.key for p in config.properties] == ["segment_a", "tier"]
    assert config.audience("tier") is trait


# --- sync -----------------------------------------------------------------------------


def test_first_push_then_changes_only_then_a_drop_sends_null(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([])
    set_trait(source, {"u1": "pro", "u2": "free", "u3": 42})
    config = trait_config(make_config, gleap, extra="allow_empty = true\n")
    report = cycle(config)
    assert report.complete, [a.summary() for a in report.audiences]
    assert sorted(gleap.identify_calls, key=lambda b: b["userId"]) == [
        {"tier": "pro", "userId": "u1"},
        {"tier": "free", "userId": "u2"},
        {"tier": 42, "userId": "u3"},
    ]
    plan = only(report, "tier")
    assert (plan.kind, plan.members, plan.entered, plan.sent) == ("trait", 3, 3, 3)
    assert "(initial, trait)" in plan.summary()

    gleap.reset_log()
    assert cycle(config).complete and gleap.identify_calls == []  # nothing changed, nothing sent

    set_trait(source, {"u1": "enterprise", "u2": "free"})  # u1 changes, u3 drops
    report = cycle(config)
    assert report.complete
    assert sorted(gleap.identify_calls, key=lambda b: b["userId"]) == [
        {"tier": "enterprise", "userId": "u1"},
        {"tier": None, "userId": "u3"},
    ]
    plan = only(report, "tier")
    assert (plan.members, plan.entered, plan.left, plan.changed) == (2, 0, 1, 1)
    assert "changed=1" in plan.summary()
    assert gleap.contacts["u3"]["tier"] is None


def test_a_drop_sends_the_missing_value_when_one_is_set(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([])
    set_trait(source, {"u1": "pro", "u2": "free"})
    config = trait_config(make_config, gleap, extra='missing = "none"\n')
    assert cycle(config).complete
    gleap.reset_log()
    set_trait(source, {"u2": "free"})
    assert cycle(config).complete
    assert gleap.identify_calls == [{"tier": "none", "userId": "u1"}]
    # Acknowledged: the row holds nothing more for Gleap.
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        left = conn.execute(sa.select(memberships.c.user_id)).scalars().all()
    engine.dispose()
    assert sorted(left) == ["u2"]


def test_a_trait_change_and_an_audience_change_share_one_call(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u3", "u4"])
    set_trait(source, {"u1": "pro", "u2": "free"})
    config = trait_config(make_config, gleap)
    assert cycle(config).complete
    assert {b["userId"]: b for b in gleap.identify_calls}["u1"] == {
        "segment_a": True,
        "tier": "pro",
        "userId": "u1",
    }
    gleap.reset_log()
    source.set(["u2", "u3", "u4"])
    set_trait(source, {"u1": "enterprise", "u2": "free"})
    report = cycle(config)
    assert report.complete
    assert sorted(gleap.identify_calls, key=lambda b: b["userId"]) == [
        {"segment_a": False, "tier": "enterprise", "userId": "u1"},
        {"segment_a": True, "userId": "u2"},
    ]


def test_numbers_do_not_flap_between_cycles(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([])
    set_trait(source, {"u1": 10, "u2": 10.5, "u3": "10"})
    config = trait_config(make_config, gleap, extra="allow_empty = true\n")
    assert cycle(config).complete
    assert {b["userId"]: b["tier"] for b in gleap.identify_calls} == {"u1": 10, "u2": 10.5, "u3": "10"}
    gleap.reset_log()
    set_trait(source, {"u1": 10.0, "u2": 10.50, "u3": "10"})  # a REAL column now: same numbers
    assert cycle(config).complete
    assert gleap.identify_calls == []


def test_unsupported_values_are_skipped_and_counted(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([])
    set_trait(source, {"u1": b"\x00\x01", "u2": "ok", "u3": None})
    config = trait_config(make_config, gleap, extra="allow_empty = true\n")
    report = cycle(config)
    assert report.complete
    assert gleap.identify_calls == [{"tier": "ok", "userId": "u2"}]
    plan = only(report, "tier")
    assert (plan.members, plan.skipped_values, plan.skipped_rows, plan.duplicate_rows) == (1, 1, 2, 0)
    assert "skipped_values=1 bad_values=['u1': a value of type bytes can't be a trait]" in plan.summary()


def test_the_guard_holds_a_trait_that_suddenly_returns_nothing(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    set_trait(source, {f"u{i}": i for i in range(10)})
    config = trait_config(make_config, gleap)
    assert cycle(config).complete
    gleap.reset_log()
    set_trait(source, {})
    report = cycle(config)
    plan = only(report, "tier")
    assert plan.status == "held" and not report.complete
    assert "would null all 10 users with a value" in (plan.error or "")
    assert "allow_empty = true on the trait" in (plan.error or "")
    assert gleap.identify_calls == []
    report = cycle(config, keys=["tier"], allow_removals=True)
    assert report.complete
    assert len(gleap.identify_calls) == 10 and all(b["tier"] is None for b in gleap.identify_calls)


def test_a_lost_answer_then_a_flip_back_to_the_acknowledged_value_is_still_sent(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([])
    set_trait(source, {"u1": "pro"})
    config = trait_config(make_config, gleap, extra="allow_empty = true\n")
    assert cycle(config).complete
    set_trait(source, {"u1": "free"})
    gleap.lose_answer_next(4)  # Gleap applies "free", every answer is lost
    report = cycle(config)
    assert gleap.contacts["u1"]["tier"] == "free"
    assert only(report, "tier").unknown == 1 and not report.complete
    # Back to what Gleap last acknowledged; but Gleap may hold "free": send "pro".
    set_trait(source, {"u1": "pro"})
    gleap.reset_log()
    report = cycle(config)
    assert report.complete
    assert gleap.identify_calls == [{"tier": "pro", "userId": "u1"}]
    assert gleap.contacts["u1"]["tier"] == "pro"


def test_a_value_changed_while_its_call_was_in_flight_stays_pending(store: Store) -> None:
    audience = store.ensure_audience("tier", "Plan", kind="trait")
    run_id = store.start_run("c", audience, "initial")
    pro: list[tuple[str, str | None]] = [("u1", '"pro"')]
    free: list[tuple[str, str | None]] = [("u1", '"free"')]
    store.refresh(audience, run_id, [pro], full=False, valued=True)
    (sent,) = store.pending_page(audience.id, [audience.id], "", 10)
    assert (sent.kind, sent.value, sent.desired) == ("trait", "pro", True)
    store.refresh(audience, run_id, [free], full=False, valued=True)  # meanwhile
    store.record([store_mod.Outcome((sent,), 200)], {audience.id: run_id})
    (again,) = store.pending_page(audience.id, [audience.id], "", 10)
    assert again.value == "free"  # "pro" was acknowledged, "free" is still owed
    store.record([store_mod.Outcome((again,), 200)], {audience.id: run_id})
    assert store.pending_page(audience.id, [audience.id], "", 10) == []


def test_keys_of_traits_and_audiences_split_at_35_per_call(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    audiences = "".join(
        f'[[audiences]]\nname = "A{i}"\nsource = "main"\nquery = "SELECT user_id FROM members"\n'
        for i in range(20)
    )
    traits = "".join(
        f'[[traits]]\nname = "T{i}"\nsource = "main"\n'
        f"query = \"SELECT user_id, value FROM traits WHERE name = 'plan'\"\n"
        for i in range(20)
    )
    source.set(["u1"])
    set_trait(source, {"u1": "pro"})
    config = make_config(gleap.base_url, audiences=audiences + traits)
    report = cycle(config)
    assert report.complete and report.calls == 2
    bodies = gleap.identify_calls
    assert sorted(len(b) - 1 for b in bodies) == [5, 35]
    merged = {k: v for b in bodies for k, v in b.items()}
    assert merged == {"userId": "u1"} | {f"a{i}": True for i in range(20)} | {
        f"t{i}": "pro" for i in range(20)
    }


def test_the_dry_run_prints_trait_calls_as_they_would_be_sent(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    set_trait(source, {"u1": "pro", "u2": 7})
    config = trait_config(make_config, gleap, extra='missing = "none"\n')
    planned: list[PlannedCall] = []
    cycle(config, dry_run=True, show_calls=lambda calls: planned.extend(calls))
    assert planned == [
        PlannedCall("u1", {"tier": "pro", "segment_a": True}),
        PlannedCall("u2", {"tier": 7}),
    ]
    assert gleap.requests == []
    assert cycle(config).complete
    assert sorted(gleap.identify_calls, key=lambda b: b["userId"]) == [
        identify_body(c.user_id, c.attributes) for c in planned
    ]

    gleap.reset_log()
    set_trait(source, {"u1": "free"})  # u1 changes, u2 drops: missing
    planned.clear()
    cycle(config, dry_run=True, show_calls=lambda calls: planned.extend(calls))
    assert planned == [PlannedCall("u1", {"tier": "free"}), PlannedCall("u2", {"tier": "none"})]
    assert cycle(config).complete
    assert sorted(gleap.identify_calls, key=lambda b: b["userId"]) == [
        identify_body(c.user_id, c.attributes) for c in planned
    ]


def test_the_audit_shows_a_users_trait_values_over_time(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    from audiencesync.store import audit

    source.set([])
    set_trait(source, {"u1": "pro"})
    config = trait_config(make_config, gleap, extra="allow_empty = true\n")
    assert cycle(config).complete
    set_trait(source, {"u1": "free"})
    assert cycle(config).complete
    set_trait(source, {})
    assert cycle(config, allow_removals=True).complete
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        events = [dict(zip(audit.TIMELINE_COLUMNS, e, strict=True)) for e in audit.timeline(conn, "u1")]
        members = list(audit.members(conn, store_id(conn, "tier")))
    engine.dispose()
    assert [(e["event"], e["data"], e["result"]) for e in events] == [
        ("entered", '"pro"', "acknowledged"),
        ("call", '"pro"', "acknowledged"),
        ("changed", '"free"', "acknowledged"),
        ("call", '"free"', "acknowledged"),
        ("left", None, "acknowledged"),
        ("call", None, "acknowledged"),
    ]
    assert members == []


def store_id(conn: sa.Connection, key: str) -> int:
    return int(conn.execute(sa.text("SELECT id FROM audiences WHERE key = :k"), {"k": key}).scalar_one())


# --- crash safety ------------------------------------------------------------------------


def test_sigkill_mid_delivery_of_traits_then_rerun_converges(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([])
    values_now = {f"u{i:04d}": f"v{i % 7}" for i in range(300)}
    set_trait(source, values_now)
    config = trait_config(make_config, gleap, extra="allow_empty = true\n", token=None)
    gleap.hold(after=60)
    process = start(config, "sync", env={"GLEAP_API_TOKEN": TOKEN})
    assert gleap.wait_held(1, timeout=60), "delivery never got past 60 calls"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    bound = resend_bound(config, len(gleap.identify_calls))
    gleap.release()
    gleap.clear_faults()
    rerun = sync(config, env={"GLEAP_API_TOKEN": TOKEN})
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {u: c.get("tier") for u, c in gleap.contacts.items()} == values_now
    assert resent(gleap) <= bound


def test_status_lists_traits_with_their_kind(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    set_trait(source, {"u1": "pro", "u2": "free"})
    config = trait_config(make_config, gleap)
    assert cycle(config).complete
    engine = store_mod.engine_for(config.store)
    rows = {s.key: s for s in Store(engine).status()}
    engine.dispose()
    assert (rows["tier"].kind, rows["tier"].members) == ("trait", 2)
    assert (rows["segment_a"].kind, rows["segment_a"].members) == ("audience", 1)
    assert datetime.now(UTC) >= (rows["tier"].refreshed_at or datetime.max.replace(tzinfo=UTC))


def test_a_rejected_trait_value_is_parked_listed_and_retried(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([])
    set_trait(source, {"u1": "pro", "u2": "free"})
    config = trait_config(
        make_config, gleap, extra="allow_empty = true\n", sync='retry_backoff = "0s"\nmax_attempts = 1'
    )
    gleap.fail_user("u2", 422, body="bad value", times=1)
    report = cycle(config)
    assert only(report, "tier").parked == 1
    engine = store_mod.engine_for(config.store)
    store = Store(engine)
    (parked,) = store.parked("tier")
    assert (parked.audience, parked.user_id, parked.value) == ("tier", "u2", "free")  # the value refused
    assert parked.shown == '"free"'
    assert "bad value" in (parked.last_error or "")
    gleap.reset_log()
    assert cycle(config).complete is False and gleap.identify_calls == []  # parked: not retried
    assert store.requeue("tier") == 1
    engine.dispose()
    assert cycle(config).complete
    assert gleap.identify_calls == [{"tier": "free", "userId": "u2"}]
