"""A daemon's run that the next refresh takes over while its calls are out closes with their
verdict: ``aborted`` when Gleap refused them, not ``partial`` as if nothing were known yet.

Closed at once by the refresh, the first run of a daemon whose token Gleap refuses ended
``partial`` whenever the refresh came before the first 401 (test_attention_surfaces failed so
under load). Here every request waits until the test lets it through, so the refresh comes
while the calls are out on every machine, loaded or not.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import httpx
import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.daemon.scheduler import Daemon as DaemonCore
from audiencesync.delivery import deliverer as deliverer_mod, field_winners
from audiencesync.errors import GleapAuthError
from tests.conftest import ConfigFactory, SourceDB
from tests.test_daemon import SYNC, wait_for
from tests.test_daemon_hardening import InProcess

# Only the refresh at start: the test makes the next one itself.
SCHEDULE = '[schedule]\ninterval = "1h"\nshutdown_grace_seconds = 5\n'


class HeldGleap(httpx.AsyncBaseTransport):
    """Every request waits for ``answer``, then gets ``status``; ``answered`` counts them by status."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.arrivals = 0
        self._arrived = threading.Condition()
        self.answer = threading.Event()
        self.answered: Counter[int] = Counter()

    def wait_arrived(self, count: int) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: self.arrivals >= count, 60)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with self._arrived:
            self.arrivals += 1
            self._arrived.notify_all()
        await asyncio.to_thread(self.answer.wait, 60)
        status = self.status
        self.answered[status] += 1
        return httpx.Response(status, json={})


def statuses(config: Config) -> dict[int, str]:
    engine = sa.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT run_id, status FROM run_history"))
            return {int(run_id): str(status) for run_id, status in rows}
    finally:
        engine.dispose()


def refused(core: DaemonCore) -> bool:
    failing = core.attention().failing
    return failing is not None and failing.state == "token_refused"


@pytest.mark.parametrize(("answer", "ends"), [(401, "aborted"), (200, "succeeded")])
def test_a_run_taken_over_while_its_calls_are_out_closes_with_their_verdict(
    make_config: ConfigFactory, source: SourceDB, answer: int, ends: str
) -> None:
    source.set(["u1", "u2"])
    gleap = HeldGleap(answer)
    config = make_config("http://127.0.0.1:9", sync=SYNC, extra=SCHEDULE)
    with InProcess(config, transport=gleap) as daemon:
        core = daemon.core
        # Both calls out (4 senders, 2 users): the refresh below ends the pass, and a call not
        # sent yet would stay pending (the run then "partial" whatever Gleap answers).
        assert gleap.wait_arrived(2), "the first run's calls never went out"
        [first] = statuses(config)
        assert core._refresh("segment_a") is not None  # the next refresh, while the calls are out
        # Taken over, but its calls have no verdict yet: still open.
        assert statuses(config)[first] == "running"
        gleap.answer.set()
        wait_for(lambda: statuses(config)[first] != "running", what="the run taken over to close")
        assert statuses(config)[first] == ends


def test_calls_that_got_no_verdict_do_not_end_a_refused_token(
    make_config: ConfigFactory, source: SourceDB
) -> None:
    """Gleap refused the token; then a pass's calls all get a 503 (retries spent, too few for the
    breaker): nothing says Gleap takes the token now. A run closed after that pass still ends
    "aborted" with the reason, not "partial" as after calls Gleap acknowledged (the pass's count
    of calls made, not of calls acknowledged, decided before)."""
    source.set(["u1", "u2"])
    gleap = HeldGleap(401)
    gleap.answer.set()
    config = make_config("http://127.0.0.1:9", sync=SYNC, extra=SCHEDULE)
    with InProcess(config, transport=gleap) as daemon:
        core = daemon.core
        # The token_refused condition is written after the refusing pass closed what it had to
        # (delivery_loop): the refresh below comes after that pass, every time.
        wait_for(lambda: refused(core), what="the token_refused condition")
        assert isinstance(core.blocked, GleapAuthError)
        [first] = statuses(config)
        gleap.status = 503
        # The next refresh takes over from the first run, which closes after the next pass.
        assert core._refresh("segment_a") is not None
        wait_for(lambda: statuses(config)[first] != "running", what="the run taken over to close")
        assert gleap.answered[503] >= 2  # that pass made its calls, and got no verdict
        assert statuses(config)[first] == "aborted"


def test_a_run_taken_over_before_gleap_answered_anything_waits_for_a_verdict(
    make_config: ConfigFactory, source: SourceDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass that took the first run ends before any call went out (new work came first):
    nothing is known of the token yet, so the run taken over meanwhile waits for the next
    pass's 401 rather than close "partial" (the refused-token tests failed so once more)."""
    source.set(["u1", "u2"])
    gleap = HeldGleap(401)
    gleap.answer.set()
    config = make_config("http://127.0.0.1:9", sync=SYNC, extra=SCHEDULE)
    running = InProcess(config, transport=gleap)
    core = running.core
    under_way, taken_over = threading.Event(), threading.Event()
    reconcile = field_winners.reconcile

    def first_pass_cut_short(*args: object, **kwargs: object) -> None:
        if not under_way.is_set():  # the first pass with a run, before it plans a call
            core.wake.set()  # new work, as a refresh brings: the pass ends with no call made
            under_way.set()
            assert taken_over.wait(60)
        reconcile(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(deliverer_mod, "reconcile", first_pass_cut_short)
    with running:
        assert under_way.wait(60), "no pass took the first run"
        [first] = statuses(config)
        assert core._refresh("segment_a") is not None  # takes over while that pass is under way
        taken_over.set()
        wait_for(lambda: statuses(config)[first] != "running", what="the run taken over to close")
        assert gleap.answered[401] >= 1
        assert statuses(config)[first] == "aborted"
