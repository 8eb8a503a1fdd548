"""What a daemon running for months must not accumulate (issue 22, item 3).

Each test repeats what the daemon does for ever (a refresh, a reload) many times and
counts what stays behind: cache entries, list items. Counts, not RSS: RSS is noisy, and a
count names what grows. bench/memory_probe.py is the tool that found them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import sqlalchemy as sa

from audiencesync import values
from audiencesync.alerts.alerts import Alerts
from audiencesync.store import database, pending
from audiencesync.store.events import EventNames
from audiencesync.store.in_lists import padded
from audiencesync.store.store import Store


@pytest.mark.parametrize("valued", [False, True], ids=["ids", "values"])
def test_refreshes_leave_nothing_in_the_engines_compiled_cache(store: Store, valued: bool) -> None:
    """Each refresh staged the source under a new name, so its statements' texts were new each
    time: compiled and cached, they filled the engine's cache over hours (~12 KB each)."""
    audience = store.ensure_audience("seg", "Seg", kind="audience", missing=None)
    names = EventNames("Audience Entered", "Audience Exited")

    def refresh(i: int) -> None:
        run_id = store.start_run(f"cycle-{i}", audience, "incremental")
        ids = [f"u{j}" for j in range(i % 5, 60, 2 + i % 3)]  # users enter and leave each time
        pairs: list[tuple[str, str | None]] = [(user, values.encode({"plan": f"p{i % 2}"})) for user in ids]
        batches = iter([pairs]) if valued else iter([ids])
        counts = store.refresh(audience, run_id, batches, full=False, valued=valued, events=names).counts
        assert counts.entered + counts.left > 0
        store.finish_run(run_id, "succeeded")

    for i in range(4):  # every statement a refresh runs has been seen
        refresh(i)
    cache = store.engine._compiled_cache
    assert cache is not None
    seen = len(cache)
    for i in range(4, 30):
        refresh(i)
    assert len(cache) == seen


@pytest.mark.parametrize("valued", [False, True], ids=["ids", "values"])
def test_refreshes_run_the_same_statement_texts_each_time(store: Store, valued: bool) -> None:
    """The drivers keep prepared statements by their text (the sqlite3 module 128 per
    connection, psycopg counts texts to prepare them): a text seen once is a dead entry kept,
    ~13 KB each. A refresh's statements are the same texts each time, whatever it stages."""
    audience = store.ensure_audience("seg", "Seg", kind="audience", missing=None)
    texts: set[str] = set()

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        texts.add(statement)

    def refresh(i: int) -> None:
        run_id = store.start_run(f"cycle-{i}", audience, "incremental")
        ids = [f"u{j}" for j in range(i % 5, 60, 2 + i % 3)]
        pairs: list[tuple[str, str | None]] = [(user, values.encode({"plan": f"p{i % 2}"})) for user in ids]
        store.refresh(audience, run_id, iter([pairs]) if valued else iter([ids]), full=False, valued=valued)
        store.finish_run(run_id, "succeeded")

    for i in range(4):
        refresh(i)
    seen = set(texts)
    for i in range(4, 20):
        refresh(i)
    assert texts - seen == set()


def test_reloads_with_the_same_token_keep_one_secret_to_scrub() -> None:
    """A reload adds the config's token to what alerts scrub (an old token is still scrubbed
    after a rotation): the same token again is not a new one."""
    alerts = Alerts([], None, secrets=["token-1"])
    for _ in range(50):
        alerts.configure([], ["token-1"])
    alerts.configure([], ["token-2"])  # rotated: both are scrubbed
    alerts.configure([], ["token-2"])
    assert alerts._secrets == ["token-1", "token-2"]


def test_pages_of_the_same_audiences_in_another_order_share_one_statement(store: Store) -> None:
    """A pass's audiences come in the order their runs opened: each order was one more statement
    built, kept and compiled, though IN does not care."""
    ids = [store.ensure_audience(key, key, kind="audience", missing=None).id for key in ("a", "b", "c")]
    pending._page_statement.cache_clear()
    for order in itertools.permutations(ids):
        for audience_id in ids:
            store.pending_page(audience_id, list(order), "", 10)
    assert pending._page_statement.cache_info().currsize == 1


def test_a_sqlite_store_connection_keeps_few_prepared_statements(tmp_path: Path) -> None:
    """The sqlite3 module keeps 128 prepared statements per connection by default, and the
    store's are large (~14 KB: an UPDATE of memberships carries its counters' triggers): five
    pooled connections filled towards 9 MB over a daemon's first hours. The store asks for fewer."""
    engine = database.create_engine(f"sqlite:///{tmp_path / 'store.db'}", create=True)
    asked: dict[str, object] = {}

    @sa.event.listens_for(engine, "do_connect")
    def _connect(dialect: object, record: object, cargs: object, cparams: dict[str, object]) -> None:
        asked.update(cparams)

    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
    assert asked["cached_statements"] == database.SQLITE_CACHED_STATEMENTS < 128


def test_pages_share_one_statement_however_far_the_passs_cursors_have_gone(store: Store) -> None:
    """How far each of a pass's other cursors has gone (not started, up to a user, past every
    user) was a part of the page's statement: three audiences made dozens of shapes, each met
    for the first time hours into a run and kept (~100 KB each, here and in the engine's
    compiled cache). It is a parameter now: one statement, one compiled entry."""
    ids = [store.ensure_audience(key, key, kind="audience", missing=None).id for key in ("a", "b", "c")]
    pending._page_statement.cache_clear()
    store.pending_page(ids[0], ids, "", 10)
    cache = store.engine._compiled_cache
    assert cache is not None
    seen = len(cache)
    for audience_id in ids:
        others = [other for other in ids if other != audience_id]
        for states in itertools.product(["", "u5", None], repeat=len(others)):
            store.pending_page(audience_id, ids, "", 10, passed=dict(zip(others, states, strict=True)))
    assert pending._page_statement.cache_info().currsize == 1
    assert len(cache) == seen


def test_a_sqlite_store_connection_hands_its_page_cache_back_when_pooled(tmp_path: Path) -> None:
    """An idle pooled SQLite connection kept up to 2 MB of pages it would throw away at its next
    use anyway (another connection wrote since): five of them grew with the store for hours. Each
    store connection releases its cache (PRAGMA shrink_memory) as it goes back to the pool."""
    engine = database.create_engine(f"sqlite:///{tmp_path / 'store.db'}", create=True)
    seen: list[str] = []
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x)")
        with engine.connect() as conn:
            conn.connection.driver_connection.set_trace_callback(seen.append)  # type: ignore[union-attr]
            conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one()
            assert "PRAGMA shrink_memory" not in seen  # not while in use
        assert seen[-1] == "PRAGMA shrink_memory"
        with engine.connect() as conn:  # the same pooled connection, still good
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 0
    finally:
        engine.dispose()


def test_in_lists_are_padded_to_a_power_of_two() -> None:
    assert padded([]) == []
    assert padded(["a"]) == ["a"]
    assert padded(["a", "b", "c"]) == ["a", "b", "c", "c"]
    assert padded(range(5)) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert [len(padded(range(n))) for n in (8, 9, 100, 500)] == [8, 16, 128, 512]


def test_a_page_of_any_size_reads_its_fields_in_one_of_a_few_statement_texts(store: Store) -> None:
    """A page's IN list of users was one statement text per length (1 to 100 users): psycopg
    keeps 128 parsed texts, the sqlite3 module 32 prepared per connection, and both churned
    through them, psycopg's filling with the longer ones over the first hour. Padded, a page's
    read has one text per power of two, and the same fields."""
    store.ensure_audience("seg", "Seg", kind="audience", missing=None)
    texts: set[str] = set()

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if "memberships" in statement and "audiences" in statement:
            texts.add(statement)

    try:
        for n in range(1, 101):
            assert store.page_fields([f"u{i}" for i in range(n)], ["seg"]).members == {}
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", _seen)
    assert 1 < len(texts) <= 8
