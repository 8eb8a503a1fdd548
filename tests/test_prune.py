"""Retention: `prune` deletes old delivery attempts and settled history, keeps what is held and
everything from its time on, in batches, resumably; the daemon prunes once a day. Both stores.

The store is written by real cycles against the loopback Gleap stand-in, on a clock the test moves
a day at a time, so that every time the store holds (changes, calls, runs) is one the test chose.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync import failpoints
from audiencesync.config.loading import Config
from audiencesync.errors import PruneTimeError
from audiencesync.lifecycle.prune import Pruner
from audiencesync.lifecycle.prune_rules import Counts
from audiencesync.store import store as store_mod
from audiencesync.store.requests import AdminRequests
from audiencesync.store.schema import (
    admin_requests,
    audiences,
    call_values,
    calls,
    leases,
    membership_changes,
    memberships,
    sync_runs,
)
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_outcomes import Clock, cycle
from tests.test_reliability import start
from tests.test_sync import TWO_AUDIENCES

DAY = timedelta(days=1)
# A rejection parks at once (u8); every answer is tried again at once.
SYNC = 'max_attempts = 1\nretry_backoff = "0s"'


@pytest.fixture
def engine(store: store_mod.Store) -> sa.Engine:
    return store.engine


@dataclass
class Scripted:
    config: Config
    clock: Clock
    days: list[datetime]  # the store's time of each day's cycle
    checkpoints: list[datetime]  # instants to compare members at


def scripted_store(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> Scripted:
    """Nine days of cycles of two audiences, with a parked change (u8), one that keeps failing (u9:
    outcome unknown, last error) and a call carrying both audiences, a finished admin request
    and a pending one. The clock starts 40 days ago, so that `prune --before` on the real clock
    accepts these times."""
    config = make_config(gleap.base_url, audiences=TWO_AUDIENCES, sync=SYNC)
    clock = Clock()
    clock.now -= timedelta(days=40)
    gleap.fail_user("u8", 422, body='{"message": "bad user"}', times=None)
    gleap.fail_user("u9", 503, times=None)
    script: list[tuple[list[str], list[str]]] = [  # (segment a, segment b) each day
        (["u1", "u2", "u3", "u4", "u5", "u6"], ["u1", "u2"]),
        (["u1", "u2", "u3", "u7"], ["u1", "u2", "u7"]),
        (["u1", "u2", "u3", "u7", "u8", "u9"], ["u2", "u7", "u9"]),
        (["u1", "u3", "u4", "u7", "u8", "u9"], ["u2", "u7", "u9"]),
        (["u3", "u4", "u7", "u8", "u9"], ["u2", "u9"]),
        (["u3", "u4", "u7", "u8", "u9"], ["u2", "u9"]),
        (["u4", "u5", "u7", "u8", "u9"], ["u2", "u5", "u9"]),
        (["u2", "u4", "u5", "u7", "u8", "u9"], ["u5", "u9"]),
        (["u2", "u4", "u5", "u7", "u8", "u9"], ["u5", "u9"]),
    ]
    engine = store_mod.engine_for(config.store)
    requests = AdminRequests(engine, clock)
    days, checkpoints = [], []
    try:
        for day, (a, b) in enumerate(script):
            source.set(a, "a")
            source.set(b, "b")
            days.append(clock.now)
            checkpoints += [clock.now - timedelta(microseconds=1), clock.now]
            cycle(config, clock)
            checkpoints.append(clock.now + timedelta(hours=12))
            if day == 1:
                done = requests.submit("full", "segment_a", "test")
                requests.claim(done)
                requests.finish(done, ok=True, result={}, run_id=1)
                requests.submit("release", "segment_b", "test")  # never picked up
            clock.advance(DAY.total_seconds())
    finally:
        engine.dispose()
    return Scripted(config, clock, days, checkpoints)


# --- what the store holds, and what a prune must leave of it ---------------------------------


def snapshot(engine: sa.Engine) -> dict[str, dict[Any, dict[str, Any]]]:
    def rows(table: sa.Table, *key: str) -> dict[Any, dict[str, Any]]:
        found = conn.execute(sa.select(table)).mappings()
        return {tuple(r[k] for k in key) if len(key) > 1 else r[key[0]]: dict(r) for r in found}

    with engine.connect() as conn:
        return {
            "audiences": rows(audiences, "id"),
            "memberships": rows(memberships, "audience_id", "user_id"),
            "leases": rows(leases, "name"),
            "changes": rows(membership_changes, "id"),
            "calls": rows(calls, "id"),
            "values": rows(call_values, "call_id", "audience_id"),
            "runs": rows(sync_runs, "id"),
            "requests": rows(admin_requests, "id"),
        }


def expected_after(before: dict[str, dict[Any, dict[str, Any]]], cut: datetime) -> dict[str, Any]:
    """The rules of docs/retention.md, applied in Python to the unpruned store."""
    held = {
        key
        for key, m in before["memberships"].items()
        if m["pending"] or m["parked_at"] is not None or m["last_error"] is not None
    }
    changes = {
        i: c
        for i, c in before["changes"].items()
        if c["at"] >= cut or (c["audience_id"], c["user_id"]) in held
    }
    # A departure kept whose entry went forgets that entry's time (entered_at, migration 0015).
    for i, c in changes.items():
        entries = [
            j
            for j, e in before["changes"].items()
            if j < i
            and e["change"] == "entered"
            and (e["audience_id"], e["user_id"]) == (c["audience_id"], c["user_id"])
        ]
        if c["change"] == "left" and entries and max(entries) not in changes:
            changes[i] = {**c, "entered_at": None}
    held_calls = {
        v["call_id"]
        for v in before["values"].values()
        if (v["audience_id"], before["calls"][v["call_id"]]["user_id"]) in held
    }
    kept_calls = {i: c for i, c in before["calls"].items() if c["at"] >= cut or i in held_calls}
    values = {k: v for k, v in before["values"].items() if v["call_id"] in kept_calls}
    requests = {
        i: r
        for i, r in before["requests"].items()
        if r["state"] not in ("done", "failed") or r["finished_at"] >= cut
    }
    latest = {max(i for i, r in before["runs"].items() if r["audience_id"] == a) for a in before["audiences"]}
    referred = (
        {c["run_id"] for c in changes.values()}
        | {v["run_id"] for v in values.values()}
        | {r["run_id"] for r in requests.values()}
    )
    runs = {
        i: r
        for i, r in before["runs"].items()
        if r["finished_at"] is None or r["finished_at"] >= cut or i in latest or i in referred
    }
    return {
        **{k: before[k] for k in ("audiences", "memberships", "leases")},
        "changes": changes,
        "calls": kept_calls,
        "values": values,
        "runs": runs,
        "requests": requests,
    }


def deleted(before: dict[str, Any], after: dict[str, Any]) -> Counts:
    gone = {table: len(before[table]) - len(after[table]) for table in before}
    return Counts(gone["calls"], gone["values"], gone["changes"], gone["runs"], gone["requests"])


def members_forward(state: dict[str, Any], audience_id: int, at: datetime) -> set[str]:
    """The reference: a user was a member when their last change up to then was an entry."""
    last: dict[str, str] = {}
    for c in sorted(state["changes"].values(), key=lambda c: (c["at"], c["id"])):
        if c["audience_id"] == audience_id and c["at"] <= at:
            last[c["user_id"]] = c["change"]
    return {user for user, change in last.items() if change == "entered"}


def members_backward(state: dict[str, Any], audience_id: int, at: datetime) -> set[str]:
    """The audit's rule: today's members, corrected by each user's first change after ``at``."""
    members = {u for (a, u), m in state["memberships"].items() if a == audience_id and m["desired"]}
    first: dict[str, str] = {}
    for c in sorted(state["changes"].values(), key=lambda c: (c["at"], c["id"])):
        if c["audience_id"] == audience_id and c["at"] > at:
            first.setdefault(c["user_id"], c["change"])
    for user, change in first.items():
        (members.add if change == "left" else members.discard)(user)
    return members


def assert_members_kept(
    unpruned: dict[str, Any], pruned: dict[str, Any], cut: datetime, at: list[datetime]
) -> None:
    later = [t for t in at if t >= cut]
    assert later, "no instant to compare"
    for audience_id in unpruned["audiences"]:
        for t in later:
            assert members_backward(pruned, audience_id, t) == members_forward(unpruned, audience_id, t), t


# --- prune -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [5000, 2])
def test_prune_keeps_what_is_held_and_everything_from_its_time_on(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, engine: sa.Engine, batch_size: int
) -> None:
    script = scripted_store(make_config, source, gleap)
    unpruned = snapshot(engine)
    for audience_id in unpruned["audiences"]:  # the two rules agree on the whole history
        for t in script.checkpoints:
            assert members_backward(unpruned, audience_id, t) == members_forward(unpruned, audience_id, t)
    held = {k for k, m in unpruned["memberships"].items() if m["parked_at"] or m["unknown"]}
    assert {u for _, u in held} == {"u8", "u9"}, "the script should leave a parked and an unknown change"
    cut = script.days[4]  # exactly the time of day 4's changes and calls: they stay
    pruner = Pruner(engine, script.clock, pause_seconds=0)

    planned = pruner.plan(cut)
    assert snapshot(engine) == unpruned, "a dry run deletes nothing"
    result = pruner.prune(cut, by="cli", batch_size=batch_size)

    pruned = snapshot(engine)
    expected = expected_after(unpruned, cut)
    assert pruned == expected
    assert result.finished and result.deleted == planned == deleted(unpruned, pruned)
    assert min(planned.calls, planned.call_values, planned.membership_changes, planned.sync_runs) > 0
    assert planned.admin_requests == 1
    if batch_size == 2:
        assert result.batches > 10
    assert_members_kept(unpruned, pruned, cut, script.checkpoints)
    # The prune's own row: written first, finished last, its counts those deleted.
    record = pruner.last()
    assert record is not None and record.finished_at is not None and record.by == "cli"
    assert (record.before, record.calls, record.changes, record.runs, record.requests) == (
        cut,
        result.deleted.calls,
        result.deleted.membership_changes,
        result.deleted.sync_runs,
        result.deleted.admin_requests,
    )
    assert pruner.exact_from() == cut
    # Pruning again finds nothing more, and the store still syncs.
    assert pruner.prune(cut, by="cli").deleted.total == 0
    assert cycle(script.config, script.clock).audiences


def test_an_interrupted_prune_leaves_a_consistent_store_and_the_next_finishes_it(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = scripted_store(make_config, source, gleap)
    unpruned = snapshot(engine)
    cut = script.days[5]
    pruner = Pruner(engine, script.clock, pause_seconds=0)
    planned = pruner.plan(cut)

    monkeypatch.setenv(failpoints.ENV, "prune-batch:3:raise")  # after the third batch committed
    monkeypatch.setattr(failpoints, "_reached", Counter())
    with pytest.raises(RuntimeError, match="prune-batch"):
        pruner.prune(cut, by="daemon", batch_size=2)
    monkeypatch.delenv(failpoints.ENV)
    partial = snapshot(engine)
    interrupted = pruner.last()
    assert interrupted is not None and interrupted.finished_at is None  # written before any delete
    assert interrupted.calls == 6 and interrupted.calls == len(unpruned["calls"]) - len(partial["calls"])
    assert_consistent(partial)
    assert_members_kept(unpruned, partial, cut, script.checkpoints)
    assert pruner.exact_from() == cut  # the audit already refuses earlier times

    result = pruner.prune(cut, by="cli", batch_size=2)
    assert result.finished
    assert snapshot(engine) == expected_after(unpruned, cut)
    together = deleted(unpruned, partial)
    together.add(result.deleted)
    assert together == planned


def assert_consistent(state: dict[str, Any]) -> None:
    """Nothing left refers to a row that is gone."""
    runs = set(state["runs"])
    assert {c["run_id"] for c in state["changes"].values()} <= runs
    assert {v["run_id"] for v in state["values"].values()} <= runs
    assert {v["call_id"] for v in state["values"].values()} <= set(state["calls"])
    assert {r["run_id"] for r in state["requests"].values()} - {None} <= runs


def test_prune_refuses_a_time_in_the_future_or_within_a_day(engine: sa.Engine) -> None:
    now = store_mod.utc_now()
    pruner = Pruner(engine, lambda: now)
    for before in (now + DAY, now, now - DAY + timedelta(seconds=1)):
        with pytest.raises(PruneTimeError, match="at least a day ago"):
            pruner.prune(before, by="cli")
    assert pruner.last() is None
    pruner.prune(now - DAY, by="cli")


# --- the command line --------------------------------------------------------------------------


def test_cli_prune_dry_run_counts_and_bad_times(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, engine: sa.Engine
) -> None:
    script = scripted_store(make_config, source, gleap)
    cut = script.days[4].isoformat()
    unpruned = snapshot(engine)
    for bad, message in (
        ("yesterday-ish", "is not a time"),
        ("2999-01-01", "is in the future"),
        ("3h", "is less than a day ago"),
    ):
        refused = audiencesync(script.config, "prune", "--before", bad)
        assert refused.returncode == 2, refused.stderr
        assert message in refused.stderr and "Fix:" in refused.stderr and "Traceback" not in refused.stderr

    dry = audiencesync(script.config, "prune", "--before", cut, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would_delete" in dry.stdout and "nothing was deleted" in dry.stdout
    planned = Pruner(engine, store_mod.utc_now).plan(script.days[4])
    assert f"membership_changes  {planned.membership_changes}\n" in dry.stdout
    rows = audiencesync(script.config, "prune", "--before", cut, "--dry-run", "--format", "jsonl")
    assert [json.loads(line) for line in rows.stdout.splitlines()] == [
        {"table": table, "would_delete": n} for table, n in planned.per_table()
    ]
    assert "nothing was deleted" in rows.stderr
    assert snapshot(engine) == unpruned

    done = audiencesync(script.config, "prune", "--before", cut)
    assert done.returncode == 0, done.stderr
    assert f"calls               {planned.calls}\n" in done.stdout
    assert ("VACUUM" in done.stdout) == script.config.store.url.startswith("sqlite")
    status = audiencesync(script.config, "status")
    assert "last prune: " in status.stdout and "by cli" in status.stdout
    assert f"{planned.calls} call(s), {planned.membership_changes} change(s)" in status.stdout


def test_a_prune_killed_mid_way_is_finished_by_the_next(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, engine: sa.Engine
) -> None:
    script = scripted_store(make_config, source, gleap)
    unpruned = snapshot(engine)
    cut = script.days[5]
    killed = audiencesync(
        script.config, "prune", "--before", cut.isoformat(), "--batch-size", "2",
        env={"AUDIENCESYNC_FAILPOINT": "prune-batch:2"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = snapshot(engine)
    assert_consistent(partial)
    assert 0 < len(unpruned["calls"]) - len(partial["calls"]) <= 4
    status = audiencesync(script.config, "status")
    assert "not finished (interrupted, or still running)" in status.stdout
    again = audiencesync(script.config, "prune", "--before", cut.isoformat())
    assert again.returncode == 0, again.stderr
    assert snapshot(engine) == expected_after(unpruned, cut)


def audiencesync(
    config: Config, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`audiencesync ARGS` as a process."""
    process = start(config, *args, env={"GLEAP_API_TOKEN": TOKEN} | (env or {}))
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
