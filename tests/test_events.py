"""Audience Entered / Exited events: made with the refresh, sent after the identify, batched,
split on a 400, re-sent when the outcome is unknown; on both stores, against the stand-in."""

from __future__ import annotations

import sqlalchemy as sa

from audiencesync import store as store_mod
from audiencesync.config import Config
from audiencesync.gleap import event_date
from audiencesync.schema import events
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn, RecordedRequest
from tests.test_sync import cycle, only

EVENTS_ON = """
[[audiences]]
name = "Segment A"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'a'"
events = true
"""


def event_rows(config: Config) -> list[dict[str, object]]:
    engine = store_mod.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(events).order_by(events.c.id)).mappings().all()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()


def track_requests(gleap: GleapStandIn) -> list[RecordedRequest]:
    return [r for r in gleap.requests if r.path.startswith("/admin/track")]


def test_entries_and_exits_become_events_after_the_identify(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)
    report = cycle(config)
    assert report.complete, only(report)
    sent = gleap.events
    assert [(e["userId"], e["name"]) for e in sent] == [
        ("u1", "Audience Entered"),
        ("u2", "Audience Entered"),
    ]
    assert sent[0]["data"] == {"audience_key": "segment_a", "audience_name": "Segment A"}
    stored = event_rows(config)
    assert sent[0]["date"] == event_date(stored[0]["at"])  # type: ignore[arg-type]
    assert all(row["acked_at"] is not None and row["sends"] == 1 for row in stored)
    # Every identify came before the track call that carried its events.
    paths = [r.path.split("?")[0] for r in gleap.requests]
    assert paths == ["/admin/identify", "/admin/identify", "/admin/track"]

    gleap.reset_log()
    source.set(["u2", "u3"])
    cycle(config)
    assert sorted((e["userId"], e["name"]) for e in gleap.events) == [
        ("u1", "Audience Exited"),
        ("u3", "Audience Entered"),
    ]
    assert only(cycle(config)).status == "succeeded"
