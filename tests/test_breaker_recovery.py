"""Delivery after a Gleap outage (issue 22): the half-open breaker's trial calls decide, against the
stand-in, on both stores. A soak with Gleap answering 10% 5xx after an outage kept delivery
paused for 22 minutes when the probe reopened on any failure; here it must resume at once."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import timedelta
from types import SimpleNamespace
from typing import cast

import pytest

from audiencesync.config.loading import Config, GleapConfig
from audiencesync.daemon.health import DaemonHealth
from audiencesync.daemon.health_report import Outage
from audiencesync.delivery.identify_calls import Call
from audiencesync.errors import GleapUnavailableError
from audiencesync.gleap.breaker import CLOSED, CircuitBreaker, Trials
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.store.store import PendingChange, Store
from audiencesync.sync.cycle import Syncer
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, members_true, wait_for
from tests.test_daemon_hardening import InProcess
from tests.test_outcomes import cycle, last_run

MEMBERS = [f"u{i:03d}" for i in range(60)]


def _probe_pass(config: Config, breaker: CircuitBreaker) -> int:
    """One delivery pass of everything pending, with this breaker (the daemon's probe pass)."""
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01)
    try:
        run = syncer.delivery_run(config.active[0], "probe")
        deliverer = syncer.deliverer()
        deliverer.breaker = breaker
        audience = run.audience
        return asyncio.run(deliverer.drain([audience.id], {audience.id: audience.key}, lambda _: run.run_id))
    finally:
        syncer.sources.dispose()
        engine.dispose()


def _pending_after_an_outage(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> Config:
    source.set(MEMBERS)
    config = make_config(gleap.base_url, extra_gleap="breaker_failures = 5")
    gleap.fail_next(1_000_000, 503)
    assert isinstance(cycle(config).aborted, GleapUnavailableError)  # everything still pending
    gleap.clear_faults()
    gleap.reset_log()
    return config


def test_a_probe_pass_with_a_tenth_of_calls_failing_closes_and_delivers_everything(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    config = _pending_after_an_outage(make_config, source, gleap)
    gleap.fail_every(10, 500)
    breaker = CircuitBreaker.probing(5, Trials(10, 0.5))
    calls = _probe_pass(config, breaker)
    assert breaker.state == CLOSED and breaker.verdict is not None and breaker.verdict[0] <= 1
    assert calls == len(MEMBERS) and members_true(gleap) == set(MEMBERS)
    assert any(r.status == 500 for r in gleap.requests)  # the failures were there, and retried


def test_a_probe_pass_while_gleap_is_still_down_sends_no_more_than_the_trial_calls(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    config = _pending_after_an_outage(make_config, source, gleap)
    gleap.fail_next(1_000_000, 503)
    breaker = CircuitBreaker.probing(5, Trials(4, 0.5))
    with pytest.raises(GleapUnavailableError, match=r"of [1-4] trial calls after an outage"):
        _probe_pass(config, breaker)
    # The other senders waited for the verdict, then went home: Gleap is not flooded.
    assert breaker.is_open and 3 <= len(gleap.requests) <= 4
    engine = store_mod.engine_for(config.store)
    assert Store(engine).status()[0].pending == len(MEMBERS)
    engine.dispose()


def _daemon_with_gleap_down(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, caplog: pytest.LogCaptureFixture
) -> Config:
    """A daemon's config, its audience's members all pending, and Gleap answering 503 to all."""
    caplog.set_level(logging.INFO, logger="audiencesync")
    source.set(MEMBERS)
    gleap.fail_next(1_000_000, 503)
    return make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE, extra_gleap="breaker_failures = 5")


def test_the_daemon_resumes_mid_pass_after_an_outage_with_a_tenth_of_calls_failing(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    config = _daemon_with_gleap_down(make_config, source, gleap, caplog)
    with InProcess(config) as daemon:
        core = daemon.core
        state = core.metrics.registry.get_sample_value

        def reopened() -> int:
            return sum("still unavailable" in r.getMessage() for r in caplog.records)

        wait_for(lambda: reopened() >= 1, what="a probe that found Gleap still down")
        assert members_true(gleap) == set()
        before = reopened()
        # Gleap answers again, a tenth of its calls failing; past the first 20 answers every call
        # is held unanswered, so the pass that resumed delivery is still going on.
        gleap.clear_faults()
        gleap.fail_every(10, 500)
        gleap.hold(after=20)
        assert gleap.wait_held(1), "no call of the resumed pass reached Gleap"
        # The trials closed the breaker mid-pass: every surface says so before the pass ends.
        wait_for(lambda: not core.outage.open, what="the outage to end while the pass goes on")
        wait_for(lambda: core.attention().failing is None, what="the gleap_down condition to be resolved")
        assert (state("audiencesync_gleap_breaker_state"), state("audiencesync_gleap_breaker_open")) == (0, 0)
        gleap.release()
        wait_for(lambda: members_true(gleap) == set(MEMBERS), what="every change held back by the outage")
    # At most one probe was already under way when Gleap came back; none reopened it after.
    assert reopened() - before <= 1
    resumed = [r.getMessage() for r in caplog.records if r.name == "audiencesync.daemon.delivery_loop"]
    resumed = [m for m in resumed if "Gleap answers again" in m]
    assert len(resumed) == 1 and "trial calls failed" in resumed[0]
    # The run that delivered them ended well, not "aborted" by the outage it outlived.
    assert last_run(config)["status"] != "aborted"


def test_while_its_trial_calls_are_out_the_daemon_says_probing_not_paused() -> None:
    class Health(DaemonHealth):
        def __init__(self) -> None:
            self.config = cast(Config, SimpleNamespace(gleap=GleapConfig(breaker_trial_calls=4)))
            self.outage = Outage(store_mod.utc_now)
            self.scheduler = None
            # Renewed lately: the STATUS line goes on to Gleap's breaker (store_unwritable first).
            self.lease = cast(
                WriterLease, SimpleNamespace(failing=None, ttl=timedelta(seconds=60), valid_until=None)
            )

    daemon = Health()
    daemon.outage.trip("Gleap at http://gleap is failing", 15)
    reason = daemon._outage_reason()
    assert reason is not None and "circuit breaker open, next probe" in reason
    daemon.outage.probe()
    reason = daemon._outage_reason()
    assert (
        reason is not None and "probing (circuit breaker half-open" in reason and "50% of 4 trial" in reason
    )
    assert "Gleap at http://gleap is failing" in reason  # why it opened, still
    assert daemon._active_status() == (
        "active: Gleap was unavailable, probing with trial calls (circuit breaker half-open)"
    )
    daemon.outage.close()
    assert daemon._outage_reason() is None and not daemon.outage.probing


def test_while_delivery_waits_out_an_outage_nothing_of_the_failed_pass_is_kept(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    # The error of a pass that found Gleap down carries every frame of that pass (its pages of
    # changes, its calls, its client), and the wait for the next probe lasts minutes: kept through
    # it, each outage held a pass's working set while the rest of the daemon allocated beside it,
    # and the heap kept the high-water mark (issue 22, the soak's RSS).
    config = _daemon_with_gleap_down(make_config, source, gleap, caplog)
    with InProcess(config, breaker_backoff=(3600.0, 3600.0)) as daemon:
        wait_for(lambda: daemon.core.outage.open, what="the breaker to open")
        wait_for(lambda: daemon.core.blocked is not None, what="the pass's verdict")
        blocked = daemon.core.blocked
        assert isinstance(blocked, GleapUnavailableError) and "Gleap" in str(blocked)
        assert blocked.__traceback__ is None and blocked.__context__ is None

        def kept() -> list[str]:
            gc.collect()
            return [type(x).__name__ for x in gc.get_objects() if isinstance(x, PendingChange | Call)]

        # The loop is in its hour-long wait (or a moment away from it): the pass is gone.
        wait_for(lambda: not kept(), what="the failed pass's changes and calls to be freed")
        assert members_true(gleap) == set()
