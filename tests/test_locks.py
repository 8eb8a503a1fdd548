"""Locks and transactions sized to the work: read-only commands and dry runs never take the
write lock, staging holds no long transaction, and every stored timestamp is UTC and aware."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import sqlalchemy as sa
from alembic import command

from audiencesync.config.loading import Config
from audiencesync.gleap.api import identify_body
from audiencesync.store import database, store as store_mod
from audiencesync.store.store import Store
from audiencesync.store.utc_time import SQLITE_STORAGE_FORMAT
from audiencesync.sync.cycle import CycleReport, PlannedCall, Syncer
from tests.conftest import SQLITE_ONLY, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_sync import cycle, only

T = TypeVar("T")


def dry_run(config: Config, **kwargs: object) -> tuple[CycleReport, list[dict[str, object]]]:
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine))
    planned: list[PlannedCall] = []
    try:
        report = syncer.run_cycle(dry_run=True, show_calls=planned.extend, **kwargs)  # type: ignore[arg-type]
    finally:
        syncer.sources.dispose()
        engine.dispose()
    return report, [identify_body(c.user_id, c.attributes) for c in planned]


@contextlib.contextmanager
def hold_write_lock(url: str) -> Iterator[None]:
    """Another writer in the middle of a transaction, for as long as the block runs."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.exec_driver_sql("UPDATE audiences SET name = name")
        else:
            conn.exec_driver_sql("BEGIN")
            # Blocks every write to these tables, and no read.
            conn.exec_driver_sql("LOCK TABLE memberships, audiences, sync_runs IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.exec_driver_sql("ROLLBACK")
    engine.dispose()


def in_thread(target: Callable[[], T], timeout: float = 60.0) -> T:
    """Run ``target()`` in a thread; fail (not hang) if it waits on a lock past ``timeout``."""
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["value"] = target()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "it waited on the other writer's lock"
    if "error" in result:
        raise result["error"]
    return cast(T, result["value"])


def test_dry_run_takes_no_write_lock(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    assert cycle(config).complete
    source.set(["u2", "u3"])
    with hold_write_lock(store_url):
        report, bodies = in_thread(lambda: dry_run(config))
    assert report.complete and report.calls == 2
    assert bodies == [{"segment_a": False, "userId": "u1"}, {"segment_a": True, "userId": "u3"}]


def test_dry_run_with_allow_removals_shows_what_a_release_would_send(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    members = [f"u{i}" for i in range(10)]
    source.set(members)
    config = make_config(gleap.base_url)
    assert cycle(config).complete
    source.set(members[:2])
    report, bodies = dry_run(config)
    assert only(report).status == "held" and bodies == []
    report, bodies = dry_run(config, keys=["segment_a"], allow_removals=True)
    assert only(report).status == "planned" and only(report).left == 8
    assert bodies == [{"segment_a": False, "userId": u} for u in members[2:]]


def test_dry_run_sends_unknown_outcomes_whatever_the_source_says_and_a_held_audiences_pending(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    assert cycle(config).complete
    source.set(["u1", "u2", "u3"])
    gleap.lose_answer_next(4)  # u3's true reaches Gleap, its answers never come back
    cycle(config)
    report, bodies = dry_run(config)
    assert bodies == [{"segment_a": True, "userId": "u3"}] and only(report).pending == 1
    source.set(["u1", "u2"])  # u3 leaves before any acknowledgement
    _, bodies = dry_run(config)
    assert bodies == [{"segment_a": False, "userId": "u3"}]
    source.set([])  # a broken source: held, but what is owed still goes out
    report, bodies = dry_run(config)
    assert only(report).status == "held" and bodies == [{"segment_a": True, "userId": "u3"}]
    source.set(["u1", "u2"])
    cycle(config)
    assert gleap.contacts["u3"]["segment_a"] is False


# A missing file is SQLite's case.
@SQLITE_ONLY
def test_dry_run_of_a_store_that_does_not_exist_leaves_no_file(
    tmp_path: Path, make_config: ConfigFactory, source: SourceDB, store_url: str
) -> None:
    source.set(["u1"])
    config = make_config(create_store=False)
    path = Path(store_url.removeprefix("sqlite:///"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "audiencesync",
            "--config",
            str(config.path),
            "sync",
            "--dry-run",
            "--format",
            "jsonl",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    assert json.loads(result.stdout) == {"call": 1, "user_id": "u1", "audience": "segment_a", "value": True}
    assert not path.exists() and not Path(f"{path}-wal").exists()


# SQLite's write lock; PostgreSQL readers never lock (MVCC).
@SQLITE_ONLY
def test_a_slow_reader_never_blocks_a_sync(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    members = [f"member-{i:07d}" for i in range(30_000)]  # far more than a pipe buffer holds
    config = make_config(gleap.base_url)
    engine = store_mod.engine_for(config.store)
    store = Store(engine)
    audience = store.ensure_audience("segment_a", "Segment A")
    store.refresh(audience, store.start_run("c", audience, "initial"), [members], full=False)
    with engine.begin() as conn:  # as if Gleap had acknowledged them all
        conn.exec_driver_sql("UPDATE memberships SET acked = desired")
    engine.dispose()
    # `audit members` into a pipe nobody reads: it blocks mid-stream with its read open.
    command = ["audit", "members", "segment_a", "--format", "csv"]
    reader = subprocess.Popen(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.read(1000)  # it has started streaming, and is now stuck
        source.set([*members[:-1], "newcomer"])
        writer = subprocess.run(
            [sys.executable, "-m", "audiencesync", "--config", str(config.path), "sync"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert writer.returncode == 0, writer.stderr
        assert gleap.contacts["newcomer"]["segment_a"] is True
    finally:
        reader.kill()
        reader.wait()


def test_staging_a_slow_source_holds_no_transaction_open(store: Store) -> None:
    audience = store.ensure_audience("a", "a")
    run_id = store.start_run("cycle", audience, "initial")
    observer = sa.create_engine(store.engine.url)
    seen: list[int] = []

    def idle_in_transaction() -> int:
        with observer.connect() as conn:
            if observer.dialect.name == "postgresql":
                return int(
                    conn.exec_driver_sql(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
                    ).scalar_one()
                )
            # SQLite: a writer can begin, so nobody holds the write lock.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            conn.exec_driver_sql("ROLLBACK")
            return 0

    def batches() -> Iterator[list[str]]:
        for i in range(3):
            yield [f"u{i}-{j}" for j in range(100)]
            seen.append(idle_in_transaction())  # the source is "slow" here

    refresh = store.refresh(audience, run_id, batches(), full=False)
    observer.dispose()
    assert refresh.counts.members == 300 and seen == [0, 0, 0]


def test_every_stored_timestamp_is_utc_and_aware(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    gleap.fail_user("u2", 400)
    cycle(config)
    engine = sa.create_engine(store_url)
    columns = {
        "audiences": ["created_at", "refreshed_at"],
        "memberships": ["changed_at", "acked_at", "next_attempt_at"],
        "sync_runs": ["started_at", "finished_at"],
        "membership_changes": ["at"],
        "calls": ["at"],
    }
    with engine.connect() as conn:
        for table, names in columns.items():
            for name in names:
                values = [r[0] for r in conn.execute(sa.text(f"SELECT {name} FROM {table}")) if r[0]]
                assert values, (table, name)
                for value in values:
                    if engine.dialect.name == "sqlite":
                        # Text with its offset, in the one format the store writes.
                        assert isinstance(value, str) and value.endswith("+00:00"), (table, name, value)
                        assert len(value) == len("2026-12-01 19:25:25.123456+00:00")
                        value = datetime.fromisoformat(value)
                    assert value.utcoffset() is not None and value.utcoffset().total_seconds() == 0
    engine.dispose()


def test_migration_normalises_old_sqlite_timestamps_and_keeps_memberships(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = store_mod.create_engine(url, create=True)
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0003")
        conn.exec_driver_sql(
            "INSERT INTO audiences (key, name, created_at) VALUES ('a', 'A', '2026-11-30 10:00:00.123456')"
        )
        conn.exec_driver_sql(
            "INSERT INTO memberships (audience_id, user_id, desired, acked, resend, changed_at, acked_at, "
            "attempts) VALUES "
            "(1, 'u1', 1, 1, 0, '2026-11-30 10:00:00+00:00', '2026-11-30 10:00:01.5+00:00', 0), "
            "(1, 'u2', 1, NULL, 0, '2026-11-30 10:00:02', NULL, 0)"
        )
    store_mod.upgrade(engine)
    with engine.connect() as conn:
        created = conn.exec_driver_sql("SELECT created_at FROM audiences").scalar_one()
        rows = conn.exec_driver_sql(
            "SELECT user_id, changed_at, acked_at, pending, unknown FROM memberships ORDER BY user_id"
        ).all()
    engine.dispose()
    expected = SQLITE_STORAGE_FORMAT % {
        "year": 2026, "month": 11, "day": 30, "hour": 10, "minute": 0, "second": 0, "microsecond": 123456
    }  # fmt: skip
    assert created == expected
    assert [tuple(r) for r in rows] == [
        ("u1", "2026-11-30 10:00:00.000000+00:00", "2026-11-30 10:00:01.500000+00:00", 0, 0),
        ("u2", "2026-11-30 10:00:02.000000+00:00", None, 1, 0),
    ]
    assert datetime.fromisoformat(created).tzinfo == UTC


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--format", "json"],
        ["audit", "members", "segment_a"],
        ["audit", "members", "segment_a", "--at", "1m", "--format", "csv"],
        ["audit", "user", "u1"],
        ["audit", "diff", "segment_a", "--from", "1d", "--to", "1m"],
        ["audit", "runs", "--format", "json"],
        ["failures"],
    ],
)
def test_read_only_commands_run_while_another_process_holds_the_write_lock(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str, command: list[str]
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url)
    assert cycle(config).complete
    # A reader that asked for the write lock would fail after the busy timeout.
    text = config.path.read_text().replace("[store]\n", "[store]\nbusy_timeout_seconds = 0.5\n", 1)
    config.path.write_text(text)
    with hold_write_lock(store_url):
        result = subprocess.run(
            [sys.executable, "-m", "audiencesync", "--config", str(config.path), *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert "locked" not in result.stderr
