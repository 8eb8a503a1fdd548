"""A database URL whose driver is not installed: a message naming the driver and the pip command.

These run the console script as a real process against drivers that are really
absent from the test environment (pymysql, pg8000), so what is checked is what a
user without them sees: no traceback, exit 2 (or check's per-part lines).
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PASSWORD = "s3cret-pass"
MISSING = "audience 'buyers' (source 'shop'): the driver pymysql (for mysql+pymysql URLs) is not installed."
TRAIT_MISSING = MISSING.replace("audience 'buyers'", "trait 'tier'")
FIX = "Fix: pip install pymysql"


@pytest.fixture(autouse=True)
def _drivers_really_absent() -> None:
    for module in ("pymysql", "pg8000"):
        assert importlib.util.find_spec(module) is None, f"these tests need {module} not installed"


def write_config(tmp_path: Path, store_url: str | None = None, shop_url: str | None = None) -> Path:
    """A config with a MySQL source (no driver) and a SQLite one, and a store made by `db upgrade`."""
    source = tmp_path / "local.db"
    with sqlite3.connect(source) as conn:
        conn.execute("CREATE TABLE users (id TEXT)")
        conn.execute("INSERT INTO users VALUES ('u1')")
    conn.close()
    path = tmp_path / "audiencesync.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [store]
            url = "{store_url or "sqlite:///" + str(tmp_path / "store.db")}"

            [gleap]
            base_url = "http://127.0.0.1:9"

            [sources.shop]
            url = "{shop_url or f"mysql+pymysql://shop:{PASSWORD}@db.invalid/shop"}"

            [sources.local]
            url = "sqlite:///{source}"

            [[audiences]]
            name = "Buyers"
            source = "shop"
            query = "SELECT id AS user_id FROM orders"

            [[audiences]]
            name = "Locals"
            source = "local"
            query = "SELECT id AS user_id FROM users"

            [[traits]]
            name = "Tier"
            source = "shop"
            query = "SELECT id AS user_id, tier AS value FROM users"
            """
        )
    )
    if store_url is None:
        assert cli(path, "db", "upgrade").returncode == 0
    return path


def cli(config: Path, *args: str, preamble: str = "") -> subprocess.CompletedProcess[str]:
    """The console script; ``preamble`` runs first in the same process (to hide an installed module)."""
    env = {k: v for k, v in os.environ.items() if k != "GLEAP_API_TOKEN"} | {"GLEAP_API_TOKEN": "tok-1"}
    code = f"import sys\n{preamble}\nfrom audiencesync.cli.main import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_names_the_missing_driver_and_checks_every_other_part(tmp_path: Path) -> None:
    result = cli(write_config(tmp_path), "check")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1  # some part failed: check's status for any FAIL
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok    config ")
    assert lines[1].startswith("ok    store sqlite:///")
    assert lines[2:7] == [
        "FAIL  audience buyers (source shop)",
        f"      {MISSING} {FIX}",
        "ok    audience locals (source local)",
        "FAIL  trait tier (source shop)",
        f"      {TRAIT_MISSING} {FIX}",
    ]
    assert lines[7].startswith("FAIL  gleap token at http://127.0.0.1:9")  # nothing listens there
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "command", [["sync"], ["sync", "--dry-run"], ["run"], ["sync", "--audience", "tier"]]
)
def test_sync_and_run_exit_2_with_the_same_message(tmp_path: Path, command: list[str]) -> None:
    result = cli(write_config(tmp_path), *command)
    assert result.returncode == 2, result.stderr
    expected = TRAIT_MISSING if "tier" in command else MISSING
    assert result.stderr == f"audiencesync: error: {expected} {FIX}\n"
    assert result.stdout == ""
    assert PASSWORD not in result.stderr


def test_a_sync_of_other_sources_does_not_need_the_driver(tmp_path: Path) -> None:
    result = cli(write_config(tmp_path), "sync", "--dry-run", "--audience", "locals")
    assert result.returncode == 0, result.stderr
    assert "u1" in result.stdout


def test_a_store_whose_driver_is_missing(tmp_path: Path) -> None:
    config = write_config(tmp_path, store_url=f"postgresql+pg8000://audiencesync:{PASSWORD}@db.invalid/a")
    for command in (["db", "upgrade"], ["status"], ["sync", "--dry-run", "--audience", "locals"]):
        result = cli(config, *command)
        assert result.returncode == 2, result.stderr
        assert result.stderr == (
            "audiencesync: error: [store] url: the driver pg8000 (for postgresql+pg8000 URLs) is not "
            "installed. Fix: pip install pg8000\n"
        )
    check = cli(config, "check")
    assert "FAIL  store postgresql+pg8000://audiencesync:***@db.invalid/a\n" in check.stdout
    assert "ok    audience locals (source local)" in check.stdout
    assert PASSWORD not in check.stdout + check.stderr


def test_a_postgresql_store_without_psycopg_suggests_the_extra(tmp_path: Path) -> None:
    config = write_config(tmp_path, store_url=f"postgresql+psycopg://audiencesync:{PASSWORD}@db.invalid/a")
    # psycopg is installed here (the dev extra): hide it as if it were not.
    result = cli(config, "db", "upgrade", preamble="sys.modules['psycopg'] = None")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "audiencesync: error: [store] url: the driver psycopg (for postgresql+psycopg URLs) is not "
        "installed. Fix: pip install 'audiencesync[postgres]'\n"
    )


def test_an_unknown_dialect(tmp_path: Path) -> None:
    config = write_config(tmp_path, shop_url="nosuchdb://db.invalid/shop")
    check = cli(config, "check")
    assert "Traceback" not in check.stderr, check.stderr
    assert (
        "      audience 'buyers' (source 'shop'): SQLAlchemy has no dialect for nosuchdb URLs. "
        "Fix: check the URL's scheme"
    ) in check.stdout
    sync = cli(config, "sync", "--dry-run")
    assert sync.returncode == 2 and "SQLAlchemy has no dialect for nosuchdb URLs" in sync.stderr


BROKEN_PSYCOPG = """
import importlib.abc

class Broken(importlib.abc.MetaPathFinder):  # psycopg as without its binary and with no libpq
    def find_spec(self, name, path, target=None):
        if name == "psycopg":
            raise ImportError("no pq wrapper available.")

sys.meta_path.insert(0, Broken())
"""


def test_a_driver_that_is_there_but_fails_to_load_says_why(tmp_path: Path) -> None:
    config = write_config(tmp_path, store_url=f"postgresql+psycopg://audiencesync:{PASSWORD}@db.invalid/a")
    result = cli(config, "db", "upgrade", preamble=BROKEN_PSYCOPG)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "audiencesync: error: [store] url: the driver psycopg (for postgresql+psycopg URLs) cannot be "
        "loaded: no pq wrapper available. Fix: pip install 'audiencesync[postgres]'\n"
    )
