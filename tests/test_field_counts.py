"""Contact fields counted everywhere a run's counts are: the summary, the dry run, sync_runs and
run_history, `audit runs`, `status` and /metrics, for `sync` and the daemon, on both stores."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.daemon.metrics import Metrics
from audiencesync.store import store as store_mod
from audiencesync.store.store import Store
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_cli import run
from tests.test_contact_fields import audience, people
from tests.test_daemon import SCHEDULE, SYNC, members_true, wait_for
from tests.test_daemon_hardening import InProcess
from tests.test_sync import cycle, only

# u1 is in both: Silver's email loses to Gold's (a conflict, Silver's). u2's value is text (a warning).
ROWS: list[dict[str, Any]] = [
    {"user_id": "u1", "segment": "a", "email": "first@x.io"},
    {"user_id": "u1", "segment": "b", "email": "second@x.io", "value": 5},
    {"user_id": "u2", "segment": "b", "email": "b@x.io", "value": "lots"},
]
AUDIENCES = audience("Gold", "user_id, email", "a") + audience("Silver", "user_id, email, value", "b")


def runs(config: Config) -> dict[str, dict[str, object]]:
    """The last run of each audience, as the run_history view shows it."""
    engine = sa.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM run_history ORDER BY run_id")).mappings().all()
    finally:
        engine.dispose()
    return {str(row["audience_key"]): dict(row) for row in rows}


def test_a_sync_counts_field_warnings_and_conflicts_in_every_report(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(source, ROWS)
    config = make_config(gleap.base_url, audiences=AUDIENCES)

    planned = cycle(config, dry_run=True)
    assert (only(planned, "silver").field_warnings, only(planned, "silver").field_conflicts) == (1, 1)
    assert (only(planned, "gold").field_warnings, only(planned, "gold").field_conflicts) == (0, 0)

    report = cycle(config)
    silver = only(report, "silver")
    assert (silver.field_warnings, silver.field_conflicts) == (1, 1)
    assert "field_warnings=1 field_conflicts=1" in silver.summary()
    last = runs(config)
    assert (last["silver"]["field_warnings"], last["silver"]["field_conflicts"]) == (1, 1)
    assert (last["gold"]["field_warnings"], last["gold"]["field_conflicts"]) == (0, 0)
    assert last["silver"]["events_sent"] == 0 and last["silver"]["events_failed"] == 0

    audited = run(config.path, "audit", "runs", "--audience", "silver", "--format", "json")
    assert audited.returncode == 0, audited.stderr
    (audited_run,) = json.loads(audited.stdout)
    assert (audited_run["field_warnings"], audited_run["field_conflicts"]) == (1, 1)

    status = run(config.path, "status", "--format", "csv")
    rows = {row["audience"]: row for row in csv.DictReader(io.StringIO(status.stdout))}
    assert (rows["silver"]["field_warnings"], rows["silver"]["field_conflicts"]) == ("1", "1")
    assert (rows["silver"]["fields_pending"], rows["gold"]["field_conflicts"]) == ("0", "0")
    as_json = json.loads(run(config.path, "status", "--format", "json").stdout)
    silver_json = next(a for a in as_json["audiences"] if a["key"] == "silver")
    assert silver_json["last_run"]["field_conflicts"] == 1 and silver_json["fields_pending"] == 0

    engine = store_mod.create_engine(config.store.url)
    try:
        metrics = Metrics(Store(engine).status)
        value = metrics.registry.get_sample_value
        assert value("audiencesync_last_run_field_conflicts", {"audience": "silver"}) == 1
        assert value("audiencesync_last_run_field_warnings", {"audience": "silver"}) == 1
        assert value("audiencesync_last_run_field_conflicts", {"audience": "gold"}) == 0
    finally:
        engine.dispose()

    # Nothing changed: the read still skips u2's value, and no call means no conflict.
    again = run(config.path, "sync", "--format", "csv", token=TOKEN)
    assert again.returncode == 0, again.stderr
    summary = {row["audience"]: row for row in csv.DictReader(io.StringIO(again.stdout))}
    assert (summary["silver"]["field_warnings"], summary["silver"]["field_conflicts"]) == ("1", "0")
    assert (runs(config)["silver"]["field_warnings"], runs(config)["silver"]["field_conflicts"]) == (1, 0)


def test_a_conflict_counts_when_gleap_acknowledges_its_call_not_when_it_is_planned(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """Counted as calls were planned, a conflict whose call was refused (or never sent: a pass
    ended early by new work) counted again in the run that sent it once more."""
    people(source, ROWS)
    config = make_config(gleap.base_url, audiences=AUDIENCES)
    gleap.set_token("a-token-rotated-in-gleap")
    refused = only(cycle(config), "silver")
    assert (refused.status, refused.field_conflicts) == ("aborted", 0)
    gleap.set_token(TOKEN)
    assert only(cycle(config), "silver").field_conflicts == 1
    assert sum(int(str(r["field_conflicts"])) for r in _silver_runs(config)) == 1


def test_the_daemon_stores_the_conflicts_of_its_delivery_in_the_run(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """The conflict of Silver's call for u1 is counted once, in the run its answer went into.

    Gold's row goes out first, before Silver has any: both at once, Silver's first refresh
    could be planned before Gold's was applied (no conflict in its call; the one of Gold's
    call then counted only if Silver had a run open in that pass). Which run records a call
    is not fixed either: a refresh every 2-3 s can take over from Silver's first run before
    its pass ends (failed under load as 3 == 2, 0 == 1: a later run, or the conflict in it).
    """
    people(source, ROWS[:1])
    config = make_config(gleap.base_url, audiences=AUDIENCES, sync=SYNC, extra=SCHEDULE)
    with InProcess(config) as running:
        wait_for(lambda: gleap.contacts.get("u1", {}).get("email") == "first@x.io", what="Gold's u1")
        people(source, ROWS)
        wait_for(lambda: members_true(gleap, "silver") == {"u1", "u2"}, what="Silver's members")
        value = running.core.metrics.registry.get_sample_value
        wait_for(
            lambda: value("audiencesync_last_run_field_warnings", {"audience": "silver"}) is not None,
            what="the gauges",
        )
    # Stopped: every pass has ended and stored its counts, every run is closed.
    silver_runs = _silver_runs(config)
    assert sum(int(str(r["field_conflicts"])) for r in silver_runs) == 1  # once, however many passes
    [counted] = [r for r in silver_runs if r["field_conflicts"]]
    # The run that recorded Silver's answers (a refresh's, which read u2's text value: a warning).
    assert counted["sent"] and counted["field_warnings"] == 1
    assert gleap.contacts["u1"]["email"] == "first@x.io"


def _silver_runs(config: Config) -> list[dict[str, object]]:
    engine = sa.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT * FROM run_history WHERE audience_key = 'silver' ORDER BY run_id")
            ).mappings()
            return [dict(row) for row in rows]
    finally:
        engine.dispose()
