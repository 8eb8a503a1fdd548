"""Pausing a property (enabled = false): the config, a sync, the dry run, status and the daemon's
reload, against the loopback stand-in on both stores.

A paused property keeps its rows as they are; nothing refreshes it and no delivery pass carries
its rows, not even in another property's call. enabled = true resumes it where it left off.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import pytest

from audiencesync.config.loading import Config
from audiencesync.daemon.metrics import Metrics
from audiencesync.errors import AudiencePausedError, ConfigError
from audiencesync.store import store as store_mod
from audiencesync.store.store import Store
from audiencesync.sync.cycle import Syncer
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, Daemon, cli, daemons, free_port, healthz, wait_for
from tests.test_renames import rows
from tests.test_traits import cycle as sync

__all__ = ["daemons"]  # the daemon tests' fixture, used here too


def two(paused: bool = False) -> str:
    """Segment A (paused or not) and Segment B, both on the `members` table."""
    enabled = "\nenabled = false" if paused else ""
    return f"""
[[audiences]]
name = "Segment A"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'a'"{enabled}

[[audiences]]
name = "Segment B"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'b'"
"""


def refresh_only(config: Config, key: str) -> None:
    """A refresh with no delivery: its changes stay pending (as a cycle stopped before its calls)."""
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine))
    try:
        syncer.finish(syncer.refresh(config.audience(key), "cycle-refresh-only"))
    finally:
        syncer.sources.dispose()
        engine.dispose()


def by_user(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(calls, key=lambda body: body["userId"])


def test_config_reads_enabled(make_config: ConfigFactory) -> None:
    config = make_config(audiences=two(paused=True))
    a, b = config.audiences
    assert (a.enabled, b.enabled) == (False, True)
    assert [p.key for p in config.active] == ["segment_b"]
    with pytest.raises(AudiencePausedError) as caught:
        config.runnable("segment_a")
    assert "'segment_a' is paused (enabled = false)" in str(caught.value)
    assert "set enabled = true on 'segment_a'" in str(caught.value)
    with pytest.raises(ConfigError, match=r"enabled.*must be true or false"):
        make_config(audiences=two().replace("segment = 'a'\"", 'segment = \'a\'"\nenabled = "no"', 1))


def test_pause_keeps_the_rows_and_sends_nothing_then_resume_sends_only_what_changed(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"], "a")
    source.set(["u1"], "b")
    live = make_config(gleap.base_url, audiences=two())
    assert sync(live).complete
    # segment_a owes u3 its true when it is paused: a refresh whose calls never went out.
    source.set(["u1", "u2", "u3"], "a")
    refresh_only(live, "segment_a")
    before = rows(live, "segment_a")
    assert before["u3"] == (True, None)
    gleap.reset_log()

    paused = make_config(gleap.base_url, audiences=two(paused=True))
    source.set(["u1", "u3"], "a")  # u2 leaves while paused: nobody looks
    source.set(["u1", "u3"], "b")  # u3 gets segment_b: its call must not carry segment_a's owed true
    report = sync(paused)
    assert report.complete and [a.key for a in report.audiences] == ["segment_b"]
    assert gleap.identify_calls == [{"userId": "u3", "segment_b": True}]
    assert rows(paused, "segment_a") == before, "a paused audience's rows stay as they were"

    planned: list[Any] = []
    sync(paused, dry_run=True, show_calls=lambda calls: planned.extend(calls))
    assert planned == [], "the dry run plans nothing for a paused audience"
    with pytest.raises(AudiencePausedError):
        sync(paused, keys=["segment_a"])
    refused = cli(paused, "sync", "--audience", "segment_a")
    assert refused.returncode == 2 and "paused (enabled = false)" in refused.stderr, refused.stderr

    status = json.loads(cli(paused, "status", "--format", "json").stdout)
    states = {row["key"]: (row["state"], row["members"], row["pending"]) for row in status["audiences"]}
    assert states == {"segment_a": ("paused", 3, 1), "segment_b": ("live", 2, 0)}
    assert status["retired"] == []
    table = cli(paused, "status").stdout
    assert "\npaused (enabled = false" in table
    assert table.index("segment_b") < table.index("paused (") < table.index("segment_a")

    gleap.reset_log()
    resumed = make_config(gleap.base_url, audiences=two())
    report = sync(resumed)
    assert report.complete
    (a_report, _) = report.audiences
    assert a_report.mode == "incremental", "resuming is no full resync"
    assert by_user(gleap.identify_calls) == [
        {"userId": "u2", "segment_a": False},
        {"userId": "u3", "segment_a": True},
    ]
    assert rows(resumed, "segment_a") == {"u1": (True, True), "u3": (True, True)}


def test_metrics_label_a_paused_property(make_config: ConfigFactory, source: SourceDB) -> None:
    from audiencesync.lifecycle import states as lifecycle

    source.set(["u1"], "a")
    config = make_config(audiences=two())
    refresh_only(config, "segment_a")
    paused = make_config(audiences=two(paused=True))
    engine = store_mod.engine_for(paused.store)
    try:
        metrics = Metrics(Store(engine).status, states=lambda: lifecycle.states(paused))
        info = "audiencesync_property_info"
        labels = {"audience": "segment_a", "kind": "audience", "state": "paused"}
        assert metrics.registry.get_sample_value(info, labels) == 1
        assert (
            metrics.registry.get_sample_value("audiencesync_pending_changes", {"audience": "segment_a"}) == 1
        )
    finally:
        engine.dispose()


def test_the_daemon_pauses_and_resumes_on_reload_and_stays_healthy(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    port = free_port()
    extra = SCHEDULE + f'[server]\nlisten = "127.0.0.1:{port}"\n'
    source.set(["u1"], "a")
    source.set(["u7"], "b")
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=extra, audiences=two())
    daemon = daemons(config)
    wait_for(lambda: len(gleap.contacts) == 2, what="the first cycles")

    make_config(gleap.base_url, token=None, sync=SYNC, extra=extra, audiences=two(paused=True))
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "1 paused" in daemon.output, what="the reload")
    gleap.reset_log()
    source.set(["u1", "u2"], "a")  # not refreshed while paused
    source.set(["u7", "u8"], "b")
    wait_for(lambda: gleap.identify_calls == [{"userId": "u8", "segment_b": True}], what="segment_b's cycle")
    # Two intervals and more with segment_a never refreshed: not late, and not stalled.
    wait_for(lambda: daemon.output.count("segment_b: succeeded (incremental)") >= 3, what="later cycles")
    assert healthz(port) == "ok\n"
    status = json.loads(cli(config, "status", "--format", "json").stdout)
    paused = {row["key"]: row for row in status["audiences"]}["segment_a"]
    assert (paused["state"], paused["next_run_at"]) == ("paused", None)
    assert gleap.identify_calls == [{"userId": "u8", "segment_b": True}]

    make_config(gleap.base_url, token=None, sync=SYNC, extra=extra, audiences=two())
    daemon.process.send_signal(signal.SIGHUP)
    wait_for(lambda: {"userId": "u2", "segment_a": True} in gleap.identify_calls, what="the resumed cycle")
    assert "1 resumed" in daemon.output
    wait_for(lambda: "segment_a: succeeded (incremental)" in daemon.output, what="an incremental cycle")
    assert daemon.stop() == 0
    assert "(full)" not in daemon.output
