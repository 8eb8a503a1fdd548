"""The audit scenario's store (tests/audit_scenario.py, six cycles), and two cycles more in which
segment_b gains a user whose id is HTML and whom Gleap rejects with HTML in its answer, until parked.

What the pages must show of it is spelt out here, once, for the page tests and the browser's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from audiencesync.config.loading import Config
from tests import audit_scenario as s
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_outcomes import Clock, cycle

HTML_ID = "<script>alert(1)</script>"
HTML_ERROR = "<img src=x onerror=alert(2)> no such user"
T7, T8 = s.T[6] + timedelta(hours=1), s.T[6] + timedelta(hours=2)

# Members after each of the eight cycles: one point per applied refresh on the charts.
MEMBERS_A = [3, 3, 3, 4, 3, 3, 3, 3]
MEMBERS_B = [2, 2, 2, 2, 2, 1, 2, 2]
NOW = {"segment_a": 3, "segment_b": 2}
PARKED = {"segment_a": ["u3"], "segment_b": [HTML_ID]}


@dataclass(frozen=True)
class WebScenario:
    config: Config
    runs: int  # sync_runs rows: one per audience and cycle


def play(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> WebScenario:
    played = s.play(make_config, source, gleap)
    clock = Clock()
    source.set(["u8", HTML_ID], "b")
    gleap.fail_user(HTML_ID, 422, body=HTML_ERROR)  # max_attempts = 2: parked at the second
    for at in (T7, T8):
        clock.now = at
        cycle(played.config, clock)
    return WebScenario(played.config, runs=16)
