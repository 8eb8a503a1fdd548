"""The `audiencesync` console script as a real process: output, exit statuses, no leaked token."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pytest

from audiencesync.errors import StoreBusyError
from tests.conftest import SQLITE_ONLY, TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn


def run(config_path: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    # stdout is a pipe, so tables cut nothing; COLUMNS would pin the width only on a terminal.
    env = {k: v for k, v in os.environ.items() if k != "GLEAP_API_TOKEN"} | {"COLUMNS": "80"}
    if token is not None:
        env["GLEAP_API_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_sync_then_nothing_to_do_then_a_failure(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "u2", "u3"])
    config = make_config(gleap.base_url, token=None)
    done = run(config.path, "--log-level", "DEBUG", "sync", token=TOKEN)
    assert done.returncode == 0, done.stderr
    assert "segment_a" in done.stdout and "succeeded" in done.stdout
    assert "segment_a: succeeded (initial) members=3 entered=3" in done.stderr  # the summary log line
    assert set(gleap.contacts) == {"u1", "u2", "u3"}

    again = run(config.path, "sync", token=TOKEN)
    assert again.returncode == 0 and len(gleap.identify_calls) == 3

    source.set(["u1", "u2", "u4"])
    gleap.fail_user("u4", 422, body="unprocessable")
    partial = run(config.path, "--log-level", "DEBUG", "sync", token=TOKEN)
    assert partial.returncode == 1
    assert "partial" in partial.stdout
    for output in (done, again, partial):
        assert TOKEN not in output.stdout + output.stderr


def test_rejected_token_exits_1_with_advice_and_no_secret(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, token=None)
    wrong = "wrong-token-1234"
    result = run(config.path, "--log-level", "DEBUG", "sync", token=wrong)
    assert result.returncode == 1
    assert "GLEAP_API_TOKEN" in result.stderr and "401" in result.stderr
    assert "Traceback" not in result.stderr
    assert wrong not in result.stdout + result.stderr


def test_dry_run_prints_the_calls_on_stdout_and_the_summary_on_stderr(
    make_config: ConfigFactory, source: SourceDB
) -> None:
    source.set(["u1", 2])
    config = make_config(token=None)
    result = run(config.path, "sync", "--dry-run", "--format", "jsonl")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [
        {"call": 1, "user_id": "2", "audience": "segment_a", "value": True},
        {"call": 2, "user_id": "u1", "audience": "segment_a", "value": True},
    ]
    assert "1 call" not in result.stderr and "2 call(s) would be made" in result.stderr


# One store is enough to show the mapping.
@SQLITE_ONLY
def test_unreachable_store_exits_3(tmp_path: Path, make_config: ConfigFactory, store_url: str) -> None:
    config = make_config()
    text = config.path.read_text().replace(store_url, f"sqlite:///{tmp_path}/missing/dir/store.db")
    config.path.write_text(text)
    result = run(config.path, "sync", token=TOKEN)
    assert result.returncode == 3, result.stderr
    assert "missing/dir/store.db does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "missing").exists()


def test_db_upgrade_and_current(make_config: ConfigFactory, store_url: str) -> None:
    config = make_config(create_store=False)
    current = run(config.path, "db", "current")
    if store_url.startswith("sqlite"):
        assert current.returncode == 3 and "does not exist" in current.stderr
    else:
        assert "schema revision none" in current.stdout
    upgraded = run(config.path, "db", "upgrade")
    assert upgraded.returncode == 0 and "upgraded to" in upgraded.stdout
    assert "up to date" in run(config.path, "db", "current").stdout
    assert "already at" in run(config.path, "db", "upgrade").stdout


def test_json_logs_are_one_object_per_line(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, token=None)
    result = run(config.path, "--log-format", "json", "--log-level", "INFO", "sync", token=TOKEN)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    summary = [e for e in entries if e["logger"] == "audiencesync.sync.cycle"]
    assert (
        summary and summary[0]["level"] == "INFO" and summary[0]["message"].startswith("segment_a: succeeded")
    )
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)


def test_progress_bar_on_a_terminal(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    import fcntl
    import pty
    import struct
    import termios

    source.set([f"u{i}" for i in range(30)])
    config = make_config(gleap.base_url, token=None)
    controller, terminal = pty.openpty()
    # A real terminal has a size; a new pty has 0x0, in which tqdm draws nothing.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "GLEAP_API_TOKEN"} | {"GLEAP_API_TOKEN": TOKEN}
    process = subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), "sync"],
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env=env,
        timeout=60,
        check=False,
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.returncode == 0
    text = output.decode(errors="replace")
    assert "delivering" in text and "30/30" in text and "call/s" in text


def test_check_reports_each_part(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
    source.set(["u1"])
    audiences = """
        [[audiences]]
        name = "Segment A"
        source = "main"
        query = "SELECT user_id FROM members"

        [[audiences]]
        name = "Broken"
        source = "main"
        query = "SELECT segment FROM members"
    """
    config = make_config(gleap.base_url, token=None, audiences=audiences)
    good = run(config.path, "check", token=TOKEN)
    assert good.returncode == 1  # the broken audience
    lines = good.stdout.splitlines()
    assert any(line.startswith("ok    gleap token") for line in lines)
    assert any(line.startswith("ok    audience segment_a") for line in lines)
    assert any(line.startswith("FAIL  audience broken") for line in lines) and "no 'user_id'" in good.stdout
    assert any(line.startswith("ok    store") and "up to date" in line for line in lines)

    wrong = run(config.path, "check", token="not-the-token")
    assert "FAIL  gleap token" in wrong.stdout and "401" in wrong.stdout
    assert "not-the-token" not in wrong.stdout + wrong.stderr


ISO_WITH_OFFSET = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"


def write_config(tmp_path: Path, store_url: str, source_url: str, extra: str = "") -> Path:
    path = tmp_path / "plain.toml"
    path.write_text(
        f'[store]\nurl = "{store_url}"\n\n[gleap]\nbase_url = "http://127.0.0.1:9"\n\n'
        f'[sources.main]\nurl = "{source_url}"\n{extra}\n'
        '[[audiences]]\nname = "Segment A"\nsource = "main"\nquery = "SELECT user_id FROM members"\n\n'
        '[[audiences]]\nname = "Segment B"\nsource = "main"\nquery = "SELECT user_id FROM members"\n'
    )
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["sync", "--dry-run", "--audience", "segment_c"],
        ["audit", "user", "u1", "--audience", "segment_c"],
        ["audit", "members", "segment_c"],
        ["audit", "diff", "segment_c", "--from", "2d", "--to", "1d"],
        ["audit", "runs", "--audience", "segment_c"],
        ["failures", "--audience", "segment_c"],
        ["retry", "--audience", "segment_c"],
    ],
)
def test_every_command_refuses_an_unconfigured_audience_key(
    tmp_path: Path, source: SourceDB, command: list[str]
) -> None:
    # No store file at all: the key must be refused before the store is even looked at.
    store_path = tmp_path / "never.db"
    config = write_config(tmp_path, f"sqlite:///{store_path}", source.url)
    result = run(config, *command)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no audience or trait has the key 'segment_c'" in result.stderr
    assert "segment_a, segment_b" in result.stderr and "Traceback" not in result.stderr
    assert not store_path.exists()


class Synced(NamedTuple):
    path: Path  # the config file
    result: subprocess.CompletedProcess[str]


def sync_with_u2_parked(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, *sync_args: str
) -> Synced:
    """One `sync` of u1 and u2 into segment_a in which Gleap rejects u2 (422), which parks it."""
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, token=None, extra="[sync]\nmax_attempts = 1\n")
    gleap.fail_user("u2", 422, body="unprocessable\nentity")
    result = run(config.path, "sync", *sync_args, token=TOKEN)
    assert result.returncode == 1, result.stderr
    return Synced(config.path, result)


def test_times_print_as_iso_8601_with_an_offset(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    config = sync_with_u2_parked(make_config, source, gleap)

    table = run(config.path, "audit", "user", "u1")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[0] == "at"
    assert re.search(rf"^{ISO_WITH_OFFSET} +segment_a +entered", table.stdout, re.MULTILINE), table.stdout

    as_json = json.loads(run(config.path, "audit", "user", "u1", "--format", "json").stdout)
    assert as_json and all(re.fullmatch(r"\d{4}-.*T.*\+00:00", event["at"]) for event in as_json)

    parked = run(config.path, "failures")
    assert re.search(rf"^segment_a +u2 +true +1 +{ISO_WITH_OFFSET}  ", parked.stdout, re.MULTILINE), (
        parked.stdout
    )

    members = run(config.path, "audit", "members", "segment_a", "--at", "2999-11-01T12:00:00Z")
    assert members.returncode == 0 and [line.split()[0] for line in members.stdout.splitlines()] == [
        "user_id",
        "u1",
        "u2",
    ]
    assert re.fullmatch(rf"u1 +{ISO_WITH_OFFSET}", members.stdout.splitlines()[1]), members.stdout
    assert "at 2999-11-01T12:00:00+00:00" in members.stderr


def test_store_busy_message_shows_iso_times() -> None:
    since = datetime(2026, 12, 1, 19, 25, 25, 123456, tzinfo=UTC)
    message = str(StoreBusyError(holder="h pid 1", since=since, expires=since, waited=0))
    assert "since 2026-12-01T19:25:25+00:00;" in message and "runs to 2026-12-01T19:25:25+00:00" in message


def test_check_reports_a_missing_store_and_leaves_no_file(
    tmp_path: Path, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    store_path = tmp_path / "typo.db"
    config = write_config(tmp_path, f"sqlite:///{store_path}", source.url)
    result = run(config, "check", token=TOKEN)
    assert result.returncode == 1, result.stderr
    assert f"FAIL  store sqlite:///{store_path}\n" in result.stdout
    assert f"the store file {store_path} does not exist" in result.stdout and "db upgrade" in result.stdout
    assert "ok    audience segment_a" in result.stdout  # the other parts are still checked
    assert not store_path.exists()


# The source, not the store, is under test.
@SQLITE_ONLY
def test_a_missing_sqlite_source_is_an_error_and_is_never_created(
    tmp_path: Path, make_config: ConfigFactory, store_url: str
) -> None:
    config = make_config()
    missing = tmp_path / "no_such_source.db"
    config.path.write_text(
        re.sub(r'(\[sources\.main\]\nurl = )"[^"]*"', rf'\1"sqlite:///{missing}"', config.path.read_text())
    )
    checked = run(config.path, "check", token=TOKEN)
    assert checked.returncode == 1
    assert "FAIL  audience segment_a (source main)" in checked.stdout
    assert f"(source 'main'): the source file {missing} does not exist" in checked.stdout
    for command in (["sync", "--dry-run"], ["sync"]):
        synced = run(config.path, *command, token=TOKEN)
        assert synced.returncode == 1 and f"{missing} does not exist" in synced.stdout + synced.stderr
    assert not missing.exists()


def test_a_password_from_the_environment_is_never_shown(tmp_path: Path, source: SourceDB) -> None:
    password = "s3cr3t-pa55"
    unreachable = "postgresql+psycopg://postgres:${H1_DB_PASSWORD}@127.0.0.1:1/test_nowhere"
    config = write_config(tmp_path, unreachable, unreachable.replace("test_nowhere", "test_source"))
    env = {k: v for k, v in os.environ.items() if k != "GLEAP_API_TOKEN"} | {"H1_DB_PASSWORD": password}

    def run_with_env(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "audiencesync", "--config", str(path), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    checked = run_with_env(config, "check")
    assert "FAIL  store postgresql+psycopg://postgres:***@127.0.0.1:1/test_nowhere" in checked.stdout
    assert "FAIL  audience segment_a" in checked.stdout and "postgres:***@" in checked.stdout
    synced = run_with_env(config, "sync", "--dry-run")
    assert synced.returncode == 3 and "postgres:***@" in synced.stderr

    # A URL that only breaks once expanded: the error must not quote it.
    env["H1_DB_PASSWORD"] = f"{password}@@ not a url"
    broken = write_config(tmp_path, "${H1_DB_PASSWORD}", source.url)
    refused = run_with_env(broken, "check")
    assert refused.returncode == 2
    assert "[store].url: is not a valid database URL (after expanding ${...})" in refused.stderr
    for output in (checked, synced, refused):
        assert password not in output.stdout + output.stderr
