"""What a delivery pass (``delivery.Deliverer``) hands its parts, each seen from outside: the
observer (the daemon's metrics and stall detection) gets every recorded batch of answers, the
events' outbox writes under the writer lease's fence, and the configured order of audiences
decides who wins a contact field after a reorder, a stop starts no new call, and the write-ahead
marks run about a page ahead of the calls. In-process, against the loopback stand-in, on both
stores (issue 19, D: mutation survivors of the delivery core)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.delivery.deliverer import Deliverer
from audiencesync.errors import LeaseLostError
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.store.schema import memberships
from audiencesync.store.schema_views import call_log_view
from audiencesync.store.store import Outcome, Store
from audiencesync.sync.cycle import Run, Syncer
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_contact_fields import audience, people
from tests.test_events import EVENTS_ON, event_rows, track_requests
from tests.test_outcomes import row
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


class _Counting(httpx.AsyncBaseTransport):
    """A real HTTP transport that counts the requests handed to it (a unit seam)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_the_client_goes_through_the_given_transport_and_logs_on_the_stores_clock(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source.set(["u1", "u2"])
    gleap.fail_user("u2", 422)
    config = make_config(gleap.base_url)
    engine = store_mod.engine_for(config.store)
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)  # the store's clock, far from the wall clock
    transport = _Counting()
    caplog.set_level("WARNING", logger="audiencesync.delivery.deliverer")
    try:
        syncer, run = refreshed(config, Store(engine, clock=lambda: at))
        assert config.gleap.api_token is not None
        deliverer = Deliverer(
            syncer.store,
            config.gleap,
            config.gleap.api_token,
            max_attempts=config.sync.max_attempts,
            backoff_initial=0.01,
            transport=transport,
        )
        drain(deliverer, run)
        syncer.sources.dispose()
        with engine.connect() as conn:
            log = call_log_view
            logged = conn.execute(sa.select(log.c.user_id, log.c.at).order_by(log.c.user_id)).all()
    finally:
        engine.dispose()
    assert sorted(transport.paths) == ["/admin/identify", "/admin/identify"]
    assert [(r.user_id, r.at) for r in logged] == [("u1", at), ("u2", at)]
    # Only the refusal is worth a warning, not the call Gleap took.
    assert [r.getMessage() for r in caplog.records] == ["identify u2 refused: HTTP 422"]


def test_a_stop_mid_call_cancels_it_after_the_grace_and_the_user_stays_owed(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url)
    gleap.hold()  # the identify call hangs, unanswered, far past the grace
    engine = store_mod.engine_for(config.store)
    stop, done = threading.Event(), []
    try:
        syncer, run = refreshed(config, Store(engine))

        def deliver() -> None:
            deliverer = syncer.deliverer()
            drain = deliverer.drain(
                [run.audience.id],
                {run.audience.id: run.audience.key},
                lambda _: run.run_id,
                stop=stop,
                grace_seconds=0.5,
            )
            done.append(asyncio.run(drain))

        thread = threading.Thread(target=deliver, daemon=True)
        thread.start()
        # Wait until the call has reached Gleap, not just until it is marked: the mark is
        # written before the request leaves, and a stop in between makes no request at all.
        assert gleap.wait_held(1, timeout=30), "the call never reached Gleap"
        stop.set()
        thread.join(timeout=20)  # the grace, not the 60 s the call would take
        assert not thread.is_alive(), "the call in flight was not cancelled after the grace"
        assert done == [1], "the pass did not end normally"  # it returns the requests it made
        syncer.sources.dispose()
    finally:
        engine.dispose()
    assert gleap.identify_calls == []
    found = row(config, "u1")  # it may have reached Gleap: marked unknown, still owed
    assert found is not None and found["unknown"] and found["acked"] is None


def _held_pass(
    config: Config, store: Store, stop: threading.Event, *, page_size: int = 100
) -> tuple[Syncer, threading.Thread, list[int]]:
    """A pass in a thread, its calls held by the stand-in (``gleap.hold()``); returns its requests."""
    syncer = Syncer(config, store, backoff_initial=0.01, page_size=page_size)
    (one,) = config.properties
    run = syncer.refresh(one, str(uuid.uuid4()))
    done: list[int] = []

    def deliver() -> None:
        drain = syncer.deliverer().drain(
            [run.audience.id], {run.audience.id: run.audience.key}, lambda _: run.run_id, stop=stop
        )
        done.append(asyncio.run(drain))

    thread = threading.Thread(target=deliver, daemon=True)
    thread.start()
    return syncer, thread, done


def _marked(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(memberships.c.unknown)).scalar_one())


def test_once_told_to_stop_a_pass_starts_no_new_call(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    users = [f"u{i:02d}" for i in range(10)]
    source.set(users)
    config = make_config(gleap.base_url)
    gleap.hold()
    engine = store_mod.engine_for(config.store)
    stop = threading.Event()
    try:
        syncer, thread, done = _held_pass(config, Store(engine), stop)
        n = config.gleap.max_concurrency
        assert gleap.wait_held(n, timeout=30), "the calls never reached Gleap"
        stop.set()
        gleap.release()  # the calls in flight are answered well within the grace (30 s)...
        thread.join(timeout=30)
        assert not thread.is_alive()
        syncer.sources.dispose()
        assert done == [n]  # ...and no other call starts after them
        assert len(gleap.identify_calls) == n
        # The others stay owed, with the mark they had: none of them went out.
        assert _marked(engine) == 0
    finally:
        engine.dispose()
    owed = [row(config, u) for u in users]
    assert sum(1 for r in owed if r is not None and r["acked"] is None) == len(users) - n


def test_a_pass_marks_its_calls_unknown_a_page_at_a_time(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    # The write-ahead marks (and the calls held in memory) run at most about a page ahead of the
    # calls in flight, not over the whole audience at once.
    users = [f"u{i:02d}" for i in range(30)]
    source.set(users)
    config = make_config(gleap.base_url)
    gleap.hold()
    engine = store_mod.engine_for(config.store)
    stop = threading.Event()
    try:
        syncer, thread, done = _held_pass(config, Store(engine), stop, page_size=2)
        n = config.gleap.max_concurrency
        assert gleap.wait_held(n, timeout=30), "the calls never reached Gleap"
        # In flight, a page queued for the senders, and the next one being read at most.
        assert n <= _marked(engine) <= n + 2 * 2
        gleap.release()
        thread.join(timeout=60)
        assert not thread.is_alive()
        syncer.sources.dispose()
    finally:
        engine.dispose()
    assert done == [len(users)] and len(gleap.identify_calls) == len(users)
