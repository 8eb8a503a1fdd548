"""The command line's tables: whole when piped, what matters kept on an 80-column terminal."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from audiencesync.cli import main as cli
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_cli import run, sync_with_u2_parked

HUMAN_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
# sync_with_u2_parked's Gleap refuses u2 with this body; a table shows its newline as a space.
ANSWER = "HTTP 422: unprocessable entity"
HINT = re.compile(r"output was cut to 80 columns.*; see all of it with \| less -S or --format csv")


class Terminal(io.StringIO):
    """A stdout that says it is a terminal, as a tty's does."""

    def isatty(self) -> bool:
        return True


def on_terminal(
    config: Path,
    *args: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    status: int = 0,
) -> tuple[list[str], str]:
    """`audiencesync ARGS...` in this process, its stdout an 80-column terminal: (lines, stderr)."""
    screen = Terminal()
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setenv("COLUMNS", "80")
        patch.setattr(sys, "stdout", screen)
        exited = cli.main(["--config", str(config), *args])
    assert exited == status, capsys.readouterr().err
    return screen.getvalue().splitlines(), capsys.readouterr().err


def on_a_pty(config: Path, *args: str, columns: int = 80) -> tuple[list[str], str]:
    """`audiencesync ARGS...` as a process whose stdout is a pseudo-terminal ``columns`` wide."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "GLEAP_API_TOKEN")}
    with subprocess.Popen(
        [sys.executable, "-m", "audiencesync", "--config", str(config), *args],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
    ) as process:
        os.close(follower)
        chunks = []
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                if not select.select([leader], [], [], 1)[0]:
                    continue
                try:
                    chunk = os.read(leader, 65536)
                except OSError as exc:  # Linux: EIO once the process closed its end
                    if exc.errno != errno.EIO:
                        raise
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            assert process.stderr is not None
            stderr = process.stderr.read().decode()
            assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, stderr
        finally:
            os.close(leader)
    # The terminal turns each "\n" into "\r\n".
    return b"".join(chunks).decode().replace("\r\n", "\n").splitlines(), stderr


def test_status_on_a_real_80_column_terminal_keeps_the_result_and_a_whole_last_run(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    path = sync_with_u2_parked(make_config, source, gleap).path
    lines, stderr = on_a_pty(path, "status")
    header, row = lines[:2]
    assert header.split() == ["audience", "condition", "members", "pending", "last_run", "result"]
    assert re.fullmatch(rf"segment_a +parked +2 +0 +{HUMAN_TIME}  partial", row), lines
    assert len(header) <= 80 and len(row) <= 80
    assert HINT.search(stderr) and "(14 of 20 columns left out)" in stderr, stderr


def test_failures_on_a_terminal_keep_gleaps_answer_whole(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = sync_with_u2_parked(make_config, source, gleap).path
    lines, stderr = on_terminal(path, "failures", monkeypatch=monkeypatch, capsys=capsys)
    assert lines[0].split() == ["audience", "user_id", "value", "attempts", "last_error"]
    assert re.fullmatch(rf"segment_a +u2 +true +1 +{ANSWER}", lines[1]), lines
    assert "(1 of 6 columns left out)" in stderr and HINT.search(stderr)

    # So do a sync's summary and the runs' audit: their result stays.
    monkeypatch.setenv("GLEAP_API_TOKEN", TOKEN)
    lines, _ = on_terminal(path, "sync", monkeypatch=monkeypatch, capsys=capsys, status=1)
    assert HINT.fullmatch(lines[2]), lines  # right after its table, on the same stream
    assert lines[0].split()[:2] == ["audience", "result"] and lines[1].split()[:2] == ["segment_a", "partial"]
    assert all(len(line) <= 80 for line in lines[:2])
    lines, _ = on_terminal(path, "audit", "runs", monkeypatch=monkeypatch, capsys=capsys)
    assert lines[0].split()[:4] == ["run_id", "audience_key", "started_at", "status"]
    assert re.match(rf"2 +segment_a +{HUMAN_TIME} +partial", lines[1]), lines


def test_no_hint_for_an_empty_table_or_json_on_a_terminal(
    make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config()  # a store, no sync yet: nothing to list
    lines, stderr = on_terminal(config.path, "status", monkeypatch=monkeypatch, capsys=capsys)
    assert lines[0].split()[:2] == ["audience", "condition"] and len(lines[0]) <= 80
    assert "output was cut" not in stderr, stderr
    for args in (("status", "--format", "json"), ("failures", "--format", "json"), ("failures",)):
        _, stderr = on_terminal(config.path, *args, monkeypatch=monkeypatch, capsys=capsys)
        assert "output was cut" not in stderr, (args, stderr)


def test_piped_tables_keep_every_column_and_every_value_whole(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    path = sync_with_u2_parked(make_config, source, gleap).path
    status = run(path, "status")  # stdout a pipe, COLUMNS=80 notwithstanding
    header, row = status.stdout.splitlines()[:2]
    assert len(header.split()) == 20 and header.split()[-1] == "field_conflicts"
    assert re.match(rf"segment_a +parked +2 +0 +1 +0 +- +{HUMAN_TIME} +partial ", row), row
    failures = run(path, "failures")
    assert re.fullmatch(rf"segment_a +u2 +true +1 +{HUMAN_TIME}  {ANSWER}", failures.stdout.splitlines()[1])
    assert "output was cut" not in status.stderr + failures.stderr
