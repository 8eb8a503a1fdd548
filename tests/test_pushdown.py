"""Pushdown: an audience whose source is the store's own PostgreSQL database is refreshed inside it.

Every test here runs twice on the same data, a ``members`` table in the store's
database: once pushed down, once streamed (``pushdown = false``), and must give
the same result. Several are test_sync's and test_reliability's own tests,
collected again here with this module's ``store_url`` and ``source`` fixtures.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.refresh import pushdown
from audiencesync.refresh.sources import Sources
from audiencesync.refresh.user_ids import ReadStats
from audiencesync.store import store as store_mod
from audiencesync.store.store import Store
from audiencesync.sync.cycle import Syncer
from tests import test_reliability, test_sync
from tests.conftest import POSTGRES_URL, ConfigFactory, SourceDB, _reset_postgres
from tests.gleap_standin import GleapStandIn
from tests.test_reliability import assert_converged
from tests.test_sync import TWO_AUDIENCES, calls, cycle, only

# test_sync's and test_reliability's own tests, collected again here: on both paths, with this
# module's fixtures.
SHARED_TESTS = {
    "test_audience_selection": test_sync,
    "test_full_resync_resends_every_member": test_sync,
    "test_many_members_across_pages": test_sync,
    "test_one_call_carries_all_of_a_users_audiences": test_sync,
    "test_empty_source_is_held_unless_allowed": test_reliability,
}
globals().update({name: getattr(module, name) for name, module in SHARED_TESTS.items()})

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not POSTGRES_URL, reason="AUDIENCESYNC_TEST_POSTGRES_URL is not set"),
]


@pytest.fixture
def store_url() -> str:
    """The store is PostgreSQL here: pushdown only ever applies to it."""
    assert POSTGRES_URL
    _reset_postgres(POSTGRES_URL)
    return POSTGRES_URL


class StoreSource(SourceDB):
    """The ``members(user_id, segment)`` table, in the store's own database."""

    def __init__(self, url: str, *, pushed: bool) -> None:
        self.url = url
        self.settings = "" if pushed else "pushdown = false"
        self.engine = sa.create_engine(url)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE members (user_id TEXT, segment TEXT NOT NULL DEFAULT 'a')")

    def set(self, ids: Sequence[object], segment: str = "a") -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM members WHERE segment = :s"), {"s": segment})
            if ids:
                conn.execute(
                    sa.text("INSERT INTO members VALUES (:u, :s)"),
                    [{"u": None if i is None else str(i), "s": segment} for i in ids],
                )


@pytest.fixture(params=["pushed", "streamed"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def source(store_url: str, path: str) -> Iterator[StoreSource]:
    db = StoreSource(store_url, pushed=path == "pushed")
    yield db
    db.engine.dispose()


# Tests that refresh nothing: the spy below has nothing to check in them.
REFRESH_NOTHING = {"test_pushable_only_where_the_result_is_the_same", "test_the_same_database_is_recognised"}


@pytest.fixture(autouse=True)
def loads(path: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """The stages loaded inside the store: some on the pushed path, none on the streamed one."""
    seen: list[str] = []
    real = pushdown.load_stage

    def spy(conn: sa.Connection, stage: str, query: str, *, max_length: int, samples: int) -> pushdown.Loaded:
        seen.append(query)
        return real(conn, stage, query, max_length=max_length, samples=samples)

    monkeypatch.setattr(pushdown, "load_stage", spy)
    yield seen
    if request.node.originalname not in REFRESH_NOTHING:
        assert bool(seen) == (path == "pushed"), f"{path} path, but {len(seen)} stage(s) loaded in the store"


def test_no_id_leaves_the_database_on_the_pushed_path(
    make_config: ConfigFactory, source: StoreSource, gleap: GleapStandIn, path: str
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    engine = store_mod.create_engine(config.store.url)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01)
    try:
        assert syncer.run_cycle().complete
        # The source's own engine is made on first read: pushed, nothing was read out.
        assert (syncer.sources._engines == {}) == (path == "pushed")
    finally:
        syncer.sources.dispose()
        engine.dispose()
    assert_converged(gleap, ["u1", "u2"])


def test_bad_ids_are_skipped_and_counted_alike(
    make_config: ConfigFactory, source: StoreSource, gleap: GleapStandIn
) -> None:
    source.set(["u1", None, "", "   ", "u1", "x" * 300, "bad\x01id", "bad\nid", "u2", "42"])
    report = cycle(make_config(gleap.base_url))
    assert set(calls(gleap)) == {"u1", "u2", "42"}
    a = only(report)
    assert (a.members, a.skipped_rows, a.duplicate_rows) == (3, 6, 1)
    assert sorted(s.split(": ")[1] for s in a.invalid_samples) == [
        "holds control characters",
        "holds control characters",
        "longer than 255 characters",
    ]


def test_an_id_of_unicode_whitespace_is_blank_to_both_reads(
    make_config: ConfigFactory, source: StoreSource, gleap: GleapStandIn
) -> None:
    # Python's str.strip() takes these for whitespace; PostgreSQL's [[:space:]] in the stage's
    # "C" collation knows only ASCII's, so the pushed read kept them as ids.
    source.set(["u1", "\u00a0", "\u2003\u3000", "\x1c", "\x85 ", "\u2028", "a\u00a0b", "\ufeff"])
    report = cycle(make_config(gleap.base_url))
    a = only(report)
    # U+FEFF is not whitespace to Python: an id, as odd as it is.
    assert set(calls(gleap)) == {"u1", "a\u00a0b", "\ufeff"}
    assert (a.members, a.skipped_rows, a.invalid_samples) == (3, 5, [])


def test_integer_and_uuid_ids_are_their_text(
    make_config: ConfigFactory, source: StoreSource, gleap: GleapStandIn
) -> None:
    with source.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE accounts (id BIGINT, ref UUID)")
        conn.exec_driver_sql(
            "INSERT INTO accounts VALUES (7, 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'), (8, NULL), (NULL, NULL)"
        )
    audiences = """
        [[audiences]]
        name = "By Number"
        source = "main"
        query = "SELECT id AS user_id FROM accounts"

        [[audiences]]
        name = "By Ref"
        source = "main"
        query = "SELECT ref AS user_id FROM accounts"
    """
    report = cycle(make_config(gleap.base_url, audiences=audiences))
    assert report.complete
    assert gleap.contacts == {
        "7": {"userId": "7", "by_number": True},
        "8": {"userId": "8", "by_number": True},
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11": {
            "userId": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "by_ref": True,
        },
    }
    assert (only(report, "by_number").skipped_rows, only(report, "by_ref").skipped_rows) == (1, 2)


def test_a_query_failing_as_it_runs_fails_its_audience_only(
    make_config: ConfigFactory, source: StoreSource, gleap: GleapStandIn, store_url: str
) -> None:
    # Plans fine, fails on its first row: the pushed INSERT itself fails, not the check before it.
    failing = TWO_AUDIENCES.replace("segment = 'b'", "1 / (length(segment) - 1) = 1 AND segment = 'b'")
    source.set(["u1"], "a")
    source.set(["u2"], "b")
    cycle(make_config(gleap.base_url, audiences=TWO_AUDIENCES))
    source.set(["u1", "u5"], "a")
    source.set(["u3"], "b")
    gleap.reset_log()
    report = cycle(make_config(gleap.base_url, audiences=failing))
    b = only(report, "segment_b")
    assert b.status == "failed" and "division by zero" in (b.error or "")
    assert "segment_b" in (b.error or "") and "'main'" in (b.error or "")
    assert only(report).status == "succeeded"
    assert list(calls(gleap)) == ["u5"]
    engine = store_mod.create_engine(store_url)
    assert Store(engine).memberships_of("segment_b") == {"u2": (True, True)}
    engine.dispose()


def slow_audience(seconds: float) -> str:
    return f"""
        [[audiences]]
        name = "Segment A"
        source = "main"
        query = "SELECT user_id FROM members, pg_sleep({seconds}) WHERE segment = 'a'"
    """


def test_a_query_past_its_timeout_is_cancelled(
    make_config: ConfigFactory, source: StoreSource, gleap: GleapStandIn, path: str
) -> None:
    source.set(["u1"])
    cycle(make_config(gleap.base_url))
    source.set(["u1", "u2"])
    source.settings += "\ntimeout_seconds = 0.5"
    report = cycle(make_config(gleap.base_url, audiences=slow_audience(30)))
    a = only(report)
    assert a.status == "failed" and "ran past timeout_seconds = 0.5" in (a.error or "")
    assert gleap.contacts == {"u1": {"userId": "u1", "segment_a": True}}


def test_stopping_cancels_a_running_query(
    make_config: ConfigFactory, source: StoreSource, gleap: GleapStandIn, store_url: str
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, audiences=slow_audience(60))
    engine = store_mod.create_engine(config.store.url)
    syncer = Syncer(config, Store(engine), backoff_initial=0.01)
    reports = []
    worker = threading.Thread(target=lambda: reports.append(syncer.run_cycle()))
    worker.start()
    try:
        deadline = time.monotonic() + 30
        watcher = sa.create_engine(store_url)
        with watcher.connect() as conn:
            while time.monotonic() < deadline:
                # Streamed, the statement shows as a FETCH from its cursor: look for the sleep.
                running = conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event = 'PgSleep' AND datname = current_database()"
                ).scalar_one()
                conn.rollback()  # pg_stat_activity is read once per transaction
                if running:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the slow query never started")
        watcher.dispose()
        syncer.sources.cancel()
        worker.join(30)
        assert not worker.is_alive()
    finally:
        syncer.sources.cancel()
        worker.join(30)
        syncer.sources.dispose()
        engine.dispose()
    a = only(reports[0])
    assert a.status == "failed" and "cancelled because audiencesync is stopping" in (a.error or "")
    assert gleap.identify_calls == []


def test_a_mass_removal_is_held(make_config: ConfigFactory, source: StoreSource, gleap: GleapStandIn) -> None:
    members = [f"u{i}" for i in range(10)]
    source.set(members)
    config = make_config(gleap.base_url)
    cycle(config)
    source.set([*members[:3], "new1"])
    gleap.reset_log()
    report = cycle(config)
    assert only(report).status == "held" and "would remove 7 of 10" in (only(report).error or "")
    assert gleap.identify_calls == []
    assert_converged(gleap, members)


def test_pushable_only_where_the_result_is_the_same(
    make_config: ConfigFactory, source: StoreSource, tmp_path: Path, path: str
) -> None:
    with source.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE scores (user_id NUMERIC, fixed CHAR(8), email TEXT)")
    config = make_config()
    on = path == "pushed"

    def pushable(query: str, kind: str = "audience", cfg: Config = config) -> bool:
        audience = dataclasses.replace(config.audiences[0], query=query, kind=kind)
        engine = sa.create_engine(cfg.store.url)
        try:
            with engine.connect() as conn:
                return Sources(cfg.sources).pushable(audience, conn)
        finally:
            engine.dispose()

    assert pushable("SELECT user_id FROM members") is on
    assert pushable("SELECT user_id::varchar AS user_id FROM members") is on
    assert not pushable("SELECT user_id FROM scores")  # numeric: 10.0 is "10"
    assert not pushable("SELECT fixed AS user_id FROM scores")  # char(n): the driver keeps the padding
    assert not pushable("SELECT user_id, email FROM members JOIN scores USING (user_id)")  # contact fields
    assert not pushable("SELECT user_id AS id FROM members")  # no user_id: the streamed read says so
    assert not pushable("SELECT user_id FROM no_such_table")  # fails: the streamed read says why
    assert not pushable("SELECT user_id, 1 AS value FROM members", kind="trait")
    other = tmp_path / "other.db"
    stats = ReadStats()
    with sa.create_engine(f"sqlite:///{other}").connect() as conn:  # a SQLite store: never
        assert not Sources(config.sources).push_down(config.audiences[0], conn, "stage", stats)
    assert stats.rows == 0


@pytest.mark.parametrize(
    ("source_url", "same"),
    [
        ("postgresql+psycopg://postgres@127.0.0.1:5432/{db}", True),
        ("postgresql://reader@localhost/{db}", True),
        ("postgresql+psycopg://postgres@127.0.0.1:5433/{db}", False),
        ("postgresql+psycopg://postgres@db.internal/{db}", False),
        ("postgresql+psycopg://postgres@127.0.0.1:5432/{db}_other", False),
        ("sqlite:///{db}.db", False),
    ],
)
@pytest.mark.parametrize("path", ["pushed"], indirect=True)  # a property of the URLs alone: one path
def test_the_same_database_is_recognised(store_url: str, source_url: str, same: bool, path: str) -> None:
    engine = sa.create_engine(store_url)
    database = engine.url.database
    assert engine.url.host == "127.0.0.1", "the cases assume the suite's PostgreSQL on 127.0.0.1:5432"
    try:
        with engine.connect() as conn:
            assert pushdown.applies(source_url.format(db=database), conn) is same
    finally:
        engine.dispose()
