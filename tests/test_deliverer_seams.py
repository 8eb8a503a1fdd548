"""What a delivery pass (``delivery.Deliverer``) hands its parts, each seen from outside: the
observer (the daemon's metrics and stall detection) gets every recorded batch of answers, the
events' outbox writes under the writer lease's fence, and the configured order of audiences
decides who wins a contact field after a reorder. In-process, against the loopback stand-in,
on both stores (issue 19, D: mutation survivors of the delivery core)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import timedelta

import pytest

from audiencesync import store as store_mod
from audiencesync.config import Config
from audiencesync.delivery import Deliverer
from audiencesync.errors import LeaseLostError
from audiencesync.lease import WriterLease
from audiencesync.store import Outcome, Store
from audiencesync.sync import Run, Syncer
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_contact_fields import audience, people
from tests.test_events import EVENTS_ON, event_rows, track_requests
from tests.test_sync import cycle


def drain(deliverer: Deliverer, run: Run) -> int:
    return asyncio.run(
        deliverer.drain([run.audience.id], {run.audience.id: run.audience.key}, lambda _: run.run_id)
    )


def refreshed(config: Config, store: Store) -> tuple[Syncer, Run]:
    syncer = Syncer(config, store, backoff_initial=0.01)
    (one,) = config.properties
    return syncer, syncer.refresh(one, str(uuid.uuid4()))


def test_the_observer_is_told_of_every_batch_of_answers_recorded(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    users = ["u1", "u2", "u3"]
    source.set(users)
    config = make_config(gleap.base_url)
    engine = store_mod.engine_for(config.store)
    seen: list[Sequence[Outcome]] = []
    try:
        syncer, run = refreshed(config, Store(engine))
        assert config.gleap.api_token is not None
        deliverer = Deliverer(
            syncer.store,
            config.gleap,
            config.gleap.api_token,
            max_attempts=config.sync.max_attempts,
            backoff_initial=0.01,
            observe=seen.append,
        )
        assert drain(deliverer, run) == 3
        syncer.sources.dispose()
    finally:
        engine.dispose()
    assert seen and all(batch for batch in seen)  # batches as recorded, none empty
    told = [(o.changes[0].user_id, o.status) for batch in seen for o in batch]
    assert sorted(told) == [(u, 200) for u in users]


def test_a_writer_that_lost_its_lease_neither_sends_nor_records_an_owed_event(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, audiences=EVENTS_ON)
    engine = store_mod.engine_for(config.store)
    clock = [store_mod.utc_now()]
    lease = WriterLease(engine, lambda: clock[0], ttl_seconds=30)
    assert lease.try_acquire() is None
    syncer, run = refreshed(config, Store(engine, clock=lambda: clock[0], fence=lease.check))
    try:
        gleap.fail_track_next(4, 503)  # the entry and its retries: no verdict, owed (no backoff)
        drain(syncer.deliverer(), run)
        assert gleap.identify_calls == [{"userId": "u1", "segment_a": True}]
        assert len(track_requests(gleap)) == 4
        clock[0] += timedelta(seconds=31)  # the holder stalls past its lease...
        successor = WriterLease(engine, lambda: clock[0], ttl_seconds=30)
        assert successor.try_acquire() is None  # ...and another process takes over
        with pytest.raises(LeaseLostError):
            drain(syncer.deliverer(), run)
    finally:
        syncer.sources.dispose()
        engine.dispose()
    # The event's write-ahead mark is fenced: the stale writer stops before the request goes out.
    assert len(track_requests(gleap)) == 4 and gleap.events == []
    [entry] = event_rows(config)
    assert (entry["acked_at"], entry["sends"], entry["last_status"]) == (None, 4, 503)


ROWS = [
    {"user_id": "u1", "segment": "x", "plan": "pro"},
    {"user_id": "u1", "segment": "b", "plan": "basic"},
]
X = audience("X", "user_id, plan", "x")
B = audience("B", "user_id, plan", "b")


def test_a_reorder_of_the_audiences_sends_the_new_winner_of_a_field(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(source, ROWS)
    cycle(make_config(gleap.base_url, audiences=X + B))
    assert gleap.contacts["u1"]["plan"] == "pro"  # x is first: its value wins
    gleap.reset_log()
    cycle(make_config(gleap.base_url, audiences=B + X, create_store=False))  # no row changed
    assert gleap.identify_calls == [{"userId": "u1", "b": True, "plan": "basic"}]
    assert gleap.contacts["u1"]["plan"] == "basic"
