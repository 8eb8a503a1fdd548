"""`audiencesync init`: the starter config it writes, the commands it prints, and every command's --help."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from audiencesync import __version__
from audiencesync.cli.main import build_parser
from audiencesync.config import starter
from audiencesync.config.alerts import ALERT_KEYS
from audiencesync.config.audiences import AUDIENCE_KEYS
from audiencesync.config.loading import ROOT_KEYS, load_config
from audiencesync.config.sections import (
    GLEAP_KEYS,
    RETENTION_KEYS,
    SCHEDULE_KEYS,
    SERVER_KEYS,
    SOURCE_KEYS,
    STORE_KEYS,
    SYNC_KEYS,
)
from audiencesync.config.tomltable import parse_duration
from audiencesync.config.traits import TRAIT_KEYS
from tests.conftest import TOKEN
from tests.gleap_standin import GleapStandIn


def audiencesync(cwd: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLEAP_API_TOKEN", "AUDIENCESYNC_CONFIG")}
    if token is not None:
        env["GLEAP_API_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "audiencesync", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        # This install's scripts on PATH, as in an activated venv: init prints plain `audiencesync`.
        env=env
        | {"COLUMNS": "100", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"},
        timeout=120,
        check=False,
    )


def app_database(path: Path, users: list[tuple[str, str]]) -> None:
    """The database the starter's [sources.app] names: users(id, plan)."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id TEXT PRIMARY KEY, plan TEXT)")
        conn.executemany("INSERT INTO users VALUES (?, ?)", users)
    conn.close()


def test_init_then_the_printed_commands_check_dry_run_and_sync(tmp_path: Path, gleap: GleapStandIn) -> None:
    written = audiencesync(tmp_path, "init")
    assert written.returncode == 0, written.stderr
    config = tmp_path / "audiencesync.toml"
    assert config.is_file() and written.stdout.startswith("Wrote audiencesync.toml")
    commands = [
        line.strip() for line in written.stdout.splitlines() if line.strip().startswith("audiencesync ")
    ]
    assert [command.split(" ", 3)[3] for command in commands] == [
        "db upgrade",
        "check",
        "sync --dry-run",
        "sync",
    ]
    assert all(command.startswith("audiencesync --config audiencesync.toml ") for command in commands)

    # What the user edits: the database (here, the starter's own app.db) and, for the test, Gleap's URL.
    app_database(tmp_path / "app.db", [("u1", "pro"), ("u2", "free"), ("u3", "pro")])
    text = config.read_text()
    assert '# base_url = "https://api.gleap.io"' in text
    config.write_text(text.replace('# base_url = "https://api.gleap.io"', f'base_url = "{gleap.base_url}"'))

    upgrade, check, dry_run, sync = (
        audiencesync(tmp_path, *shlex.split(c)[1:], token=TOKEN) for c in commands
    )
    assert upgrade.returncode == 0, upgrade.stderr
    assert check.returncode == 0, check.stdout + check.stderr
    assert [line.split()[0] for line in check.stdout.splitlines() if not line.startswith(" ")] == ["ok"] * 4
    assert "audience pro_users (source app)" in check.stdout
    assert dry_run.returncode == 0, dry_run.stderr
    assert re.findall(r"\b(u\d)\b", dry_run.stdout) == ["u1", "u3"]
    assert sync.returncode == 0, sync.stderr
    assert {user: attributes["pro_users"] for user, attributes in gleap.contacts.items()} == {
        "u1": True,
        "u3": True,
    }


def test_init_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    assert audiencesync(tmp_path, "init", str(path)).returncode == 0
    path.write_text("# my own edits\n")
    again = audiencesync(tmp_path, "init", str(path))
    assert again.returncode == 2
    assert str(path) in again.stderr and "already exists" in again.stderr and "delete" in again.stderr
    assert path.read_text() == "# my own edits\n"
    nowhere = audiencesync(tmp_path, "init", str(tmp_path / "missing" / "x.toml"))
    assert nowhere.returncode == 2 and "cannot write the file" in nowhere.stderr


def test_init_writes_where_config_points(tmp_path: Path) -> None:
    written = audiencesync(tmp_path, "--config", "etc/a.toml", "init")
    assert written.returncode == 2  # no such directory: the message names it
    (tmp_path / "etc").mkdir()
    written = audiencesync(tmp_path, "--config", "etc/a.toml", "init")
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "etc" / "a.toml").is_file()
    assert "audiencesync --config etc/a.toml check" in written.stdout


# --- the starter can't drift from the loader ------------------------------------------------------


def starter_keys() -> dict[str, list[str]]:
    """Each table of the rendered starter (commented-out or not) -> the option keys under it."""
    tables: dict[str, list[str]] = {}
    current = None
    for line in starter.render().splitlines():
        header = re.fullmatch(r"(?:# )?\[\[?([\w.]+)\]\]?", line)
        if header:
            current = tables.setdefault(header.group(1), [])
            continue
        option = re.fullmatch(r"(?:# )?(\w+) = .+", line)
        if option and current is not None:
            current.append(option.group(1))
    return tables


def test_every_option_the_loader_knows_is_in_the_starter() -> None:
    tables = starter_keys()
    # A trait takes no `events` (only audiences have entries and exits); the loader ignores it.
    trait_keys = [key for key in TRAIT_KEYS if key != "events"]
    expected = {
        "store": STORE_KEYS,
        "gleap": GLEAP_KEYS,
        "sync": SYNC_KEYS,
        "schedule": SCHEDULE_KEYS,
        "server": SERVER_KEYS,
        "retention": RETENTION_KEYS,
        f"sources.{starter.SOURCE_NAME}": SOURCE_KEYS,
        "audiences": AUDIENCE_KEYS,
        "traits": trait_keys,
        "alerts": ALERT_KEYS,
    }
    assert {name: sorted(keys) for name, keys in tables.items()} == {
        name: sorted(keys) for name, keys in expected.items()
    }
    assert [name.split(".")[0] for name in tables] == list(ROOT_KEYS)


def test_the_rendered_starter_holds_each_option_as_listed() -> None:
    lines = starter.render().splitlines()
    for section in starter.sections():
        for option in section.options:
            line = f"{option.key} = {starter.toml_value(option.value)}"
            commented = section.commented or not option.active
            assert (f"# {line}" if commented else line) in lines
            assert f"# {option.explain}" in lines


def section_toml(*, everything: bool) -> str:
    """The starter's tables, uncommented: with every option, or only those without a default."""
    lines = []
    for section in starter.sections():
        lines.append(section.header)
        for option in section.options:
            if everything or not option.default or option.active:
                lines.append(f"{option.key} = {starter.toml_value(option.value)}")
    return "\n".join(lines) + "\n"


def test_a_commented_out_option_is_at_its_real_default(tmp_path: Path) -> None:
    # Each option spelt out, against the loader's own defaults: the same config, table by table.
    minimal, full = tmp_path / "minimal.toml", tmp_path / "full.toml"
    minimal.write_text(section_toml(everything=False))
    full.write_text(section_toml(everything=True))
    environ = {"GLEAP_API_TOKEN": TOKEN}
    assert dataclasses.replace(load_config(full, environ), path=minimal) == load_config(minimal, environ)
    # And the starter as written (its optional tables off) loads.
    written = tmp_path / "starter.toml"
    written.write_text(starter.render())
    config = load_config(written, environ)
    assert [a.key for a in config.audiences] == ["pro_users"] and config.server is None


@pytest.mark.parametrize("seconds", [1.0, 59.0, 60.0, 900.0, 3600.0, 5400.0, 7200.0, 86400.0, 90061.0, 1.5])
def test_durations_read_back(seconds: float) -> None:
    assert parse_duration(starter.duration(seconds)) == seconds


# --- --help that teaches ------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*path, name))
                found += subcommands(sub, (*path, name))
    return found


def parser_for(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_every_command_says_what_it_does_its_defaults_and_an_example() -> None:
    paths = subcommands(build_parser())
    assert {p[0] for p in paths} >= {"sync", "run", "status", "check", "audit", "failures", "retry"}
    assert {p[0] for p in paths} >= {"prune", "forget", "db", "init"}
    assert ("db", "upgrade") in paths and ("audit", "members") in paths
    for path in paths:
        parser = parser_for(path)
        text = parser.format_help()
        assert parser.description and len(parser.description) > 30, path
        example = text.split("\nexample:\n", 1)
        assert len(example) == 2, f"{' '.join(path)}: no example"
        assert example[1].strip().splitlines()[0].lstrip().split()[0] in (
            "audiencesync",
            "GLEAP_API_TOKEN=...",
        )
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in parser._get_formatter()._format_action(action), (path, action.dest)


def test_version_and_help_need_no_config(tmp_path: Path) -> None:
    version = audiencesync(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"audiencesync {__version__}"
    helped = audiencesync(tmp_path, "prune", "--help")
    assert helped.returncode == 0 and "example:" in helped.stdout
    assert "(default 5000)" in " ".join(helped.stdout.split())


@pytest.mark.parametrize("activated", [True, False])
def test_init_prints_the_command_as_it_can_be_run(tmp_path: Path, activated: bool) -> None:
    """A venv not activated: the next steps name the script by the path it was run by."""
    script = Path(sys.executable).parent / "audiencesync"
    path = f"{script.parent}{os.pathsep}/usr/bin:/bin" if activated else "/usr/bin:/bin"
    env = {k: v for k, v in os.environ.items() if k not in ("GLEAP_API_TOKEN", "AUDIENCESYNC_CONFIG")}
    done = subprocess.run(
        [str(script), "init"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env | {"PATH": path},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    program = "audiencesync" if activated else str(script)
    steps = [line.strip() for line in done.stdout.splitlines() if "--config" in line]
    assert len(steps) == 4 and all(
        step.startswith(f"{program} --config audiencesync.toml ") for step in steps
    )
