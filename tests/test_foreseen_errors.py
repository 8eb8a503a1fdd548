"""A daemon loop's foreseen failure is one log line, with no traceback. Both stores.

A locked or unreachable store and the project's own errors say all there is in their
message: a traceback in the log for them reads as a crash to whoever runs the service
(the soak's target is none in hours of faults). What nobody foresaw still gets one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.errors import AudienceSyncError, foreseen
from audiencesync.store.lease_renewal import LeaseUnrenewedError
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, members_true, wait_for
from tests.test_daemon_hardening import InProcess

LOCKED = sa.exc.OperationalError("UPDATE memberships", {}, Exception("database is locked"))


def test_the_store_s_operational_errors_and_the_project_s_own_are_foreseen() -> None:
    assert foreseen(LOCKED)
    assert foreseen(AudienceSyncError("a source is empty"))
    assert not foreseen(KeyError("nobody foresaw this"))
    assert not foreseen(sa.exc.ProgrammingError("SELECT", {}, Exception("no such column")))


def failing_once(errors: list[BaseException], real: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if errors:
            raise errors.pop(0)
        return real(*args, **kwargs)

    return call


def test_a_delivery_pass_that_meets_a_locked_store_logs_a_line_and_delivers_after(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source.set(["u1", "u2"])
    running = InProcess(make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE))
    until = datetime(2026, 1, 1, tzinfo=UTC)
    errors: list[BaseException] = [LOCKED, LeaseUnrenewedError(until, None)]
    monkeypatch.setattr(running.core, "_drain", failing_once(errors, running.core._drain))
    caplog.set_level(logging.WARNING, "audiencesync.daemon.delivery_loop")
    with running:
        wait_for(lambda: members_true(gleap) == {"u1", "u2"}, timeout=60, what="delivery after the failures")
    records = {r.getMessage().split(":")[0]: r for r in caplog.records}
    failed = [r for r in caplog.records if r.getMessage().startswith("delivery failed")]
    assert [bool(r.exc_info) for r in failed] == [False]  # the first failure, yet no traceback
    assert "database is locked" in failed[0].getMessage()
    # Waiting on the lease's renewal is a pause, not a failure.
    paused = records["delivery paused"]
    assert paused.levelno == logging.WARNING and not paused.exc_info
    assert "no calls to Gleap until it is renewed" in paused.getMessage()


def test_a_refresh_that_meets_a_locked_store_logs_a_line(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source.set(["u1"])
    running = InProcess(make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE))
    real = running.core._refresh
    monkeypatch.setattr(running.core, "_refresh", failing_once([LOCKED, KeyError("a bug")], real))
    caplog.set_level(logging.ERROR, "audiencesync.daemon.refresh_jobs")
    running.core._refresh_job("segment_a")
    running.core._refresh_job("segment_a")
    failed = [r for r in caplog.records if r.getMessage().startswith("refreshing segment_a failed")]
    assert [bool(r.exc_info) for r in failed] == [False, True]
    assert "database is locked" in failed[0].getMessage()
