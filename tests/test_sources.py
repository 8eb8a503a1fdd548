"""Reading sources: canonical ids, streaming in batches, clear errors."""

from __future__ import annotations

import decimal
import sqlite3
import uuid
from collections.abc import Generator
from pathlib import Path

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import AudienceConfig, SourceConfig
from audiencesync.errors import SourceError
from audiencesync.refresh import pushdown
from audiencesync.refresh.sources import Sources
from audiencesync.refresh.user_ids import ReadStats, canonical_user_id
from tests.conftest import POSTGRES_URL


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (42, "42"),
        (42.0, "42"),
        (decimal.Decimal("42.000"), "42"),
        (1.5, "1.5"),
        ("u1", "u1"),
        (" u1 ", " u1 "),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), "12345678-1234-5678-1234-567812345678"),
        (b"bytes-id", "bytes-id"),
        (None, None),
        ("", None),
        ("  \t", None),
        (True, None),
        (float("nan"), None),
    ],
)
def test_canonical_user_id(value: object, expected: str | None) -> None:
    assert canonical_user_id(value) == expected


def audience(query: str) -> AudienceConfig:
    return AudienceConfig(name="A", key="a", source="src", query=query)


def test_reads_in_batches(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (user_id INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES " + ",".join(f"({i})" for i in range(25)) + ",(NULL)")
    engine.dispose()
    sources = Sources({"src": SourceConfig("src", url)}, batch_size=10)
    stats = ReadStats()
    batches = list(
        sources.read_ids(audience("SELECT user_id FROM t ORDER BY user_id IS NULL, user_id"), stats)
    )
    sources.dispose()
    assert [len(b) for b in batches] == [10, 10, 5]
    assert batches[0][:3] == ["0", "1", "2"]
    assert (stats.rows, stats.skipped) == (26, 1)


def test_a_sqlite_source_s_connection_hands_its_page_cache_back_after_each_read(tmp_path: Path) -> None:
    """A source is read once a refresh, and its application writes in between, so the page cache
    a pooled connection kept (up to 2 MB) was never of use again; it only grew with the source.
    Each read's connection releases it (PRAGMA shrink_memory) as it goes back to the pool."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    setup = sa.create_engine(url)
    with setup.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (user_id INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1), (2)")
    setup.dispose()
    sources = Sources({"src": SourceConfig("src", url)})
    seen: list[str] = []
    try:
        with sources.engine("src").connect() as conn:  # the connection the pool will hand out again
            conn.connection.driver_connection.set_trace_callback(seen.append)  # type: ignore[union-attr]
        seen.clear()
        assert list(sources.read_ids(audience("SELECT user_id FROM t"), ReadStats())) == [["1", "2"]]
        reads = [n for n, text in enumerate(seen) if "FROM t" in text]
        assert reads and seen[-1] == "PRAGMA shrink_memory" and seen.index("PRAGMA shrink_memory") > reads[-1]
    finally:
        sources.dispose()


def test_sql_error_names_audience_and_source_and_masks_the_password() -> None:
    sources = Sources({"src": SourceConfig("src", "postgresql+psycopg://bob:hunter2@127.0.0.1:1/x")})
    with pytest.raises(SourceError) as info:
        list(sources.read_ids(audience("SELECT 1 AS user_id"), ReadStats()))
    message = str(info.value)
    assert "'a'" in message and "'src'" in message and "hunter2" not in message and "***" in message


@pytest.mark.skipif(not POSTGRES_URL, reason="AUDIENCESYNC_TEST_POSTGRES_URL is not set")
@pytest.mark.postgres
def test_postgres_source_streams_with_a_server_side_cursor() -> None:
    assert POSTGRES_URL
    sources = Sources({"src": SourceConfig("src", POSTGRES_URL)}, batch_size=1000)
    stats = ReadStats()
    query = "SELECT gen_random_uuid() AS user_id FROM generate_series(1, 2500) UNION ALL SELECT NULL"
    batches = list(sources.read_ids(audience(query), stats))
    sources.dispose()
    assert [len(b) for b in batches] == [1000, 1000, 500]
    assert all(len(i) == 36 and i == i.lower() for i in batches[0])
    assert stats.skipped == 1


def test_a_missing_sqlite_file_is_refused_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "gone.db"
    sources = Sources({"dw": SourceConfig(name="dw", url=f"sqlite:///{missing}")})
    target = AudienceConfig(name="A", key="a", source="dw", query="SELECT 1 AS user_id")
    with pytest.raises(SourceError) as info:
        list(sources.read_ids(target, ReadStats()))
    assert f"(source 'dw'): the source file {missing} does not exist" in str(info.value)
    assert "[sources.dw] url" in str(info.value)
    assert not missing.exists()


def test_a_sqlite_source_read_through_its_driver_fails_and_ends_as_through_sqlalchemy(tmp_path: Path) -> None:
    # A SQLite source's rows come through the sqlite3 cursor (refresh.query_rows): its errors
    # are still SourceErrors naming the audience, and a read stopped early ends its statement.
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (user_id TEXT)")
        conn.executemany("INSERT INTO t VALUES (?)", [(f"u{i}",) for i in range(25)])
    conn.close()
    sources = Sources({"src": SourceConfig("src", f"sqlite:///{path}")}, batch_size=10)
    with pytest.raises(SourceError) as info:
        list(sources.read_ids(audience("SELECT user_id FROM t WHERE nope = 1"), ReadStats()))
    assert "'a'" in str(info.value) and "no such column: nope" in str(info.value)
    with pytest.raises(SourceError) as info:
        list(sources.read_ids(audience("SELECT user_id FROM t WHERE user_id = :u"), ReadStats()))
    assert "bind parameter 'u'" in str(info.value)  # SQLAlchemy's refusal, as before
    reads = sources.read_ids(audience("SELECT user_id AS user_id FROM t"), ReadStats())
    assert next(reads) == [f"u{i}" for i in range(10)]
    assert isinstance(reads, Generator)
    reads.close()
    # No statement is left reading: the file can be written (sqlite3 would wait on its lock).
    with sqlite3.connect(path, timeout=0) as conn:
        conn.execute("DELETE FROM t")
    conn.close()
    sources.dispose()


def test_the_pushed_reads_whitespace_is_pythons() -> None:
    # The read pushed into PostgreSQL takes an id of these alone for blank, as str.strip() does.
    every = "".join(c for c in map(chr, range(0x110000)) if c.isspace())
    assert every == pushdown.WHITESPACE
