"""`audiencesync audit`: answers exact at chosen instants of a scripted store (both databases), in
every format, and clear refusals (bad TIME, unknown audience, a time before the prune horizon)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.cli import main as cli
from audiencesync.cli.formats import FORMATS
from audiencesync.lifecycle import prune_rules
from audiencesync.lifecycle.prune import Pruner
from audiencesync.store import audit, store as store_mod
from audiencesync.store.schema import call_values, calls, membership_changes, prunes, sync_runs
from audiencesync.store.schema_views import run_history_view
from tests import audit_scenario as s
from tests.conftest import ConfigFactory, SourceDB, unchanged
from tests.gleap_standin import GleapStandIn
from tests.test_outcomes import Clock
from tests.test_sync import TWO_AUDIENCES

Audit = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def scenario(
    shared_make_config: ConfigFactory, shared_source: SourceDB, shared_gleap: GleapStandIn
) -> Iterator[s.Scenario]:
    """Played once per store for this module's tests, which only read it (checked at the end)."""
    played = s.play(shared_make_config, shared_source, shared_gleap)
    with unchanged(played.config.store.url, "the audit scenario"):
        yield played


@pytest.fixture
def own_scenario(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> s.Scenario:
    """The scenario played again for a test that writes into its store (or configures it anew)."""
    return s.play(make_config, source, gleap)


def auditor(scenario: s.Scenario, capsys: pytest.CaptureFixture[str]) -> Audit:
    """`audiencesync audit ARGS...` in this process: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        status = cli.main(["--config", str(scenario.config.path), "audit", *args])
        out = capsys.readouterr()
        return status, out.out, out.err

    return run


@pytest.fixture
def run_audit(scenario: s.Scenario, capsys: pytest.CaptureFixture[str]) -> Audit:
    return auditor(scenario, capsys)


@pytest.fixture
def own_run_audit(own_scenario: s.Scenario, capsys: pytest.CaptureFixture[str]) -> Audit:
    return auditor(own_scenario, capsys)


def parse(fmt: str, text: str) -> list[dict[str, Any]]:
    """Rows back from csv (the csv module), json or jsonl (json.loads); csv cells stay text."""
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    if fmt == "json":
        rows: list[dict[str, Any]] = json.loads(text)
        return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def as_csv(value: Any) -> str:
    """A JSON value as the csv format writes it."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def instant(value: Any) -> datetime | None:
    return None if value in (None, "") else datetime.fromisoformat(value)


def iso(at: datetime) -> str:
    return at.isoformat()


def members_of(run_audit: Audit, *args: str) -> dict[str, datetime | None]:
    status, out, err = run_audit("members", s.A, *args, "--format", "json")
    assert status == 0, err
    return {row["user_id"]: instant(row["since"]) for row in parse("json", out)}


# --- members at an instant ------------------------------------------------------------------


def test_members_at_each_chosen_instant_are_exact(run_audit: Audit) -> None:
    for at, expected in s.MEMBERS_AT.items():
        assert set(members_of(run_audit, "--at", iso(at))) == expected, at
    assert members_of(run_audit, "--at", iso(s.half_past(4))) == s.SINCE_AT_HALF_PAST_4
    now = members_of(run_audit)
    assert set(now) == s.MEMBERS_AT[s.half_past(6)]
    assert now == {"u1": s.T[4], "u4": s.T[2], "u5": s.T[6]}  # since: the member's last entry
    status, out, err = run_audit("members", s.A, "--at", iso(s.T[2]), "--format", "csv")
    assert status == 0 and [row["user_id"] for row in parse("csv", out)] == ["u2", "u3", "u4"]  # by id
    assert f"3 member(s) of segment_a at {s.T[2].isoformat(timespec='seconds')}" in err


def test_members_stay_exact_after_the_history_before_a_prune_is_deleted(
    own_scenario: s.Scenario, own_run_audit: Audit
) -> None:
    scenario, run_audit = own_scenario, own_run_audit  # the history is pruned
    horizon = s.half_past(3)
    before = {at: members_of(run_audit, "--at", iso(at)) for at in s.MEMBERS_AT if at >= horizon}

    def check(lost: set[str]) -> None:
        """Members unchanged; only the entries in ``lost`` (departed since ``at``) lose their time."""
        for at, expected in before.items():
            after = members_of(run_audit, "--at", iso(at))
            assert set(after) == set(expected), at
            gone = {u for u in lost if u in expected and at < s.T[6]}
            assert {u: when for u, when in after.items() if when != expected[u]} == dict.fromkeys(gone)

    engine = store_mod.engine_for(scenario.config.store)
    # The real prune keeps the history of u3's parked change: only u2's entry (cycle 1;
    # left in 6) goes. A member now keeps memberships.changed_at (u4, cycle 2).
    result = Pruner(engine, store_mod.utc_now, pause_seconds=0).prune(horizon, by="cli")
    assert result.finished and result.deleted.membership_changes > 0
    check({"u2"})
    # The worst a prune may do: everything before its `before` deleted (u3's entry too), each
    # deleted entry's departure forgetting its time as a prune's batch makes it.
    with engine.begin() as conn:
        old_calls = sa.select(calls.c.id).where(calls.c.at < horizon)
        conn.execute(sa.delete(call_values).where(call_values.c.call_id.in_(old_calls)))
        conn.execute(sa.delete(calls).where(calls.c.at < horizon))
        c = membership_changes.c
        deleted = conn.execute(
            sa.delete(membership_changes)
            .where(c.at < horizon)
            .returning(c.audience_id, c.user_id, c.id, c.change)
        ).all()
        entries = [{"b_a": a, "b_u": u, "b_id": i} for a, u, i, change in deleted if change == "entered"]
        conn.execute(prune_rules.FORGET_ENTRY_TIME, entries)
    engine.dispose()
    check({"u2", "u3"})


def test_a_time_before_the_prune_horizon_is_refused(own_scenario: s.Scenario, own_run_audit: Audit) -> None:
    scenario, run_audit = own_scenario, own_run_audit  # prunes are recorded
    engine = store_mod.engine_for(scenario.config.store)
    with engine.begin() as conn:
        for before in (s.T[2], s.T[3]):  # the latest `before` is the horizon, whatever the order
            conn.execute(sa.insert(prunes).values(before=before, started_at=s.T[6], by="daemon"))
    engine.dispose()
    status, out, err = run_audit("members", s.A, "--at", iso(s.half_past(2)))
    assert status == 2 and out == ""
    assert "prune #2 (by daemon, 2026-11-02T14:00:00+00:00)" in err
    assert "deleted everything before 2026-11-02T11:00:00+00:00, the horizon" in err
    assert "Fix: ask for 2026-11-02T11:00:00+00:00 or later" in err
    status, _, err = run_audit("diff", s.A, "--from", iso(s.T[1]), "--to", iso(s.T[6]))
    assert status == 2 and "the horizon" in err
    assert set(members_of(run_audit, "--at", iso(s.T[3]))) == {"u2", "u3", "u4"}  # at the horizon
    assert set(members_of(run_audit)) == s.MEMBERS_AT[s.half_past(6)]  # now needs no history


# --- diff ----------------------------------------------------------------------------------


def test_diff_gives_the_net_change_per_user_with_counts(run_audit: Audit) -> None:
    for (start, end), (entered, left) in s.DIFFS.items():
        status, out, err = run_audit("diff", s.A, "--from", iso(start), "--to", iso(end), "--format", "jsonl")
        assert status == 0, err
        rows = parse("jsonl", out)
        assert {r["user_id"] for r in rows if r["change"] == "entered"} == entered
        assert {r["user_id"] for r in rows if r["change"] == "left"} == left
        assert len(rows) == len(entered) + len(left)
        assert f"{len(entered)} entered, {len(left)} left segment_a between" in err  # not in the rows
    start, end = s.half_past(1), s.half_past(6)
    status, out, _ = run_audit("diff", s.A, "--from", iso(start), "--to", iso(end))
    lines = out.splitlines()
    assert lines[-1] == (
        "2 entered, 2 left segment_a between 2026-11-02T09:30:00+00:00 and 2026-11-02T14:30:00+00:00"
    )
    # Each net change is dated by the user's last change in between.
    status, out, _ = run_audit("diff", s.A, "--from", iso(start), "--to", iso(end), "--format", "csv")
    assert [(r["user_id"], r["change"], instant(r["at"])) for r in parse("csv", out)] == [
        ("u4", "entered", s.T[2]),
        ("u5", "entered", s.T[6]),
        ("u2", "left", s.T[6]),
        ("u3", "left", s.T[4]),
    ]


def test_diff_runs_to_now_by_default_and_takes_now_as_a_time(run_audit: Audit) -> None:
    start = iso(s.half_past(1))
    # The scenario's last cycle is hours after T[6]... and long before now: the same net change.
    status, upto_last, err = run_audit(
        "diff", s.A, "--from", start, "--to", iso(s.half_past(6)), "--format", "csv"
    )
    assert status == 0, err
    for to in ([], ["--to", "now"], ["--to", "NOW"]):
        status, out, err = run_audit("diff", s.A, "--from", start, *to, "--format", "csv")
        assert status == 0, err
        assert out == upto_last and "2 entered, 2 left segment_a between" in err
        until = datetime.fromisoformat(err.strip().rsplit(" and ", 1)[1])
        assert abs(until - store_mod.utc_now()) < timedelta(minutes=5)  # "now" is the command's now
    status, at_now, err = run_audit("members", s.A, "--at", "now", "--format", "csv")
    assert status == 0, err
    assert at_now == run_audit("members", s.A, "--format", "csv")[1]


def test_diff_from_after_to_is_refused(run_audit: Audit) -> None:
    status, out, err = run_audit("diff", s.A, "--from", iso(s.T[3]), "--to", iso(s.T[2]))
    assert status == 2 and out == "" and "is after --to" in err and "Fix: swap them" in err


# --- a user's timeline -----------------------------------------------------------------------


def timeline(run_audit: Audit, user: str, *args: str) -> list[dict[str, Any]]:
    status, out, err = run_audit("user", user, *args, "--format", "json")
    assert status == 0, err
    return parse("json", out)


def test_a_users_timeline_has_each_change_its_state_and_every_call(
    scenario: s.Scenario, run_audit: Audit
) -> None:
    users = {user for user, *_ in s.CHANGES}
    got = {user: timeline(run_audit, user, "--audience", s.A) for user in users}
    changes = [
        (user, e["event"], e["run_id"], e["result"], instant(e["acknowledged_at"]))
        for user in sorted(users)
        for e in got[user]
        if e["event"] != "call"
    ]
    assert changes == [
        (user, change, scenario.runs[(k, s.A)], state, s.T[acked] if acked else None)
        for user, change, k, state, acked in s.CHANGES
    ]
    for user, expected in s.CALLS.items():
        logged = [
            (e["run_id"], e["value"], e["attempt"], e["status"], e["result"])
            for e in got[user]
            if e["event"] == "call"
        ]
        assert logged == [(scenario.runs[(k, s.A)], *rest) for k, *rest in expected], user
    # Time order, each call after the change it carried.
    assert [(e["event"], instant(e["at"])) for e in got["u4"]] == [("entered", s.T[2])] + [
        ("call", s.T[2])
    ] * 4 + [("call", s.T[3])]
    parked = next(e for e in got["u3"] if e["event"] == "left")
    assert parked["status"] == 422 and "bad user" in parked["error"]
    rejected = [e for e in got["u3"] if e["event"] == "call" and e["status"] == 422]
    assert len(rejected) == 2 and all("bad user" in e["error"] for e in rejected)
    failed = next(e for e in got["u5"] if e["event"] == "call")
    assert (failed["status"], failed["result"]) == (400, "rejected") and "unknown user id" in failed["error"]


def test_a_timeline_spans_every_audience_unless_one_is_asked(run_audit: Audit) -> None:
    both = timeline(run_audit, "u1")
    assert [(e["audience"], e["event"]) for e in both if e["event"] != "call"] == [
        (s.A, "entered"),
        (s.B, "entered"),
        (s.A, "left"),
        (s.A, "entered"),
        (s.B, "left"),
    ]
    # One call carried both audiences' first values: a row for each.
    first = [e for e in both if e["event"] == "call" and instant(e["at"]) == s.T[1]]
    assert {e["audience"] for e in first} == {s.A, s.B} and len({e["call_id"] for e in first}) == 1
    assert {e["audience"] for e in timeline(run_audit, "u1", "--audience", s.B)} == {s.B}


def test_an_unknown_user_is_an_empty_timeline(run_audit: Audit) -> None:
    for fmt in FORMATS:
        status, out, err = run_audit("user", "nobody", "--format", fmt)
        assert status == 0 and "no change or call is stored for user 'nobody'" in err
        if fmt != "table":
            assert parse(fmt, out) == []


# --- runs ------------------------------------------------------------------------------------


def test_runs_newest_first_with_every_counter(scenario: s.Scenario, run_audit: Audit) -> None:
    status, out, _ = run_audit("runs", "--format", "json")
    rows = parse("json", out)
    assert status == 0 and [r["run_id"] for r in rows] == sorted(scenario.runs.values(), reverse=True)
    assert list(rows[0]) == list(audit.RUN_COLUMNS)
    assert sorted(audit.RUN_COLUMNS) == sorted(run_history_view.c.keys())  # every counter
    engine = store_mod.engine_for(scenario.config.store)
    with engine.connect() as conn:
        stored = {r.id: r for r in conn.execute(sa.select(sync_runs))}
    engine.dispose()
    renamed = {"run_id": "id", "users_entered": "entered", "users_left": "left", "users_changed": "changed"}
    for row in rows:
        run = stored[row["run_id"]]
        assert row["audience_kind"] == "audience"
        for column, value in row.items():
            if column in ("audience_key", "audience_kind", "started_at", "finished_at"):
                continue
            assert value == getattr(run, renamed.get(column, column)), (column, row)
        assert instant(row["started_at"]) == run.started_at
    last_a = next(r for r in rows if r["audience_key"] == s.A)
    assert (last_a["users_entered"], last_a["users_left"], last_a["status"]) == (1, 1, "partial")
    assert (last_a["parked_after"], last_a["pending_after"]) == (1, 1)  # u3 parked, u5 failed

    status, out, _ = run_audit("runs", "--audience", s.B, "--since", iso(s.T[5]), "--format", "csv")
    assert [(r["audience_key"], instant(r["started_at"])) for r in parse("csv", out)] == [
        (s.B, s.T[6]),
        (s.B, s.T[5]),
    ]
    status, out, _ = run_audit("runs", "--limit", "3", "--format", "jsonl")
    assert [r["run_id"] for r in parse("jsonl", out)] == [r["run_id"] for r in rows[:3]]


# --- every format, every refusal ---------------------------------------------------------------

COMMANDS = {
    "members": (["members", s.A, "--at", iso(s.half_past(4))], audit.MEMBER_COLUMNS, 4),
    "user": (["user", "u6"], audit.TIMELINE_COLUMNS, 7),
    "diff": (
        ["diff", s.A, "--from", iso(s.half_past(1)), "--to", iso(s.half_past(6))],
        audit.DIFF_COLUMNS,
        4,
    ),
    "runs": (["runs", "--limit", "5"], audit.RUN_COLUMNS, 5),
}


def test_every_format_parses_back(run_audit: Audit) -> None:
    for command, (args, columns, count) in COMMANDS.items():
        answers = {}
        for fmt in ("csv", "json", "jsonl"):
            status, out, err = run_audit(*args, "--format", fmt)
            assert status == 0, err
            answers[fmt] = parse(fmt, out)
            assert len(answers[fmt]) == count, (command, fmt, out)
            assert all(list(row) == list(columns) for row in answers[fmt]), (command, fmt, out)
        assert answers["json"] == answers["jsonl"]
        assert answers["csv"] == [{k: as_csv(v) for k, v in row.items()} for row in answers["json"]]
        status, out, _ = run_audit(*args)  # the table: a header, then the rows
        assert status == 0 and out.splitlines()[0].split()[:2] == list(columns[:2]), command


BAD_TIMES = {
    "yesterday-ish": ["members", s.A, "--at", "yesterday-ish"],
    "3x": ["diff", s.A, "--from", "3x", "--to", "1d"],
    "2026-13-45": ["runs", "--since", "2026-13-45"],
}


def test_bad_times_and_unknown_audiences_are_clear_errors(run_audit: Audit) -> None:
    for bad, args in BAD_TIMES.items():
        status, out, err = run_audit(*args)
        option = args[args.index(bad) - 1]
        assert status == 2 and out == "" and "Traceback" not in err, args
        assert f"{option} {bad!r} is not a time. Fix: write ISO 8601" in err, err
    for args in (
        ["members", "segment_c"],
        ["user", "u1", "--audience", "segment_c"],
        ["runs", "--audience", "segment_c"],
        ["diff", "segment_c", "--from", "1d", "--to", "1h"],
    ):
        status, out, err = run_audit(*args)
        assert status == 2 and out == "", args
        assert "no audience or trait has the key 'segment_c', in the config or in the store" in err
        assert "Fix: use one of the keys: segment_a, segment_b" in err


def test_an_audience_removed_from_the_config_stays_auditable(
    own_scenario: s.Scenario,
    make_config: ConfigFactory,
    gleap: GleapStandIn,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Its own: make_config configures the test's store (the scenario's), not the shared one.
    only_b = TWO_AUDIENCES[TWO_AUDIENCES.index('[[audiences]]\nname = "Segment B"') :]
    config = make_config(gleap.base_url, audiences=only_b)
    status = cli.main(["--config", str(config.path), "audit", "members", s.A, "--format", "csv"])
    out = capsys.readouterr()
    assert status == 0 and "'segment_a' is not in the config any more; from the store" in out.err
    assert {r["user_id"] for r in parse("csv", out.out)} == s.MEMBERS_AT[s.half_past(6)]
    status = cli.main(["--config", str(config.path), "audit", "members", "segment_c"])
    out = capsys.readouterr()
    assert status == 2 and "in the store only (no longer configured): segment_a" in out.err


def test_refusals_from_the_real_process_have_no_traceback(scenario: s.Scenario) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "audiencesync", "--config", str(scenario.config.path), "audit", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    for args in (["members", s.A, "--at", "soon"], ["members", "segment_c"]):
        refused = run(*args)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.startswith("audiencesync: error: ")
    listed = run("members", s.A, "--at", iso(s.half_past(1)), "--format", "csv")
    assert listed.returncode == 0 and [r["user_id"] for r in parse("csv", listed.stdout)] == [
        "u1",
        "u2",
        "u3",
    ]


def test_relative_times_count_back_from_now(scenario: s.Scenario, run_audit: Audit) -> None:
    # The scenario lies in the past of the real clock (2026-11-02): 1000 weeks ago is before it.
    assert members_of(run_audit, "--at", "1000w") == {}
    assert set(members_of(run_audit, "--at", "1m")) == s.MEMBERS_AT[s.half_past(6)]


def test_members_and_the_library_agree(scenario: s.Scenario) -> None:
    engine = store_mod.engine_for(scenario.config.store)
    with engine.connect() as conn, conn.begin():
        audience = audit.audience(conn, s.A, [s.A])
        assert audience.id is not None
        for at, expected in s.MEMBERS_AT.items():
            assert [user for user, _ in audit.members(conn, audience.id, at)] == sorted(expected)
        exact = s.T[4] - timedelta(microseconds=1)
        assert {user for user, _ in audit.members(conn, audience.id, exact)} == {"u2", "u3", "u4"}
    engine.dispose()


def test_a_new_change_after_a_failed_one_is_pending_not_failed(store: store_mod.Store) -> None:
    clock = Clock()
    store.clock = clock
    audience = store.ensure_audience("a", "A")

    def refresh(members: list[str]) -> int:
        clock.advance(60)
        run_id = store.start_run("c", audience, "incremental")
        store.refresh(audience, run_id, [members], full=False)
        return run_id

    def answer(run_id: int, value: bool, status: int) -> None:
        change = store_mod.PendingChange(audience.id, "u1", value)
        store.record(
            [store_mod.Outcome((change,), status, f"HTTP {status}", permanent=status >= 400)],
            {audience.id: run_id},
        )

    answer(refresh(["u1"]), True, 200)
    answer(refresh([]), False, 400)  # Gleap refused the false: that change failed
    refresh(["u1"])  # back before a retry: Gleap has true already
    refresh([])  # a new false, not tried yet: the old error is not about it
    with store.engine.connect() as conn:
        events = [dict(zip(audit.TIMELINE_COLUMNS, e, strict=True)) for e in audit.timeline(conn, "u1")]
    states = [(e["event"], e["result"]) for e in events if e["event"] != "call"]
    assert states == [
        ("entered", "acknowledged"),
        ("left", "superseded"),
        ("entered", "superseded"),
        ("left", "pending"),
    ]
