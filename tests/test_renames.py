"""Key renames (previous_keys): the config's checks, the store's transition, and the cycles, the
daemon and the dry run that carry it, against the loopback stand-in on both stores.

``rename_and_deliver`` drives the store's part alone (renames.Renames, then one delivery pass
over the property and its retired rows) where a test needs a seam a cycle doesn't give.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.delivery.deliverer import Deliverer
from audiencesync.errors import ConfigError, StoreError
from audiencesync.lifecycle.renames import RenameReport, Renames
from audiencesync.store import store as store_mod
from audiencesync.store.schema import audiences, call_values, membership_changes, memberships
from audiencesync.store.store import Backoff, Store
from audiencesync.sync.cycle import CycleReport, PlannedCall, Syncer
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, Daemon, daemons, wait_for
from tests.test_reliability import resend_bound, resent, start, sync
from tests.test_traits import set_trait

__all__ = ["daemons"]  # the daemon tests' fixture, used here too

OLD = """
[[audiences]]
name = "Segment A"
key = "seg_old"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'a'"
"""

NEW = """
[[audiences]]
name = "Segment A"
key = "seg_new"
previous_keys = ["seg_old"]
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'a'"
"""

TRAIT_OLD = """
[[traits]]
name = "Tier"
key = "tier_old"
source = "main"
query = "SELECT user_id, value FROM traits WHERE name = 'plan'"
"""

TRAIT_NEW = """
[[traits]]
name = "Tier"
key = "tier"
previous_keys = ["tier_old"]
source = "main"
query = "SELECT user_id, value FROM traits WHERE name = 'plan'"
{missing}
"""


@pytest.fixture
def make_config(make_config: ConfigFactory) -> ConfigFactory:
    """The shared factory with a 30 s call timeout: these tests count calls exactly, and on a loaded
    machine an answer slower than the default 2 s is an unknown outcome, sent again (one such run
    counted 3 calls for 2). The tests of lost answers lose them outright, with no timeout needed."""

    def make(*args: Any, **kwargs: Any) -> Config:
        kwargs.setdefault("timeout_seconds", 30)
        return make_config(*args, **kwargs)

    return make


def cycle(config: Config) -> None:
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01)
    try:
        syncer.run_cycle()
    finally:
        syncer.sources.dispose()
        engine.dispose()


def rename_and_deliver(config: Config) -> RenameReport:
    """What a cycle will do for the config's one property: apply its previous_keys, then deliver."""
    (prop,) = config.properties
    engine = store_mod.engine_for(config.store)
    store = Store(engine)
    try:
        report = Renames(engine).apply(prop.key, prop.previous_keys, kind=prop.kind)
        audience = store.ensure_audience(prop.key, prop.name, kind=prop.kind, missing=prop.missing)
        run_id = store.start_run(str(uuid.uuid4()), audience, "delivery")
        ids = [audience.id, *(r.id for r in report.retired)]
        keys = {audience.id: audience.key} | {r.id: r.key for r in report.retired}
        assert config.gleap.api_token is not None
        deliverer = Deliverer(
            store,
            config.gleap,
            config.gleap.api_token,
            max_attempts=config.sync.max_attempts,
            backoff=Backoff(0.0, 0.0),
            backoff_initial=0.01,
        )
        asyncio.run(deliverer.drain(ids, keys, lambda _id: run_id))
        store.finish_run(run_id, "succeeded")
        return report
    finally:
        engine.dispose()


def rows(config: Config, key: str) -> dict[str, tuple[bool, bool | None]]:
    engine = store_mod.engine_for(config.store)
    try:
        return Store(engine).memberships_of(key)
    finally:
        engine.dispose()


def count(config: Config, query: sa.Select[Any]) -> int:
    engine = store_mod.engine_for(config.store)
    try:
        with engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def audience_id(config: Config, key: str) -> int | None:
    engine = store_mod.engine_for(config.store)
    try:
        with engine.connect() as conn:
            found = conn.execute(sa.select(audiences.c.id).where(audiences.c.key == key)).scalar()
            return None if found is None else int(found)
    finally:
        engine.dispose()


# --- audiences ------------------------------------------------------------------------------------


def test_rename_sends_old_false_and_new_true_in_one_call_once(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3"])
    cycle(make_config(gleap.base_url, audiences=OLD))
    source.set(["u1", "u2"])  # u3 left: Gleap holds seg_old false for them
    cycle(make_config(gleap.base_url, audiences=OLD))
    old_id = audience_id(make_config(gleap.base_url, audiences=OLD), "seg_old")
    gleap.reset_log()

    config = make_config(gleap.base_url, audiences=NEW)
    report = rename_and_deliver(config)

    assert report.renamed_from == "seg_old"
    calls = sorted(gleap.identify_calls, key=lambda body: body["userId"])
    assert calls == [
        {"userId": "u1", "seg_old": False, "seg_new": True},
        {"userId": "u2", "seg_old": False, "seg_new": True},
    ]
    # The renamed row is the old one: its history (entries, the calls of seg_old) stays with it.
    assert audience_id(config, "seg_new") == old_id
    assert (
        count(
            config,
            sa.select(sa.func.count())
            .select_from(membership_changes)
            .where(membership_changes.c.audience_id == old_id),
        )
        == 4
    )  # three entered, one left
    # The old key's current state is gone; its retired row stays as the anchor of its calls.
    assert rows(config, "seg_old") == {}
    assert rows(config, "seg_new") == {"u1": (True, True), "u2": (True, True)}
    retired = audience_id(config, "seg_old")
    assert retired is not None and retired != old_id
    engine = store_mod.engine_for(config.store)
    status = {s.key: s for s in Store(engine).status()}
    engine.dispose()
    assert status["seg_old"].name == "seg_new before its rename"
    assert (status["seg_old"].members, status["seg_old"].pending, status["seg_old"].unknown) == (0, 0, 0)
    assert (
        count(
            config,
            sa.select(sa.func.count()).select_from(call_values).where(call_values.c.audience_id == retired),
        )
        == 2
    )

    # Once: the next pass, and a cycle of the renamed audience, send nothing.
    gleap.reset_log()
    again = rename_and_deliver(config)
    assert again.renamed_from is None and again.retired == []
    cycle(config)
    assert gleap.identify_calls == []


def test_a_failed_or_unknown_rename_call_is_sent_again(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    cycle(make_config(gleap.base_url, audiences=OLD))
    gleap.reset_log()
    config = make_config(gleap.base_url, audiences=NEW)
    gleap.fail_user("u1", 400, times=1)  # a verdict: retried after the backoff
    gleap.lose_answer_next(1)  # applied, the answer lost: unknown, sent again
    first = rename_and_deliver(config)
    assert first.renamed_from == "seg_old"
    owed = rows(config, "seg_old")
    assert owed, "a call without a 2xx leaves the old key owed"

    gleap.reset_log()
    second = rename_and_deliver(config)
    assert second.renamed_from is None
    assert [r.key for r in second.retired] == ["seg_old"]
    assert sorted(gleap.identify_calls, key=lambda b: b["userId"]) == [
        {"userId": u, "seg_old": False, "seg_new": True} for u in sorted(owed)
    ]
    assert rows(config, "seg_old") == {}
    for user in ("u1", "u2"):
        assert gleap.contacts[user] | {"userId": "-"} == {"userId": "-", "seg_old": False, "seg_new": True}


def test_a_second_rename_rekeys_the_row_with_the_history(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    cycle(make_config(gleap.base_url, audiences=OLD))
    history = audience_id(make_config(gleap.base_url, audiences=OLD), "seg_old")
    config = make_config(gleap.base_url, audiences=NEW)
    rename_and_deliver(config)
    cycle(config)
    gleap.reset_log()

    newer = make_config(
        gleap.base_url,
        audiences=NEW.replace('"seg_new"', '"seg_newer"').replace('["seg_old"]', '["seg_old", "seg_new"]'),
    )
    report = rename_and_deliver(newer)

    assert report.renamed_from == "seg_new"
    assert audience_id(newer, "seg_newer") == history
    assert gleap.identify_calls == [{"userId": "u1", "seg_new": False, "seg_newer": True}]
    assert rows(newer, "seg_old") == rows(newer, "seg_new") == {}


def test_a_previous_key_the_store_never_had_is_a_note(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, audiences=NEW)
    report = rename_and_deliver(config)
    assert report.renamed_from is None and report.retired == []
    assert report.notes == ["previous key 'seg_old': the store never had it, nothing to retire"]
    assert audience_id(config, "seg_old") is None


def test_a_previous_key_of_another_kind_is_refused(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    cycle(make_config(gleap.base_url, audiences=OLD))
    engine = store_mod.engine_for(make_config(gleap.base_url, audiences=OLD).store)
    try:
        with pytest.raises(StoreError, match="a rename keeps a property's kind"):
            Renames(engine).apply("seg_new", ["seg_old"], kind="trait")
        # Nothing was changed.
        with engine.connect() as conn:
            assert conn.execute(sa.select(audiences.c.key)).scalars().all() == ["seg_old"]
    finally:
        engine.dispose()


# --- traits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("missing", "retired"), [("", None), ('missing = "none"', "none")])
def test_trait_rename_sends_null_or_missing_and_the_new_value(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, missing: str, retired: str | None
) -> None:
    set_trait(source, {"u1": "pro", "u2": 7})
    old_config = make_config(gleap.base_url, audiences=TRAIT_OLD + missing)
    cycle(old_config)
    gleap.reset_log()

    config = make_config(gleap.base_url, audiences=TRAIT_NEW.format(missing=missing))
    rename_and_deliver(config)

    assert sorted(gleap.identify_calls, key=lambda b: b["userId"]) == [
        {"userId": "u1", "tier_old": retired, "tier": "pro"},
        {"userId": "u2", "tier_old": retired, "tier": 7},
    ]
    assert rows(config, "tier_old") == {}
    gleap.reset_log()
    cycle(config)
    assert gleap.identify_calls == []


# --- packing --------------------------------------------------------------------------------------


def test_the_old_key_counts_towards_the_35_custom_keys(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    cycle(make_config(gleap.base_url, audiences=OLD))
    engine = store_mod.engine_for(make_config(gleap.base_url, audiences=OLD).store)
    store = Store(engine)
    try:
        # 34 other audiences with u1 pending, as if refreshed in the same cycle.
        others = [store.ensure_audience(f"other_{i:02d}", f"Other {i}") for i in range(34)]
        with engine.begin() as conn:
            conn.execute(
                sa.insert(memberships),
                [
                    {"audience_id": a.id, "user_id": "u1", "desired": True, "changed_at": store.clock()}
                    for a in others
                ],
            )
        report = Renames(engine).apply("seg_new", ["seg_old"])
        audience = store.ensure_audience("seg_new", "Segment A")
        run_id = store.start_run(str(uuid.uuid4()), audience, "delivery")
        ids = [audience.id, *(r.id for r in report.retired), *(a.id for a in others)]
        keys = {audience.id: "seg_new", report.retired[0].id: "seg_old"} | {a.id: a.key for a in others}
        config = make_config(gleap.base_url, audiences=OLD)
        assert config.gleap.api_token is not None
        gleap.reset_log()
        deliverer = Deliverer(
            store, config.gleap, config.gleap.api_token, max_attempts=3, backoff_initial=0.01
        )
        asyncio.run(deliverer.drain(ids, keys, lambda _id: run_id))
    finally:
        engine.dispose()
    sizes = sorted(len(body) - 1 for body in gleap.identify_calls)
    assert sizes == [1, 35]  # 36 custom keys: the old one among them
    assert gleap.contacts["u1"]["seg_old"] is False and gleap.contacts["u1"]["seg_new"] is True


# --- config ---------------------------------------------------------------------------------------


def test_config_reads_previous_keys(make_config: ConfigFactory, gleap: GleapStandIn) -> None:
    config = make_config(gleap.base_url, audiences=NEW + TRAIT_NEW.format(missing=""))
    assert [p.previous_keys for p in config.properties] == [("seg_old",), ("tier_old",)]


@pytest.mark.parametrize(
    ("previous", "extra", "message"),
    [
        ('["Bad Key"]', "", "previous key: the key 'Bad Key' may hold only"),
        ('["email"]', "", "collides with Gleap's contact field 'email'"),
        ('["seg_new"]', "", "the previous key 'seg_new' is the current key"),
        ('["a_b", "a_b"]', "", "the previous key 'a_b' is listed twice"),
        ('"seg_old"', "", "must be an array, not a string"),
        ("[1]", "", "must be a list of strings"),
        (
            '["other"]',
            '[[audiences]]\nname = "Other"\nsource = "main"\nquery = "SELECT user_id FROM members"\n',
            "'other' is a previous key of audience 'Segment A' and the key of audience 'Other'",
        ),
        (
            '["shared"]',
            TRAIT_NEW.format(missing="").replace('"tier_old"', '"shared"'),
            "'shared' is a previous key of both audience 'Segment A' and trait 'Tier'",
        ),
    ],
)
def test_config_refuses_bad_previous_keys(
    make_config: ConfigFactory, gleap: GleapStandIn, previous: str, extra: str, message: str
) -> None:
    audiences_text = NEW.replace('["seg_old"]', previous) + extra
    with pytest.raises(ConfigError) as caught:
        make_config(gleap.base_url, audiences=audiences_text)
    assert message in str(caught.value)
    assert caught.value.fix


# --- the cycle ------------------------------------------------------------------------------------


def sync_cycle(config: Config, **kwargs: Any) -> CycleReport:
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01)
    try:
        return syncer.run_cycle(**kwargs)
    finally:
        syncer.sources.dispose()
        engine.dispose()


def by_user(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(calls, key=lambda body: body["userId"])


def test_a_sync_renames_with_the_cycles_changes_and_the_dry_run_shows_it_exactly(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3"])
    sync_cycle(make_config(gleap.base_url, audiences=OLD))
    source.set(["u1", "u2", "u4"])  # u3 leaves and u4 enters in the cycle of the rename
    gleap.reset_log()
    config = make_config(gleap.base_url, audiences=NEW)
    planned: list[PlannedCall] = []
    sync_cycle(config, dry_run=True, show_calls=lambda calls: planned.extend(calls))
    expected = [
        {"userId": "u1", "seg_new": True, "seg_old": False},
        {"userId": "u2", "seg_new": True, "seg_old": False},
        {"userId": "u3", "seg_old": False},
        {"userId": "u4", "seg_new": True},
    ]
    assert by_user([{"userId": c.user_id, **c.attributes} for c in planned]) == expected
    assert gleap.identify_calls == [], "a dry run sends nothing"

    report = sync_cycle(config)
    assert report.complete
    assert by_user(gleap.identify_calls) == expected
    (audience,) = report.audiences
    assert audience.status == "succeeded" and audience.mode == "incremental"
    assert (audience.entered, audience.left) == (1, 1)  # the rename itself moves nobody
    assert "renames=[renamed from 'seg_old': 3 user(s) are owed 'seg_old' retired]" in audience.summary()
    assert rows(config, "seg_old") == {}

    gleap.reset_log()
    planned.clear()
    sync_cycle(config, dry_run=True, show_calls=lambda calls: planned.extend(calls))
    assert planned == []
    sync_cycle(config)
    assert gleap.identify_calls == []


def test_sigkill_mid_rename_then_rerun_converges(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    users = [f"u{i:04d}" for i in range(300)]
    source.set(users)
    assert (
        sync(
            make_config(gleap.base_url, audiences=OLD, token=None), env={"GLEAP_API_TOKEN": TOKEN}
        ).returncode
        == 0
    )
    gleap.reset_log()
    config = make_config(gleap.base_url, audiences=NEW, token=None)
    gleap.hold(after=60)
    process = start(config, "sync", env={"GLEAP_API_TOKEN": TOKEN})
    assert gleap.wait_held(1, timeout=60), "delivery never got past 60 calls"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    bound = resend_bound(config, 300 + len(gleap.identify_calls))
    gleap.release()
    gleap.clear_faults()
    rerun = sync(config, env={"GLEAP_API_TOKEN": TOKEN})
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert {u: (c.get("seg_old"), c.get("seg_new")) for u, c in gleap.contacts.items()} == dict.fromkeys(
        users, (False, True)
    )
    assert all(set(body) == {"userId", "seg_old", "seg_new"} for body in gleap.identify_calls)
    assert resent(gleap) <= bound
    assert rows(config, "seg_old") == {}


def test_the_daemon_renames_once_and_serves_status(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    source.set(["u1", "u2"])
    old_config = make_config(gleap.base_url, audiences=OLD)
    sync_cycle(old_config)
    history = audience_id(old_config, "seg_old")
    gleap.reset_log()
    config = make_config(gleap.base_url, audiences=NEW, token=None, sync=SYNC, extra=SCHEDULE)
    daemon = daemons(config)
    expected = [{"userId": u, "seg_new": True, "seg_old": False} for u in ("u1", "u2")]
    wait_for(lambda: by_user(gleap.identify_calls) == expected, what="the rename's calls")
    wait_for(lambda: rows(config, "seg_old") == {}, what="the old key retired")
    # Later scheduled cycles (every few seconds) send nothing more.
    wait_for(lambda: daemon.output.count("seg_new: succeeded (incremental)") >= 2, what="later cycles")
    assert daemon.stop() == 0
    assert by_user(gleap.identify_calls) == expected
    assert audience_id(config, "seg_new") == history  # re-keyed, not made anew


def test_a_trait_rename_through_a_sync_and_its_dry_run(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    set_trait(source, {"u1": "pro", "u2": 7})
    sync_cycle(make_config(gleap.base_url, audiences=TRAIT_OLD + 'missing = "none"\n'))
    set_trait(source, {"u1": "pro", "u3": "free"})  # u2 drops out, u3 gets a value
    gleap.reset_log()
    config = make_config(gleap.base_url, audiences=TRAIT_NEW.format(missing='missing = "none"'))
    planned: list[PlannedCall] = []
    sync_cycle(config, dry_run=True, show_calls=lambda calls: planned.extend(calls))
    expected = [
        {"userId": "u1", "tier": "pro", "tier_old": "none"},
        {"userId": "u2", "tier_old": "none"},
        {"userId": "u3", "tier": "free"},
    ]
    assert by_user([{"userId": c.user_id, **c.attributes} for c in planned]) == expected
    sync_cycle(config)
    assert by_user(gleap.identify_calls) == expected
    assert rows(config, "tier_old") == {}
