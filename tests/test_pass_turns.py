"""Audiences take turns from a different one each delivery pass, so that passes ended early by
new work (a refresh) don't keep one audience's changes behind another's long first sync.

test_daemon's long-first-sync test timed out under load: refreshes a second or two apart ended
every pass before the big audience's first page had gone out, and the next pass started the
turns with it again. Here every answer ends the pass (as such a refresh would), on any machine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import httpx

from tests.conftest import ConfigFactory, SourceDB
from tests.test_daemon import SYNC, wait_for
from tests.test_daemon_hardening import InProcess
from tests.test_sync import TWO_AUDIENCES

# Only the refreshes at start: the test makes the next one itself.
SCHEDULE = '[schedule]\ninterval = "1h"\nshutdown_grace_seconds = 5\n'


class CuttingGleap(httpx.AsyncBaseTransport):
    """Acknowledges every identify, and with each answer ends the pass (``cut``)."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.cut: Callable[[], None] = lambda: None
        self._lock = threading.Lock()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        user = json.loads(await request.aread())["userId"]
        with self._lock:
            self.users.append(user)
        self.cut()
        return httpx.Response(200, json={})

    def sent(self) -> list[str]:
        with self._lock:
            return list(self.users)


def test_an_audience_behind_a_long_first_sync_goes_first_in_a_pass_soon(
    make_config: ConfigFactory, source: SourceDB
) -> None:
    big = [f"big{i:03d}" for i in range(120)]
    source.set(big, "a")
    gleap = CuttingGleap()
    config = make_config("http://127.0.0.1:9", sync=SYNC, extra=SCHEDULE, audiences=TWO_AUDIENCES)
    running = InProcess(config, transport=gleap)
    gleap.cut = running.core.wake.set  # what a refresh that adds changes does
    with running as daemon:
        wait_for(lambda: len(gleap.sent()) >= 8, what="the big first sync to be under way")
        source.set(["s1"], "b")
        assert daemon.core._refresh("segment_b") is not None
        before = len(gleap.sent())
        wait_for(lambda: "s1" in gleap.sent(), what="the small audience's change")
        sent = gleap.sent()
    # The pass under way, at most one more that the big audience opened, then one the small
    # one opened: a few calls each (max_concurrency), not the rest of the big first sync.
    between = sent.index("s1") - before
    assert between <= 3 * config.gleap.max_concurrency, sent
    assert len(set(sent) & set(big)) < len(big)
