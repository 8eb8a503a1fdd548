"""A store written by a scripted sequence of real cycles at controlled times, and what it must answer.

Six cycles, one an hour from T[1], against the loopback Gleap stand-in:

| cycle | segment_a                          | segment_b | Gleap                                   |
|-------|------------------------------------|-----------|-----------------------------------------|
| 1     | u1 u2 u3                           | u1 u8     | acknowledges everything                 |
| 2     | u2 u3 u4 (u1 left, u4 entered)     |           | u4: 503 for every retry (unknown)       |
| 3     | (no change)                        |           | u4 acknowledged on this later run       |
| 4     | u1 u2 u4 u6 (u1 back, u3 left, u6) |           | u3: 422 "bad user"; u6: 503s (unknown)  |
| 5     | u1 u2 u4 (u6 left)                 |           | u3: 422 again, so parked; u6's false ok |
| 6     | u1 u4 u5 (u2 left, u5 entered)     | u8        | u5: 400 once (failed, still pending)    |

Every write of the store and every call in the log take the clock's time, so each
instant below is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.store import store as store_mod
from audiencesync.store.schema import audiences, sync_runs
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_outcomes import Clock, cycle
from tests.test_sync import TWO_AUDIENCES

A, B = "segment_a", "segment_b"
BASE = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
T = {k: BASE + timedelta(hours=k) for k in range(1, 7)}  # when cycle k ran


def half_past(k: int) -> datetime:
    return T[k] + timedelta(minutes=30)


SOURCE = {
    1: ({"u1", "u2", "u3"}, {"u1", "u8"}),
    2: ({"u2", "u3", "u4"}, {"u1", "u8"}),
    3: ({"u2", "u3", "u4"}, {"u1", "u8"}),
    4: ({"u1", "u2", "u4", "u6"}, {"u1", "u8"}),
    5: ({"u1", "u2", "u4"}, {"u1", "u8"}),
    6: ({"u1", "u4", "u5"}, {"u8"}),
}

# Members of segment_a at chosen instants: before anything, exactly at a cycle, between cycles.
MEMBERS_AT = {
    BASE: set(),
    T[1]: {"u1", "u2", "u3"},
    half_past(1): {"u1", "u2", "u3"},
    T[2]: {"u2", "u3", "u4"},
    half_past(3): {"u2", "u3", "u4"},
    half_past(4): {"u1", "u2", "u4", "u6"},
    half_past(5): {"u1", "u2", "u4"},
    half_past(6): {"u1", "u4", "u5"},
}

# When each member at half past cycle 4 entered: the entry before that instant.
SINCE_AT_HALF_PAST_4 = {"u1": T[4], "u2": T[1], "u4": T[2], "u6": T[4]}

# (from, to) -> (entered, left) of segment_a, net.
DIFFS = {
    (half_past(1), half_past(6)): ({"u4", "u5"}, {"u2", "u3"}),
    (half_past(3), half_past(5)): ({"u1"}, {"u3"}),
    (T[1], T[2]): ({"u4"}, {"u1"}),
    (half_past(2), half_past(3)): (set(), set()),
}

# Each change of segment_a's users: (user, change, cycle, delivery_state, acknowledged in cycle).
CHANGES = [
    ("u1", "entered", 1, "acknowledged", 1),
    ("u1", "left", 2, "acknowledged", 2),
    ("u1", "entered", 4, "acknowledged", 4),
    ("u3", "entered", 1, "acknowledged", 1),
    ("u3", "left", 4, "parked", None),
    ("u4", "entered", 2, "acknowledged", 3),
    ("u5", "entered", 6, "failed", None),
    ("u6", "entered", 4, "superseded", None),
    ("u6", "left", 5, "acknowledged", 5),
]

# Every request the log holds for u4 and u6 in segment_a: (cycle, value, attempt, status, outcome).
CALLS = {
    "u4": [(2, True, n, 503, "unknown") for n in (1, 2, 3, 4)] + [(3, True, 1, 200, "acknowledged")],
    "u6": [(4, True, n, 503, "unknown") for n in (1, 2, 3, 4)] + [(5, False, 1, 200, "acknowledged")],
    "u3": [(1, True, 1, 200, "acknowledged"), (4, False, 1, 422, "rejected"), (5, False, 1, 422, "rejected")],
}


@dataclass(frozen=True)
class Scenario:
    config: Config
    runs: dict[tuple[int, str], int]  # (cycle, audience key) -> run id


def play(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> Scenario:
    config = make_config(
        gleap.base_url,
        audiences=TWO_AUDIENCES,
        sync='retry_backoff = "0s"\nmax_attempts = 2\nmax_removal_fraction = 0.9',
    )
    clock = Clock()
    faults: dict[int, list[tuple[str, int, str, int | None]]] = {
        2: [("u4", 503, "", 4)],
        4: [("u3", 422, "bad user", None), ("u6", 503, "", 4)],
        6: [("u5", 400, "unknown user id", 1)],
    }
    for k, (a, b) in SOURCE.items():
        clock.now = T[k]
        source.set(sorted(a), "a")
        source.set(sorted(b), "b")
        if k == 6:
            gleap.clear_faults()
        for user, status, body, times in faults.get(k, []):
            gleap.fail_user(user, status, body=body, times=times)
        cycle(config, clock)
    engine = store_mod.engine_for(config.store)
    with engine.connect() as conn:
        started = conn.execute(
            sa.select(audiences.c.key, sync_runs.c.id, sync_runs.c.started_at).join(
                audiences, audiences.c.id == sync_runs.c.audience_id
            )
        ).all()
    engine.dispose()
    cycles = {at: k for k, at in T.items()}
    return Scenario(config, {(cycles[at], key): run_id for key, run_id, at in started})
