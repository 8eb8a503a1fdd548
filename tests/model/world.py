"""The real things the model-based test drives: a source database, a config file, a store,
the Gleap stand-in, and the engine's own entry points (Syncer.run_cycle as `sync` runs it,
Renames.apply as the daemon's reload runs it, and the CLI's retry, retire, forget, status).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from httpx._transports import default as httpx_transports

from audiencesync import failpoints
from audiencesync.cli import main as cli
from audiencesync.config.audiences import AudienceConfig
from audiencesync.config.loading import Config, StoreConfig, load_config
from audiencesync.delivery.deliverer import Deliverer
from audiencesync.gleap.breaker import CircuitBreaker, Trials
from audiencesync.gleap.client import GleapClient
from audiencesync.refresh.sources import Sources
from audiencesync.store import store as store_mod
from audiencesync.store.store import Store
from audiencesync.sync.cycle import Syncer
from tests.gleap_standin import GleapStandIn
from tests.model.expect import MISSING, TRAIT_KEY, Model

TOKEN = "model-token-4b1e"
# fast_clients' store engines, one per URL and options, for the whole run.
ENGINES: dict[tuple[str, bool, float, int | None], sa.Engine] = {}


@dataclass
class Ran:
    """What an engine entry point did: its exit status, or that a failpoint stopped it."""

    status: int
    killed: bool = False
    out: str = ""
    err: str = ""


@contextlib.contextmanager
def fast_clients() -> Iterator[None]:
    """Speed only, no result depends on it. The CLI builds its clients with the production
    backoff (0.5 s, jittered): made 10 ms, as the other tests pass it. Each client loads
    the CA bundle (~0.1 s, for a loopback stand-in over http): loaded once. Each command
    builds the CLI's parser (~30 ms): built once. And each command and pass makes its own
    store engine, so compiles every statement afresh: one engine per store URL and options
    instead, as the daemon keeps one, its pool kept between commands (its connect and begin
    hooks stay, so SQLite's pragmas and IMMEDIATE are as in production)."""
    saved = (Syncer.__init__.__kwdefaults__, GleapClient.__init__.__kwdefaults__)
    build_parser, engine_for = cli.build_parser, store_mod.engine_for
    parser = build_parser()

    def one_engine(config: StoreConfig, *, create: bool = False, pool_size: int | None = None) -> sa.Engine:
        key = (config.url, create, config.busy_timeout_seconds, pool_size)
        if key not in ENGINES:
            ENGINES[key] = engine = engine_for(config, create=create, pool_size=pool_size)
            if engine.dialect.name == "postgresql":
                sa.event.listen(engine, "connect", _no_commit_flush)
            # A caller's dispose() keeps the pool, as the daemon's one engine keeps it between
            # cycles: on PostgreSQL a new connection is a new backend, and those were half of
            # what an example waited for. Templates.fresh still empties it, once per example.
            setattr(engine, "dispose", lambda close=True: None)  # noqa: B010
        return ENGINES[key]

    Syncer.__init__.__kwdefaults__ = {**(saved[0] or {}), "backoff_initial": 0.01}
    GleapClient.__init__.__kwdefaults__ = {**(saved[1] or {}), "backoff_initial": 0.01}
    create = getattr(httpx_transports, "create_ssl_context")  # noqa: B009 (not re-exported: mypy)
    contexts: dict[Any, Any] = {}

    def cached(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is not True or cert is not None:
            return create(verify=verify, cert=cert, trust_env=trust_env)
        if trust_env not in contexts:
            contexts[trust_env] = create(verify=verify, cert=cert, trust_env=trust_env)
        return contexts[trust_env]

    setattr(httpx_transports, "create_ssl_context", cached)  # noqa: B010
    cli.build_parser, store_mod.engine_for = (lambda: parser), one_engine
    try:
        yield
    finally:
        Syncer.__init__.__kwdefaults__, GleapClient.__init__.__kwdefaults__ = saved
        setattr(httpx_transports, "create_ssl_context", create)  # noqa: B010
        cli.build_parser, store_mod.engine_for = build_parser, engine_for
        for engine in ENGINES.values():
            sa.Engine.dispose(engine)
        ENGINES.clear()


def _no_commit_flush(dbapi_connection: Any, _record: Any) -> None:
    """PostgreSQL: a commit returns before its WAL reaches the disk (most of an example's time
    on a busy disk). Only a crash of the server could tell, and none is part of the model:
    what each transaction sees and locks is unchanged."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")
    dbapi_connection.commit()


class Templates:
    """A migrated empty store made once per test run; each example starts from a copy of it
    (SQLite: the file; PostgreSQL: every table emptied), since migrating takes seconds."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self.sqlite = store_url.startswith("sqlite")
        self.dir = workdir()
        self.template = self.dir / "template.db"
        url = f"sqlite:///{self.template}" if self.sqlite else store_url
        engine = store_mod.create_engine(url, create=True)
        store_mod.upgrade(engine)
        self.tables = [t for t in sa.inspect(engine).get_table_names() if t != "alembic_version"]
        engine.dispose()

    def fresh(self, directory: Path) -> str:
        # The same URL every example, so fast_clients' one engine (and the statements it
        # compiled) serves them all; its pool is emptied first: no connection to the last store.
        for engine in ENGINES.values():
            sa.Engine.dispose(engine)
        if self.sqlite:
            store = self.template.with_name("store.db")
            for path in (store, store.with_name("store.db-wal"), store.with_name("store.db-shm")):
                path.unlink(missing_ok=True)
            shutil.copy(self.template, store)
            return f"sqlite:///{store}"
        engine = sa.create_engine(self.store_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {', '.join(self.tables)} RESTART IDENTITY CASCADE")
        engine.dispose()
        return self.store_url

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class World:
    def __init__(self, gleap: GleapStandIn, store_url: str, directory: Path) -> None:
        self.gleap = gleap
        self.store_url = store_url
        self.dir = directory
        # On PostgreSQL the source tables are in the store's own database, as in an application
        # database that holds both: a bare audience (ids alone) is then refreshed inside the
        # store (pushdown), the others are streamed. On SQLite, a file of their own.
        sqlite = store_url.startswith("sqlite")
        self.source_url = f"sqlite:///{directory / 'source.db'}" if sqlite else store_url
        # One pooled connection, as the reader's below: a connection per step costs a backend.
        self._source = sa.create_engine(self.source_url, pool_size=1, max_overflow=0)
        with self._source.begin() as conn:
            for table, columns in (
                ("m", "slot TEXT, user_id TEXT, plan TEXT"),
                ("t", "user_id TEXT, value TEXT"),
            ):
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
                conn.exec_driver_sql(f"CREATE TABLE {table} ({columns})")
        self.config_path = directory / "audiencesync.toml"
        self.config: Config | None = None
        # One pooled connection, idle (no transaction, so no lock) between reads: a connection per
        # step cost PostgreSQL a backend each time. close() releases it before the next store.
        self._reader: sa.Engine | None = None

    # -- the source and the config ---------------------------------------------------------------

    def write_source(self, model: Model) -> None:
        members = [
            {"slot": s.name, "user_id": u, "plan": p}
            for s in model.slots.values()
            for u, p in sorted(s.members.items())
        ]
        trait = [{"user_id": u, "value": v} for u, v in sorted(model.trait.items())]
        with self._source.begin() as conn:
            conn.exec_driver_sql("DELETE FROM m")
            if members:
                conn.execute(sa.text("INSERT INTO m VALUES (:slot, :user_id, :plan)"), members)
            conn.exec_driver_sql("DELETE FROM t")
            if trait:
                conn.execute(sa.text("INSERT INTO t VALUES (:user_id, :value)"), trait)

    def write_config(self, model: Model) -> Config:
        tables = []
        for slot in model.configured():
            previous = ", ".join(f'"{k}"' for k in slot.keys[:-1])
            tables.append(
                f"""
[[audiences]]
name = "Slot {slot.name}"
key = "{slot.key}"
source = "main"
query = "SELECT user_id{"" if slot.bare else ", plan"} FROM m WHERE slot = '{slot.name}'"
allow_empty = true
events = {str(slot.events).lower()}
enabled = {str(slot.state == "live").lower()}
previous_keys = [{previous}]
"""
            )
        text = f"""
[store]
url = "{self.store_url}"

[gleap]
base_url = "{self.gleap.base_url}"
api_token = "{TOKEN}"
requests_per_minute = 600000
max_concurrency = 4
timeout_seconds = 10
max_retries = 1
track_batch_size = 2

[sources.main]
url = "{self.source_url}"

[sync]
retry_backoff = "0s"
retry_backoff_max = "0s"
max_removal_fraction = 1.0
max_attempts = 50

[[traits]]
name = "Tier"
key = "{TRAIT_KEY}"
source = "main"
query = "SELECT user_id, value FROM t"
missing = "{MISSING}"
allow_empty = true
""" + "".join(tables)
        self.config_path.write_text(text)
        self.config_path.chmod(0o600)
        self.config = load_config(self.config_path)
        return self.config

    # -- the engine ------------------------------------------------------------------------------

    def sync(self, *, full: bool = False, failpoint: str | None = None, probe: bool = False) -> Ran:
        """One `sync` cycle in-process: refresh every active property, then deliver. ``probe``: its
        breaker starts half-open, as the daemon's first pass after an outage (a few trial calls)."""
        assert self.config is not None
        engine = store_mod.engine_for(self.config.store)
        syncer = Syncer(self.config, Store(engine), backoff_initial=0.01)
        if probe:
            gleap = self.config.gleap

            def probing(store: Store | None = None) -> Deliverer:
                deliverer = Syncer.deliverer(syncer, store)
                deliverer.breaker = CircuitBreaker.probing(
                    gleap.breaker_failures, Trials(3, gleap.breaker_trial_failure_rate)
                )
                return deliverer

            syncer.deliverer = probing  # type: ignore[method-assign]
        with armed(failpoint):
            try:
                report = syncer.run_cycle(full=full)
            except RuntimeError as exc:
                if "failpoint" not in str(exc):
                    raise
                return Ran(1, killed=True)
            finally:
                syncer.sources.dispose()
                engine.dispose()
        return Ran(0 if report.complete else 1)

    def sync_with_reload(self, new: Model, *, renames: bool = True) -> tuple[Ran, bool]:
        """A `sync` pass whose identify calls are held unanswered while the config changes
        and the daemon's reload code runs (Renames.apply for each active property, as
        refresh_jobs does on SIGHUP); then the calls are answered. True: the reload came mid-pass."""
        assert self.config is not None
        result: list[Ran] = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                result.append(self.sync())
            except BaseException as exc:  # re-raised in the test's thread
                errors.append(exc)

        self.gleap.hold()
        thread = threading.Thread(target=run, name="model-pass")
        thread.start()
        mid = False
        try:
            # Either a call is held, or the pass ends with nothing to call: no timing involved.
            while thread.is_alive():
                if self.gleap.wait_held(1, timeout=0.05):
                    mid = True
                    break
            config = self.write_config(new)
            engine = store_mod.engine_for(config.store)
            syncer = Syncer(config, Store(engine))
            try:
                for audience in config.active if renames else ():
                    syncer.rename(audience)
            finally:
                syncer.sources.dispose()
                engine.dispose()
        finally:
            self.gleap.release()
            thread.join(timeout=120)
        if errors:
            raise errors[0]
        return result[0], mid

    def cli(self, *args: str) -> Ran:
        """An `audiencesync` command in-process, as the CLI runs it."""
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = cli.main(["--config", str(self.config_path), *args])
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        return Ran(status, out=out.getvalue(), err=err.getvalue())

    def status(self) -> dict[str, Any]:
        ran = self.cli("status", "--format", "json")
        assert ran.status in (0, 1), ran.err
        result: dict[str, Any] = json.loads(ran.out)
        return result

    # -- the store, read only for the cheap invariants (never for expectations) ----------------

    def rows(self) -> list[dict[str, Any]]:
        if self._reader is None:
            self._reader = sa.create_engine(self.store_url, pool_size=1, max_overflow=0)
        with self._reader.connect() as conn:
            query = sa.text(
                "SELECT a.key, a.kind, m.user_id, m.acked, m.unknown FROM memberships m "
                "JOIN audiences a ON a.id = m.audience_id"
            )
            return [dict(r._mapping) for r in conn.execute(query)]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.dispose()
        self._source.dispose()


@contextlib.contextmanager
def counting_pushdowns() -> Iterator[Counter[str]]:
    """The refreshes run inside the store (``Sources.push_down`` that did), by audience key, while
    it is open: a run on PostgreSQL shows with it that the model reached pushdown at all."""
    pushed: Counter[str] = Counter()
    push_down = Sources.push_down

    def counted(self: Sources, audience: AudienceConfig, *args: Any, **kwargs: Any) -> bool:
        done = push_down(self, audience, *args, **kwargs)
        pushed[audience.key] += done
        return done

    setattr(Sources, "push_down", counted)  # noqa: B010
    try:
        yield pushed
    finally:
        setattr(Sources, "push_down", push_down)  # noqa: B010


@contextlib.contextmanager
def armed(failpoint: str | None) -> Iterator[None]:
    """A failpoint (audiencesync/failpoints.py) raised in-process: the pass stops there, as a
    kill would stop it, except that `finally` blocks run."""
    if failpoint is None:
        yield
        return
    failpoints._reached.clear()
    os.environ[failpoints.ENV] = failpoint
    try:
        yield
    finally:
        del os.environ[failpoints.ENV]
        failpoints._reached.clear()


def workdir() -> Path:
    """A new directory, in memory where there is a tmpfs: SQLite's fsyncs on a busy disk were
    most of an example's time, and no crash of the machine is part of the model."""
    shm = Path("/dev/shm")
    return Path(
        tempfile.mkdtemp(prefix="model-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
    )
