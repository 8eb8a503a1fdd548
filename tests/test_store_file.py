"""A SQLite store holds emails and names: audiencesync creates it, and SQLite its -wal and -shm
files, readable by their owner alone, whatever the umask."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from audiencesync.store import database

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Debian's default umask, which makes new files world-readable (0644)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")  # inherited by the command
def test_db_upgrade_creates_the_store_0600_under_a_umask_of_022(tmp_path: Path) -> None:
    config = tmp_path / "audiencesync.toml"
    config.write_text('[store]\nurl = "sqlite:///store.db"\n')
    run = subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config), "db", "upgrade"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert oct(mode(tmp_path / "store.db")) == oct(0o600)


@pytest.mark.usefixtures("umask_022")
def test_the_stores_wal_and_shm_files_are_0600_too(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    engine = database.create_engine(f"sqlite:///{path}", create=True)
    try:
        database.upgrade(engine)
        with engine.connect() as conn:
            # While a connection is open, WAL mode keeps its -wal and -shm files beside the store.
            conn.execute(sa.text("SELECT count(*) FROM audiences")).scalar()
            wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
            assert wal.exists() and shm.exists()
            assert {p.name: oct(mode(p)) for p in (path, wal, shm)} == {
                p.name: oct(0o600) for p in (path, wal, shm)
            }
    finally:
        engine.dispose()


@pytest.mark.usefixtures("umask_022")
def test_a_store_that_exists_keeps_the_mode_its_owner_gave_it(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    engine = database.create_engine(f"sqlite:///{path}", create=True)
    database.upgrade(engine)
    engine.dispose()
    path.chmod(0o640)  # e.g. readable by a group of analysts
    engine = database.create_engine(f"sqlite:///{path}", create=True)
    try:
        assert database.upgrade(engine) is False
    finally:
        engine.dispose()
    assert mode(path) == 0o640


def test_a_store_in_a_missing_directory_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "store.db"
    engine = database.create_engine(f"sqlite:///{path}", create=True)
    try:
        with pytest.raises(Exception, match="cannot open the store"):
            database.upgrade(engine)
    finally:
        engine.dispose()
    assert not path.parent.exists()
