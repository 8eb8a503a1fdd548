"""The analyst's questions, answered from a store that real cycles wrote (both databases)."""

from __future__ import annotations

import subprocess
import sys

import sqlalchemy as sa

from audiencesync import audit
from audiencesync.store import utc_now
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_sync import cycle


def test_history_and_members_at_a_past_time(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    config = make_config(gleap.base_url)
    source.set(["u1", "u2", "u3"])
    cycle(config)
    after_first = utc_now()
    source.set(["u2", "u3", "u4"])
    gleap.fail_user("u4", 400, body="bad id", times=1)
    cycle(config)
    after_second = utc_now()
    cycle(config)  # u4 again, accepted this time

    engine = sa.create_engine(store_url)
    try:
        events = [(e.kind, e.value, e.status) for e in audit.history(engine, "u1")]
        assert events == [
            ("entered", None, None),
            ("told", True, 200),
            ("left", None, None),
            ("told", False, 200),
        ]
        u4 = audit.history(engine, "u4", "segment_a")
        assert [(e.kind, e.status) for e in u4] == [("entered", None), ("told", 400), ("told", 200)]
        assert u4[1].error is not None and "bad id" in u4[1].error
        assert audit.history(engine, "nobody") == []

        assert list(audit.members_at(engine, "segment_a", after_first)) == ["u1", "u2", "u3"]
        assert list(audit.members_at(engine, "segment_a", after_second)) == ["u2", "u3", "u4"]
        assert list(audit.members_at(engine, "segment_a")) == ["u2", "u3", "u4"]
    finally:
        engine.dispose()

    shown = subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), "history", "u1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "entered" in shown.stdout and "false -> 200" in shown.stdout
    listed = subprocess.run(
        [
            sys.executable, "-m", "audiencesync", "--config", str(config.path),
            "members", "segment_a", "--at", after_first.isoformat(),
        ],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    assert listed.stdout.split() == ["u1", "u2", "u3"] and "3 member(s)" in listed.stderr
