"""Shared fixtures: stores on SQLite and (when configured) PostgreSQL, a source DB, configs."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config, load_config
from audiencesync.store import store as store_mod
from tests import fresh_stores, postgres_guard

if TYPE_CHECKING:
    from tests.gleap_standin import GleapStandIn


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "long: a minute or more of wall-clock time on its own; collected first"
    )


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first: under `-n 4` the other workers' tests then run beside them, where
    collected in file order one could start late and run on alone at the end (the soak test waits
    three minutes on a real daemon; the model test's budget is a minute per store)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _root_logging() -> Iterator[None]:
    """`cli.main` points the root logger at the sys.stderr of its test, which pytest closes after
    that test; a later test's daemon thread would then log into a closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _worker_url(url: str | None) -> str | None:
    """Under pytest-xdist each worker gets a database of its own (``test_gw0``...): the tests wipe
    schema public, so two workers must never share one. The database is made on first use (made
    from the server's maintenance database, so the URL's own need not exist either)."""
    if not url:
        return url
    base = sa.make_url(url)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    name = f"{base.database}_{worker}" if worker else base.database
    target = base.set(database=name).render_as_string(hide_password=False)
    if postgres_guard.refusal(target) is not None:
        return target  # _reset_postgres fails the tests with the reason; nothing is made
    # From the maintenance database; where that is closed to us, from the URL's own (as before).
    for admin in (fresh_stores.admin_engine(target), sa.create_engine(base, isolation_level="AUTOCOMMIT")):
        try:
            with admin.connect() as conn:
                exists = conn.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).first()
                if exists is None:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
            break
        except sa.exc.OperationalError:
            continue  # unreachable: _reset_postgres fails the tests with the reason
        finally:
            admin.dispose()
    return target


POSTGRES_URL = _worker_url(os.environ.get("AUDIENCESYNC_TEST_POSTGRES_URL"))
TOKEN = "test-token-9f2c1d"


def _reset_postgres(url: str) -> None:
    refusal = postgres_guard.refusal(url)
    if refusal is not None:
        pytest.fail(refusal, pytrace=False)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    except sa.exc.OperationalError as exc:
        # A configured server that doesn't answer must fail the run, not skip
        # half the suite and pass green.
        pytest.fail(f"AUDIENCESYNC_TEST_POSTGRES_URL is set but the server is unreachable: {exc.orig}")
    finally:
        engine.dispose()


# The two stores every store test runs on, as pytest params (``store_url``, tests/test_model.py).
STORE_KINDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(not POSTGRES_URL, reason="AUDIENCESYNC_TEST_POSTGRES_URL is not set"),
        ],
    ),
]


# A test of one store's behaviour runs on that store alone (rather than skipping on the other).
SQLITE_ONLY = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty store: a fresh SQLite file, or a wiped PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    assert POSTGRES_URL
    _reset_postgres(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def store_templates() -> Iterator[fresh_stores.Templates]:
    """This test process's migrated stores, copied for each test that wants one (tests/fresh_stores.py)."""
    templates = fresh_stores.Templates()
    yield templates
    templates.close()


@pytest.fixture
def store(store_url: str, store_templates: fresh_stores.Templates) -> Iterator[store_mod.Store]:
    store_templates.migrate(store_url)
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    yield store_mod.Store(engine)
    engine.dispose()


class SourceDB:
    """A SQLite source database with a ``members(user_id, segment)`` table tests rewrite at will."""

    settings = ""  # more lines of its [sources.main] table

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE members (user_id, segment TEXT NOT NULL DEFAULT 'a')")
        conn.close()

    def set(self, ids: Sequence[object], segment: str = "a") -> None:
        with sqlite3.connect(self.path) as conn:
            conn.execute("DELETE FROM members WHERE segment = ?", (segment,))
            conn.executemany("INSERT INTO members VALUES (?, ?)", [(i, segment) for i in ids])
        conn.close()


@pytest.fixture
def source(tmp_path: Path) -> SourceDB:
    return SourceDB(tmp_path / "source.db")


@pytest.fixture
def gleap() -> Iterator[GleapStandIn]:
    from tests.gleap_standin import GleapStandIn

    with GleapStandIn(TOKEN) as server:
        yield server


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(
    tmp_path: Path,
    store_url: str,
    source: SourceDB,
    monkeypatch: pytest.MonkeyPatch,
    store_templates: fresh_stores.Templates,
) -> ConfigFactory:
    """Write a config file for the test's store and source, then load it."""
    monkeypatch.delenv("GLEAP_API_TOKEN", raising=False)
    return config_factory(tmp_path, store_url, source, store_templates)


def config_factory(
    directory: Path, store_url: str, source: SourceDB, templates: fresh_stores.Templates
) -> ConfigFactory:
    """``make_config`` for a store, a source and a folder for the file (shared_scenario's too)."""

    def make(
        base_url: str = "http://127.0.0.1:9",
        audiences: str | None = None,
        token: str | None = TOKEN,
        extra_gleap: str = "",
        extra: str = "",
        requests_per_minute: int = 600_000,
        create_store: bool = True,
        sync: str = 'retry_backoff = "0s"',
        # Generous: tests count requests exactly, and a loaded machine can stall a loopback
        # answer for seconds; a test that wants a client timeout asks for one (and a delay past it).
        timeout_seconds: float = 30,
    ) -> Config:
        if audiences is None:
            audiences = """
                [[audiences]]
                name = "Segment A"
                source = "main"
                query = "SELECT user_id FROM members WHERE segment = 'a'"
            """
        token_line = f'api_token = "{token}"' if token else ""
        extra = textwrap.dedent(extra)
        if "[sync]" in extra:  # one [sync] table: the test's keys, then the defaults it didn't set
            extra = extra.replace(
                "[sync]\n",
                "[sync]\n"
                + "\n".join(
                    line for line in sync.splitlines() if line.split("=")[0].strip() + " " not in extra
                )
                + "\n",
                1,
            )
            sync_table = ""
        else:
            sync_table = f"\n[sync]\n{sync}\n"
        text = (
            textwrap.dedent(
                f"""
            [store]
            url = "{store_url}"

            [gleap]
            base_url = "{base_url}"
            {token_line}
            requests_per_minute = {requests_per_minute}
            max_concurrency = 4
            timeout_seconds = {timeout_seconds}
            max_retries = 3
            {extra_gleap}

            [sources.main]
            url = "{source.url}"
            {source.settings}
            """
            )
            + sync_table
            + extra
            + textwrap.dedent(audiences)
        )
        path = directory / "audiencesync.toml"
        path.write_text(text)
        path.chmod(0o600)
        config = load_config(path)
        if create_store:
            # As an admin would with `audiencesync db upgrade`: sync never creates a store.
            templates.migrate(config.store.url)
        return config

    return make


# --- one store for a module's tests that only read it ----------------------------------------


@pytest.fixture(scope="module", params=STORE_KINDS)
def shared_store_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty store a module's read-only tests share (a scenario played once for them): a SQLite
    file of its own, or a PostgreSQL database of its own beside the worker's, so that the tests'
    own stores (``store_url``) are wiped meanwhile without touching it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('shared') / 'store.db'}"
        return
    assert POSTGRES_URL
    base = sa.make_url(POSTGRES_URL)
    url = base.set(database=f"{base.database}_shared").render_as_string(hide_password=False)
    refusal = postgres_guard.refusal(url)
    if refusal is not None:
        pytest.fail(refusal, pytrace=False)
    fresh_stores.recreate_database(url)  # a crashed run's leftover is replaced
    yield url
    fresh_stores.drop_database(url)


@pytest.fixture(scope="module")
def shared_source(tmp_path_factory: pytest.TempPathFactory) -> SourceDB:
    return SourceDB(tmp_path_factory.mktemp("shared_source") / "source.db")


@pytest.fixture(scope="module")
def shared_gleap() -> Iterator[GleapStandIn]:
    from tests.gleap_standin import GleapStandIn

    with GleapStandIn(TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def shared_make_config(
    shared_store_url: str,
    shared_source: SourceDB,
    tmp_path_factory: pytest.TempPathFactory,
    store_templates: fresh_stores.Templates,
) -> Iterator[ConfigFactory]:
    """``make_config`` for the shared store and source (GLEAP_API_TOKEN unset for the module, as
    ``make_config`` unsets it for its test)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("GLEAP_API_TOKEN", raising=False)
        yield config_factory(
            tmp_path_factory.mktemp("shared_config"), shared_store_url, shared_source, store_templates
        )


@contextlib.contextmanager
def unchanged(url: str, what: str) -> Iterator[None]:
    """Fail if the store at ``url`` holds other rows at the end than at the start: a shared
    store's tests must only read it (one that writes gets a store of its own)."""
    before = fresh_stores.fingerprint(url)
    yield
    after = fresh_stores.fingerprint(url)
    assert after == before, f"a test that shares {what} wrote into its store: give it a store of its own"
