"""A dry run on a terminal lists its first few calls, says how many it left out and how to get
them, then its summary; to a pipe or a file, and in csv or json, it lists every call."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from audiencesync.sync.dry_run import LISTED_ON_A_TERMINAL, Listing
from tests.conftest import ConfigFactory, SourceDB

USERS = [f"u{i:02d}" for i in range(12)]


def test_the_listing_is_short_only_for_a_table_on_a_terminal() -> None:
    assert Listing.for_output(table=True, terminal=True, all_calls=False).limit == LISTED_ON_A_TERMINAL
    assert Listing.for_output(table=True, terminal=True, all_calls=True).limit is None
    assert Listing.for_output(table=True, terminal=False, all_calls=False).limit is None
    assert Listing.for_output(table=False, terminal=True, all_calls=False).limit is None


def test_a_short_listing_reads_no_call_past_its_limit_and_says_what_it_left_out() -> None:
    calls = iter(range(12))
    listing = Listing(5)
    assert list(listing.take(calls)) == [0, 1, 2, 3, 4]
    assert next(calls) == 5  # the rest is left for the plan to count
    assert listing.note(12) == (
        "first 5 of 12 calls listed; --all-calls for all, --format csv > calls.csv for a file"
    )
    assert listing.note(5) is None  # nothing left out
    whole = Listing(None)
    assert list(whole.take(range(12))) == list(range(12)) and whole.note(12) is None


def dry_run(config: Path, *args: str, terminal: bool) -> tuple[int, str, str]:
    """`sync --dry-run` with stdout on a pseudo-terminal (or a pipe): its status, stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if k != "GLEAP_API_TOKEN"}
    command = [sys.executable, "-m", "audiencesync", "--config", str(config), "sync", "--dry-run", *args]
    if not terminal:
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        return run.returncode, run.stdout, run.stderr
    controller, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:  # read as it writes: a full pty would block the command
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        process = subprocess.run(
            command, stdout=child, stderr=subprocess.PIPE, text=True, env=env, timeout=120
        )
    finally:
        os.close(child)
    reader.join(30)
    os.close(controller)
    return process.returncode, b"".join(chunks).decode().replace("\r\n", "\n"), process.stderr


def call_numbers(stdout: str) -> list[int]:
    return sorted({int(line.split()[0]) for line in stdout.splitlines() if line[:1].isdigit()})


def test_on_a_terminal_the_dry_run_lists_the_first_calls_then_says_how_to_get_all(
    make_config: ConfigFactory, source: SourceDB
) -> None:
    source.set(USERS)
    config = make_config(token=None)
    status, stdout, stderr = dry_run(config.path, terminal=True)
    assert status == 0, stderr
    assert call_numbers(stdout) == list(range(1, LISTED_ON_A_TERMINAL + 1))
    last = stdout.rstrip().splitlines()[-1]
    listed = f"first {LISTED_ON_A_TERMINAL} of 12 calls listed"
    assert last == f"{listed}; --all-calls for all, --format csv > calls.csv for a file"
    assert "dry run: 12 call(s) would be made" in stderr  # the count covers every call
    status, stdout, _ = dry_run(config.path, "--all-calls", terminal=True)
    assert status == 0 and call_numbers(stdout) == list(range(1, 13)) and "calls listed" not in stdout


def test_to_a_pipe_the_dry_run_lists_every_call(make_config: ConfigFactory, source: SourceDB) -> None:
    source.set(USERS)
    config = make_config(token=None)
    status, stdout, stderr = dry_run(config.path, terminal=False)
    assert status == 0, stderr
    assert call_numbers(stdout) == list(range(1, 13)) and "calls listed" not in stdout + stderr


def test_all_calls_is_refused_without_dry_run(make_config: ConfigFactory, source: SourceDB) -> None:
    source.set(USERS)
    config = make_config()
    run = subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), "sync", "--all-calls"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "--all-calls lists a dry run's calls. Fix: add --dry-run, or drop --all-calls" in run.stderr


def test_the_readme_and_the_docs_state_how_many_calls_a_terminal_shows() -> None:
    root = Path(__file__).resolve().parent.parent
    readme = " ".join((root / "README.md").read_text().split())
    commands = " ".join((root / "docs" / "commands.md").read_text().split())  # the command reference
    assert f"On a terminal it lists the first {LISTED_ON_A_TERMINAL} of the calls it would make" in readme
    assert f"a dry run's table lists its first {LISTED_ON_A_TERMINAL} calls" in commands
