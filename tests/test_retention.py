"""The daemon's retention (`[retention] keep`): once a day, bounded, never in delivery's way. Both stores.

The daemon runs in-process on a store clock the test moves a day at a time; the retention
thread looks every 50 ms, and the test waits on what it checks (its looks, the prunes rows).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config, load_config
from audiencesync.errors import ConfigError, iso_time
from audiencesync.lifecycle.prune import Pruner, PruneRecord
from audiencesync.store import store as store_mod
from audiencesync.store.schema import calls, membership_changes, prunes, sync_runs
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, wait_for
from tests.test_daemon_hardening import InProcess
from tests.test_outcomes import Clock

DAY = timedelta(days=1)
KEEP = 2 * DAY
RETENTION = '[retention]\nkeep = "2d"\n'
STAYING = [f"s{i}" for i in range(10)]


@pytest.fixture
def engine(store: store_mod.Store) -> sa.Engine:
    return store.engine


def daemon(config: Config, clock: Clock) -> InProcess:
    running = InProcess(config, clock=clock)
    running.core.retention.check_seconds = 0.05
    running.core.retention.error_backoff = (0.05, 0.1)
    return running


def finished(engine: sa.Engine) -> list[PruneRecord]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(prunes).where(prunes.c.finished_at.is_not(None)).order_by(prunes.c.id))
        return [PruneRecord(**r._mapping) for r in rows]


def oldest(engine: sa.Engine) -> dict[str, datetime | None]:
    with engine.connect() as conn:
        return {
            "changes": conn.execute(sa.select(sa.func.min(membership_changes.c.at))).scalar_one(),
            "calls": conn.execute(sa.select(sa.func.min(calls.c.at))).scalar_one(),
            "runs": conn.execute(
                sa.select(sa.func.min(sync_runs.c.finished_at)).where(
                    sync_runs.c.id.not_in(sa.select(sa.func.max(sync_runs.c.id)))
                )
            ).scalar_one(),
        }


def settle(gleap: GleapStandIn, members: list[str], gone: list[str]) -> None:
    def told() -> bool:
        contacts = gleap.contacts
        return all(contacts.get(u, {}).get("segment_a") is True for u in members) and all(
            contacts.get(u, {}).get("segment_a") is False for u in gone
        )

    wait_for(told, timeout=60, what="the day's churn to reach Gleap")


def wait_looks(running: InProcess, more: int = 3) -> None:
    """Let the retention thread look ``more`` times (it would prune on any of them if due)."""
    looks = running.core.retention.looks
    wait_for(lambda: running.core.retention.looks >= looks + more, what="the retention thread to look")


def test_the_daemon_prunes_once_a_day_and_the_store_stays_bounded(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, engine: sa.Engine
) -> None:
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE + RETENTION)
    clock = Clock()
    clock.now -= timedelta(days=30)
    today: list[str] = []
    with daemon(config, clock) as running:
        for day in range(7):
            if day:
                clock.advance(DAY.total_seconds())
            wait_for(lambda day=day: len(finished(engine)) == day + 1, what=f"day {day}'s prune")  # type: ignore[misc]
            wait_looks(running)
            assert len(finished(engine)) == day + 1, "pruned twice within 24 h"
            last = finished(engine)[-1]
            assert last.by == "daemon" and last.before == last.started_at - KEEP
            # Bounded: nothing older than `keep` is left (nothing here is held).
            for table, at in oldest(engine).items():
                assert at is None or at >= clock.now - KEEP, (day, table)
            # The day's churn: five enter, yesterday's five leave (ten stay, below the removal guard).
            gone, today = today, [f"d{day}-{i}" for i in range(5)]
            source.set(STAYING + today)
            settle(gleap, STAYING + today, gone)
        metrics = running.core.metrics.registry
        assert metrics.get_sample_value("audiencesync_pruned_rows_total", {"table": "membership_changes"})
        assert metrics.get_sample_value("audiencesync_last_prune_timestamp_seconds") == pytest.approx(
            finished(engine)[-1].finished_at.timestamp()  # type: ignore[union-attr]
        )
        assert metrics.get_sample_value("audiencesync_prune_failures_total") == 0
    with engine.connect() as conn:
        changes = conn.execute(sa.select(sa.func.count()).select_from(membership_changes)).scalar_one()
    assert changes <= 10 * 3  # at most three days of churn (a day's prune keeps two days back)
    # (The ten staying members' entries are gone too: members now need no history.)

    # A restart on the same day does not prune again: the prunes table says when it last did.
    with daemon(config, clock) as restarted:
        wait_looks(restarted)
        assert len(finished(engine)) == 7
        clock.advance(DAY.total_seconds())
        wait_for(lambda: len(finished(engine)) == 8, what="the next day's prune")


def test_a_failing_prune_is_logged_counted_and_retried_while_delivery_goes_on(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE + RETENTION)
    clock = Clock()
    running = daemon(config, clock)
    pruner = running.core.retention.pruner
    real_prune = pruner.prune
    failures: list[datetime] = []

    def flaky(before: datetime, **kwargs: Any) -> Any:
        if len(failures) < 2:
            failures.append(before)
            raise sa.exc.OperationalError("DELETE FROM calls", {}, Exception("database is locked"))
        return real_prune(before, **kwargs)

    monkeypatch.setattr(pruner, "prune", flaky)
    caplog.set_level(logging.ERROR, "audiencesync.daemon.retention")
    source.set(["u1", "u2"])
    with running:
        wait_for(lambda: len(finished(engine)) == 1, what="the prune after two failures")
        settle(gleap, ["u1", "u2"], [])
        metrics = running.core.metrics.registry
        assert metrics.get_sample_value("audiencesync_prune_failures_total") == 2
    assert len(failures) == 2
    assert f"retention: pruning the history before {iso_time(failures[0])} failed" in caplog.text
    assert "database is locked" in caplog.text and "retrying in" in caplog.text
    assert not any(r.exc_info for r in caplog.records)  # a locked store is foreseen: no traceback


def test_retention_is_off_by_default(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, engine: sa.Engine
) -> None:
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE)
    assert config.retention.keep_seconds is None
    source.set(["u1"])
    with daemon(config, Clock()) as running:
        settle(gleap, ["u1"], [])
        wait_looks(running)
    assert Pruner(engine, store_mod.utc_now).last() is None


BASE = """
[store]
url = "sqlite:///store.db"
[sources.w]
url = "sqlite:///source.db"
"""


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('[retention]\nkeep = "90d"\n', 90 * 86400.0),
        ('[retention]\nkeep = "2w"\n', 14 * 86400.0),
        ('[retention]\nkeep = "1d"\n', 86400.0),
        ("[retention]\n", None),
        ("", None),
    ],
)
def test_retention_settings(tmp_path: Path, table: str, expected: float | None) -> None:
    path = tmp_path / "audiencesync.toml"
    path.write_text(BASE + table)
    assert load_config(path).retention.keep_seconds == expected


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('[retention]\nkeep = "23h"\n', ["[retention].keep", "less than a day", 'keep = "90d"']),
        ('[retention]\nkeep = "90 days"\n', ["[retention].keep", "is not a duration", '"3d"']),
        ("[retention]\nkeep = 90\n", ["[retention].keep", "must be a string, not an integer"]),
        ('[retention]\nkeeep = "90d"\n', ["[retention]", "did you mean 'keep'"]),
    ],
)
def test_retention_settings_are_validated(tmp_path: Path, table: str, expected: list[str]) -> None:
    path = tmp_path / "audiencesync.toml"
    path.write_text(BASE + table)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for fragment in [str(path), *expected]:
        assert fragment in str(info.value)
