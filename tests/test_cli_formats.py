"""--format on the commands that list things, and TIME options, through the real console script."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from audiencesync.alerts import attention
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_cli import run, sync_with_u2_parked
from tests.test_sync import TWO_AUDIENCES

MACHINE_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00"
HUMAN_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"


def test_failures_in_each_format(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
    path = sync_with_u2_parked(make_config, source, gleap).path

    as_csv = run(path, "failures", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(rows[0]) == ["audience", "user_id", "value", "attempts", "parked_at", "last_error"]
    assert [(r["audience"], r["user_id"], r["value"], r["attempts"]) for r in rows] == [
        ("segment_a", "u2", "true", "1")
    ]
    assert re.fullmatch(MACHINE_TIME, rows[0]["parked_at"]) and "unprocessable" in rows[0]["last_error"]
    assert as_csv.stderr == "1 parked change(s); re-queue with `audiencesync retry`\n"

    as_json = json.loads(run(path, "failures", "--format", "json").stdout)
    as_jsonl = [json.loads(line) for line in run(path, "failures", "--format", "jsonl").stdout.splitlines()]
    assert as_json == as_jsonl
    assert as_json[0]["value"] is True and as_json[0]["attempts"] == 1
    assert (
        as_json[0]["parked_at"] == rows[0]["parked_at"] and as_json[0]["last_error"] == rows[0]["last_error"]
    )

    table = run(path, "failures")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["audience", "user_id", "value", "attempts", "parked_at", "last_error"]
    # Piped, a table cuts nothing (tests/test_cli_tables.py: a terminal's).
    assert re.fullmatch(rf"segment_a +u2 +true +1 +{HUMAN_TIME}  HTTP 422: unprocessable entity", lines[1])
    assert table.stderr == "1 parked change(s); re-queue with `audiencesync retry`\n"


def test_failures_with_none_parked(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, token=None)
    assert run(config.path, "sync", token=TOKEN).returncode == 0
    assert json.loads(run(config.path, "failures", "--format", "json").stdout) == []
    assert run(config.path, "failures", "--format", "jsonl").stdout == ""
    assert run(config.path, "failures", "--format", "csv").stdout.splitlines() == [
        "audience,user_id,value,attempts,parked_at,last_error"
    ]
    assert run(config.path, "failures").stdout.split() == [
        "audience", "user_id", "value", "attempts", "parked_at", "last_error"
    ]  # fmt: skip


PARKED_LINE = (
    "  parked: segment_a: 1 change(s) parked after repeated rejections by Gleap. Fix: audiencesync "
    "failures --audience segment_a, fix the cause, then audiencesync retry --audience segment_a"
)


def test_status_in_each_format(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
    path = sync_with_u2_parked(make_config, source, gleap).path

    as_csv = run(path, "status", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    (row,) = csv.DictReader(io.StringIO(as_csv.stdout))
    assert list(row) == [
        "audience", "condition", "members", "pending", "parked", "unknown", "oldest_pending", "last_run",
        "result", "entered", "left", "sent", "next_run", "configured", "events_pending", "events_parked",
        "kind", "fields_pending", "field_warnings", "field_conflicts", "state",
    ]  # fmt: skip
    assert (row["audience"], row["members"], row["pending"], row["parked"], row["unknown"]) == (
        "segment_a", "2", "0", "1", "0"
    )  # fmt: skip
    assert (row["result"], row["entered"], row["sent"], row["configured"]) == ("partial", "2", "1", "true")
    assert row["kind"] == "audience" and row["state"] == "live" and row["condition"] == "parked"
    assert re.fullmatch(MACHINE_TIME, row["last_run"]) and row["oldest_pending"] == ""
    assert row["next_run"] == ""  # no daemon planned one
    # The lease and the last prune go aside, not into the rows.
    # ...and what needs a person after them, with the fix (attention.py).
    assert as_csv.stderr.splitlines() == [
        "daemon: none holds the store", "last prune: none; all history is kept", "needs attention:",
        PARKED_LINE,
    ]  # fmt: skip

    (line,) = run(path, "status", "--format", "jsonl").stdout.splitlines()
    assert json.loads(line) == {
        **{k: v for k, v in row.items() if k not in ("members", "pending", "parked", "unknown")},
        "members": 2, "pending": 0, "parked": 1, "unknown": 0, "oldest_pending": None, "next_run": None,
        "entered": 2, "left": 0, "sent": 1, "configured": True, "events_pending": 0, "events_parked": 0,
        "fields_pending": 0, "field_warnings": 0, "field_conflicts": 0,
    }  # fmt: skip

    # json keeps its own shape: the audiences and the lease in one object.
    as_json = json.loads(run(path, "status", "--format", "json").stdout)
    assert set(as_json) == {"audiences", "retired", "lease", "last_prune", "daemon", "concerns"}
    assert as_json["lease"] is None and as_json["daemon"]["state"] == "no_daemon"
    (concern,) = as_json["concerns"]
    assert (concern["state"], concern["severity"], concern["subject"]) == ("parked", "action", "segment_a")
    assert as_json["audiences"][0]["condition"]["state"] == "parked"
    assert as_json["retired"] == [] and as_json["audiences"][0]["state"] == "live"
    assert as_json["audiences"][0]["key"] == "segment_a" and as_json["audiences"][0]["parked"] == 1

    table = run(path, "status")
    lines = table.stdout.splitlines()
    assert lines[0].startswith("audience   condition  members  pending  parked  unknown")
    assert re.match(r"segment_a +parked +2 +0 +1 +0 +", lines[1]), lines
    assert lines[-4:] == [
        "daemon: none holds the store", "last prune: none; all history is kept", "needs attention:",
        PARKED_LINE,
    ]  # fmt: skip
    assert lines[0].split() == list(row)[:-1] and table.stderr == ""  # piped: every column, no cut


def test_status_of_an_empty_store_is_still_well_formed(make_config: ConfigFactory) -> None:
    config = make_config(create_store=False)
    engine_url = config.store.url
    if engine_url.startswith("sqlite"):
        Path(engine_url.removeprefix("sqlite:///")).touch()  # a file, no schema yet
    as_json = run(config.path, "status", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        "audiences": [], "retired": [], "lease": None, "last_prune": None, "concerns": [],
        "daemon": {"state": "no_daemon", "severity": "neutral", "reason": "no daemon holds the store",
                   "action": attention.ACTIONS[attention.OVERDUE]},
    }  # fmt: skip
    assert "no sync has run yet" in as_json.stderr
    assert run(config.path, "status", "--format", "jsonl").stdout == ""


def test_dry_run_in_each_format(make_config: ConfigFactory, source: SourceDB) -> None:
    source.set(["u1", "u2"], "a")
    source.set(["u1", "u2", "u3"], "b")
    config = make_config(audiences=TWO_AUDIENCES)  # the token is in the config file
    expected = [
        {"call": 1, "user_id": "u1", "audience": "segment_a", "value": True},
        {"call": 1, "user_id": "u1", "audience": "segment_b", "value": True},
        {"call": 2, "user_id": "u2", "audience": "segment_a", "value": True},
        {"call": 2, "user_id": "u2", "audience": "segment_b", "value": True},
        {"call": 3, "user_id": "u3", "audience": "segment_b", "value": True},
    ]
    outputs = []
    for fmt in ("csv", "json", "jsonl", "table"):
        result = run(config.path, "sync", "--dry-run", "--format", fmt)
        assert result.returncode == 0, result.stderr
        assert (
            "dry run: 3 call(s) would be made (POST http://127.0.0.1:9/admin/identify?preventLastActivityUpdate=true)"
            in result.stderr
        )
        assert result.stderr.startswith("audience   result   mode")  # the summary table, on stderr
        outputs.append(result)
    as_csv, as_json, as_jsonl, table = outputs
    assert list(csv.DictReader(io.StringIO(as_csv.stdout))) == [
        {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in row.items()} for row in expected
    ]
    assert json.loads(as_json.stdout) == expected
    assert [json.loads(line) for line in as_jsonl.stdout.splitlines()] == expected
    assert table.stdout.splitlines() == [
        "call  user_id  audience   value",
        "1     u1       segment_a  true",
        "1     u1       segment_b  true",
        "2     u2       segment_a  true",
        "2     u2       segment_b  true",
        "3     u3       segment_b  true",
    ]
    for output in outputs:
        assert TOKEN not in output.stdout + output.stderr


def test_a_real_sync_writes_its_summary_in_the_format_asked(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    synced = sync_with_u2_parked(make_config, source, gleap, "--format", "csv")
    result = synced.result
    (row,) = csv.DictReader(io.StringIO(result.stdout))
    assert (row["audience"], row["result"], row["sent"], row["failed"], row["parked"]) == (
        "segment_a", "partial", "1", "1", "1"
    )  # fmt: skip
    assert "1 change(s) are parked" in result.stderr  # what is said about the rows goes aside
    assert TOKEN not in result.stdout + result.stderr

    table = run(synced.path, "sync", token=TOKEN).stdout.splitlines()
    assert table[0].split() == list(row) and table[1].startswith("segment_a  partial")


def test_members_at_a_span_and_a_bad_time(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, token=None)
    assert run(config.path, "sync", token=TOKEN).returncode == 0

    now = run(config.path, "audit", "members", "segment_a", "--at", "0s", "--format", "csv")
    assert now.returncode == 0 and [line.split(",")[0] for line in now.stdout.split()] == [
        "user_id",
        "u1",
        "u2",
    ]
    before = run(config.path, "audit", "members", "segment_a", "--at", "1w", "--format", "csv")
    assert before.returncode == 0 and before.stdout == "user_id,since\n"
    assert re.fullmatch(rf"0 member\(s\) of segment_a at {HUMAN_TIME}\n", before.stderr), before.stderr

    bad = run(config.path, "audit", "members", "segment_a", "--at", "2026-13-01")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (
        "audiencesync: error: --at '2026-13-01' is not a time. Fix: write ISO 8601 (2026-11-01, "
        "2026-11-01T12:00:00Z; no offset means UTC), a span before now (90m, 12h, 3d, 2w), or now\n"
    )
