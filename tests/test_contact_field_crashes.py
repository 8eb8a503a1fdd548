"""Crash safety of contact fields: SIGKILL mid-delivery, then the next run converges within the re-send bound.

As tests/test_reliability.py does for memberships: a real `audiencesync sync`
is killed while Gleap (the loopback stand-in) holds calls unanswered, on a
first sync with fields and on a change of fields; the next run must leave
Gleap holding exactly the source's fields, and repeat at most the calls that
were in flight at the kill.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_contact_fields import audience, people
from tests.test_reliability import resend_bound, resent, start, sync

TOKEN_ENV = {"GLEAP_API_TOKEN": TOKEN}
SELECT = "user_id, email, plan, value, created_at, seats"


def rows(plan_of: dict[int, str]) -> list[dict[str, Any]]:
    return [
        {
            "user_id": f"u{i:04d}",
            "email": f"user{i}@example.com",
            "plan": plan,
            "value": i + 0.5,
            "created_at": f"2025-03-{1 + i % 28:02d} 09:30:00",
            "seats": i % 9,
        }
        for i, plan in plan_of.items()
    ]


def expected(plan_of: dict[int, str]) -> dict[str, dict[str, Any]]:
    """What Gleap must hold for each member: the audience's true and every field."""
    return {
        f"u{i:04d}": {
            "userId": f"u{i:04d}",
            "paying": True,
            "email": f"user{i}@example.com",
            "plan": plan,
            "value": i + 0.5,
            "createdAt": f"2025-03-{1 + i % 28:02d}T09:30:00.000Z",
            "seats": i % 9,
        }
        for i, plan in plan_of.items()
    }


def kill_mid_delivery(config: Config, gleap: GleapStandIn, after: int, earlier: int = 0) -> int:
    """Run a sync, and SIGKILL it once Gleap answered ``after`` calls and holds the next;
    returns how many calls the next run may send again (``earlier``: calls of earlier runs)."""
    gleap.hold(after=after)
    process = start(config, "sync", env=TOKEN_ENV)
    assert gleap.wait_held(1, timeout=60), "delivery never got past the calls Gleap answered"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert len(gleap.identify_calls) == after
    bound = resend_bound(config, earlier + after)
    gleap.release()  # the calls in flight at the kill reach Gleap after all
    gleap.clear_faults()
    return bound


def owed(config: Config) -> tuple[int, int]:
    """(pending, unknown) rows the store still holds."""
    engine = sa.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT sum(CASE WHEN pending THEN 1 ELSE 0 END), "
                    "sum(CASE WHEN unknown THEN 1 ELSE 0 END) FROM memberships"
                )
            ).one()
    finally:
        engine.dispose()
    return int(row[0] or 0), int(row[1] or 0)


@pytest.mark.parametrize("phase", ["first sync", "field change"])
def test_sigkill_mid_delivery_of_contact_fields_then_rerun_converges(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, phase: str
) -> None:
    before = {i: "free" for i in range(300)}
    people(source, rows(before))
    config = make_config(gleap.base_url, audiences=audience("Paying", SELECT), token=None)
    now = before
    if phase == "field change":
        assert sync(config, env=TOKEN_ENV).returncode == 0
        assert gleap.contacts == expected(before)
        gleap.reset_log()
        # 200 members change plan, 100 keep theirs: only the 200 are owed a call.
        now = {i: ("pro" if i < 200 else "free") for i in range(300)}
        people(source, rows(now))

    bound = kill_mid_delivery(config, gleap, after=60, earlier=0 if phase == "first sync" else len(before))
    acknowledged = {body["userId"]: body for body in gleap.identify_calls}

    rerun = sync(config, env=TOKEN_ENV)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert gleap.contacts == expected(now)
    assert owed(config) == (0, 0)
    # Only the calls whose answers were not recorded at the kill go out twice...
    assert resent(gleap) <= bound
    owed_calls = len(now) if phase == "first sync" else 200
    assert len(gleap.identify_calls) <= owed_calls + bound
    # ...and nothing acknowledged before the kill is lost or sent again with other values.
    for user_id, body in acknowledged.items():
        assert gleap.contacts[user_id] == body
    unchanged = {f"u{i:04d}" for i in range(200, 300)}
    if phase == "field change":
        assert not unchanged & {body["userId"] for body in gleap.identify_calls}
