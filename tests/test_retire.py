"""Retiring a key no config has (`audiencesync retire`): status lists it apart, the state goes and the
history stays (or not, --purge), and --unset-in-gleap delivers KEY: false exactly, resumably after a
kill, against the loopback stand-in on both stores.
"""

from __future__ import annotations

import csv
import io
import json
import signal
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.daemon.metrics import Metrics
from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.store.store import Store
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import cli
from tests.test_pause import by_user, refresh_only, two
from tests.test_reliability import resend_bound, resent, start
from tests.test_renames import rows
from tests.test_traits import cycle as sync, set_trait

ONLY_B = """
[[audiences]]
name = "Segment B"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'b'"
"""

TIER = """
[[traits]]
name = "Tier"
source = "main"
query = "SELECT user_id, value FROM traits WHERE name = 'plan'"
missing = "none"
"""


def scalar(config: Config, sql: str) -> Any:
    engine = sa.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar_one()
    finally:
        engine.dispose()


def retire(config: Config, *args: str) -> Any:
    return cli(config, "retire", *args)


def csv_rows(text: str) -> dict[str, int]:
    return {
        row["table"]: int(row[next(iter(k for k in row if k != "table"))])
        for row in csv.DictReader(io.StringIO(text))
    }


def test_retire_refuses_a_configured_key_a_previous_key_and_an_unknown_one(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"], "a")
    config = make_config(gleap.base_url, audiences=two())
    sync(config)
    configured = retire(config, "segment_a")
    assert configured.returncode == 2
    assert "audience 'segment_a' is still in the config" in configured.stderr
    assert "remove its [[audiences]] table" in configured.stderr and "enabled = false" in configured.stderr
    renamed = make_config(
        gleap.base_url,
        audiences=ONLY_B.replace("segment = 'b'\"", 'segment = \'b\'"\nprevious_keys = ["segment_a"]'),
    )
    owned = retire(renamed, "segment_a")
    assert owned.returncode == 2 and "a previous key of 'segment_b'" in owned.stderr, owned.stderr
    unknown = retire(make_config(gleap.base_url, audiences=ONLY_B), "nope")
    assert unknown.returncode == 2
    assert "the store has no key 'nope'" in unknown.stderr and "segment_a, segment_b" in unknown.stderr


def test_a_daemon_holding_the_store_is_named_with_the_fix(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"], "a")
    sync(make_config(gleap.base_url, audiences=two()))
    config = make_config(gleap.base_url, audiences=ONLY_B)
    engine = store_mod.engine_for(config.store)
    lease = WriterLease(engine, store_mod.utc_now, ttl_seconds=60, role="daemon")
    try:
        with lease.held():
            busy = retire(config, "segment_a", "--unset-in-gleap")
    finally:
        engine.dispose()
    assert busy.returncode == 4
    assert "a daemon (" in busy.stderr and "stop the daemon" in busy.stderr, busy.stderr
    assert rows(config, "segment_a") == {"u1": (True, True)}


def test_status_lists_a_removed_key_apart_and_retire_removes_its_state_keeping_the_history(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"], "a")
    source.set(["u1"], "b")
    sync(make_config(gleap.base_url, audiences=two()))
    gleap.reset_log()
    config = make_config(gleap.base_url, audiences=ONLY_B)

    table = cli(config, "status").stdout
    assert "\nretired (in the store, in no config" in table
    retired_part = table[table.index("\nretired (") :]
    assert "segment_a" in retired_part and "segment_b" not in retired_part
    listed = list(csv.DictReader(io.StringIO(cli(config, "status", "--format", "csv").stdout)))
    assert [(r["audience"], r["state"], r["configured"], r["members"]) for r in listed] == [
        ("segment_b", "live", "true", "1"),
        ("segment_a", "retired", "false", "2"),
    ]
    as_json = json.loads(cli(config, "status", "--format", "json").stdout)
    assert [a["key"] for a in as_json["audiences"]] == ["segment_b"]
    assert [(a["key"], a["state"], a["members"]) for a in as_json["retired"]] == [("segment_a", "retired", 2)]
    engine = store_mod.engine_for(config.store)
    try:
        metrics = Metrics(Store(engine).status, states=lambda: lifecycle.states(config))
        value = metrics.registry.get_sample_value
        assert value("audiencesync_retired_members", {"audience": "segment_a"}) == 2
        assert value("audiencesync_members", {"audience": "segment_a"}) is None, "not a live key"
        assert (
            value(
                "audiencesync_property_info", {"audience": "segment_b", "kind": "audience", "state": "live"}
            )
            == 1
        )
    finally:
        engine.dispose()

    planned = retire(config, "segment_a", "--dry-run", "--format", "csv")
    assert planned.returncode == 0, planned.stderr
    assert csv_rows(planned.stdout) == {"memberships": 2, "events": 0}
    assert rows(config, "segment_a") != {}, "a dry run deletes nothing"

    done = retire(config, "segment_a", "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert csv_rows(done.stdout) == {"memberships": 2, "events": 0}
    assert "retired segment_a: its state is removed" in done.stderr
    assert "Gleap keeps what it was told: 2 user(s) may still hold segment_a there" in done.stderr
    assert gleap.identify_calls == [], "without --unset-in-gleap Gleap keeps what it was told"
    assert rows(config, "segment_a") == {}
    runs = (
        "SELECT count(*) FROM sync_runs r JOIN audiences a ON a.id = r.audience_id WHERE a.key = 'segment_a'"
    )
    assert scalar(config, runs) == 1, "the history stays"
    assert scalar(config, "SELECT count(*) FROM membership_changes") == 3
    again = retire(config, "segment_a")
    assert again.returncode == 0, "retiring twice is a no-op"

    purge_plan = retire(config, "segment_a", "--purge", "--dry-run", "--format", "csv")
    expected = {
        "memberships": 0, "events": 0, "membership_changes": 2, "call_values": 2, "calls": 1,
        "sync_runs": 1, "audiences": 1,
    }  # fmt: skip
    assert csv_rows(purge_plan.stdout) == expected
    purged = retire(config, "segment_a", "--purge", "--format", "csv")
    assert purged.returncode == 0, purged.stderr
    assert csv_rows(purged.stdout) == expected
    # u1's call carried segment_b too: it stays, with segment_b's value alone; u2's went whole.
    assert scalar(config, "SELECT count(*) FROM calls") == 1
    assert scalar(config, "SELECT count(*) FROM call_values") == 1
    assert scalar(config, "SELECT count(*) FROM audiences WHERE key = 'segment_a'") == 0
    assert json.loads(cli(config, "status", "--format", "json").stdout)["retired"] == []


def test_unset_in_gleap_sends_false_exactly_to_those_gleap_may_hold_it_for(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3", "u4"], "a")
    source.set(["u1"], "b")
    gleap.fail_user("u4", 422)  # parked: Gleap never held segment_a for u4
    sync(make_config(gleap.base_url, audiences=two(), sync='max_attempts = 1\nretry_backoff = "0s"'))
    gleap.clear_faults()
    source.set(["u1", "u2"], "b")
    refresh_only(make_config(gleap.base_url, audiences=two()), "segment_b")  # u2 owes segment_b: true
    gleap.reset_log()
    config = make_config(gleap.base_url, audiences=ONLY_B)

    planned = retire(config, "segment_a", "--unset-in-gleap", "--dry-run")
    assert planned.returncode == 0 and "would send segment_a: false to 3 user(s)" in planned.stdout
    assert gleap.identify_calls == []

    done = retire(config, "segment_a", "--unset-in-gleap")
    assert done.returncode == 0, done.stdout + done.stderr
    # Exactly those Gleap holds true for, once each, and nothing of segment_b's owed change.
    assert by_user(gleap.identify_calls) == [{"userId": u, "segment_a": False} for u in ("u1", "u2", "u3")]
    assert "3 of 3 user(s) acknowledged segment_a: false; 0 remaining" in done.stdout
    assert "retired segment_a" in done.stdout
    assert rows(config, "segment_a") == {}
    assert rows(config, "segment_b")["u2"] == (True, None), "segment_b's change is still owed"
    run = "SELECT status || ' ' || sent FROM sync_runs WHERE mode = 'retire'"
    assert scalar(config, run) == "succeeded 3"


def test_unset_of_a_trait_sends_its_missing_value(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    set_trait(source, {"u1": "pro", "u2": 7})
    sync(make_config(gleap.base_url, audiences=ONLY_B + TIER))
    gleap.reset_log()
    config = make_config(gleap.base_url, audiences=ONLY_B)
    done = retire(config, "tier", "--unset-in-gleap")
    assert done.returncode == 0, done.stdout + done.stderr
    assert by_user(gleap.identify_calls) == [
        {"userId": "u1", "tier": "none"},
        {"userId": "u2", "tier": "none"},
    ]
    assert 'acknowledged tier: "none"' in done.stdout
    assert rows(config, "tier") == {}


def test_parked_users_keep_the_state_until_a_rerun_delivers_them(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3"], "a")
    settings = 'max_attempts = 1\nretry_backoff = "0s"'
    sync(make_config(gleap.base_url, audiences=two(), sync=settings))
    config = make_config(gleap.base_url, audiences=ONLY_B, sync=settings)
    gleap.reset_log()
    gleap.fail_user("u2", 422, body="no such contact")
    first = retire(config, "segment_a", "--unset-in-gleap")
    assert first.returncode == 1
    assert "'segment_a' is not retired yet: 1 user(s) are still owed segment_a: false" in first.stderr
    assert "1 parked" in first.stderr and "retire segment_a --unset-in-gleap` again" in first.stderr
    assert rows(config, "segment_a") == {"u2": (False, True)}
    status = cli(config, "status").stdout
    assert "segment_a: Gleap is still owed segment_a: false for 1 user(s)" in status
    failures = cli(config, "failures", "--format", "csv").stdout
    assert "segment_a,u2,false" in failures

    gleap.clear_faults()
    second = retire(config, "segment_a", "--unset-in-gleap")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 of 1 user(s) acknowledged" in second.stdout
    assert rows(config, "segment_a") == {}
    assert {u: c["segment_a"] for u, c in gleap.contacts.items()} == dict.fromkeys(("u1", "u2", "u3"), False)


@pytest.mark.parametrize("kill", ["outside", "after-record:2"])
def test_a_killed_unset_resumes_and_delivers_exactly_the_rest(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, kill: str
) -> None:
    users = [f"u{i:04d}" for i in range(300)]
    source.set(users, "a")
    sync(make_config(gleap.base_url, audiences=two()))
    config = make_config(gleap.base_url, audiences=ONLY_B, token=None)
    env = {"GLEAP_API_TOKEN": TOKEN}
    if kill == "outside":
        gleap.hold(after=60)
        process = start(config, "retire", "segment_a", "--unset-in-gleap", env=env)
        assert gleap.wait_held(1, timeout=60), "delivery never got past 60 calls"
        process.send_signal(signal.SIGKILL)
    else:
        process = start(
            config, "retire", "segment_a", "--unset-in-gleap", env=env | {"AUDIENCESYNC_FAILPOINT": kill}
        )
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    bound = resend_bound(config, len(gleap.identify_calls))
    gleap.release()
    gleap.clear_faults()
    left = len(rows(config, "segment_a"))
    # Mid-way: answers may still have been waiting for their batch at the kill (all 300 left then).
    assert 0 < left <= 300

    rerun = start(config, "retire", "segment_a", "--unset-in-gleap", env=env)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stdout + stderr
    assert f"to {left} user(s)" in stdout, "the rerun carries on with what is left"
    # No user missed: Gleap holds false for everyone; the only repeats are calls unrecorded at the kill.
    assert {u: c["segment_a"] for u, c in gleap.contacts.items()} == dict.fromkeys(users, False)
    assert resent(gleap) <= bound
    assert rows(config, "segment_a") == {}
    statuses = "SELECT count(*) FROM sync_runs WHERE mode = 'retire' AND status = 'interrupted'"
    assert scalar(config, statuses) == 1, "the killed retire's run is closed by the next"
