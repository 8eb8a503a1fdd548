"""The README's quick start, run as a new user would: the shell blocks between `<!-- quickstart -->`
markers, in order, in a copy of the repository, in a fresh venv that the first block creates
(`python3 -m venv .venv && .venv/bin/pip install -e .`, as written: pip's own cache makes the
install about a minute here, and the venv must be fresh for the test to mean anything). The
shell runs with no venv on its PATH, so a bare `audiencesync` that is only in `.venv/bin` fails
here as it would for the user.

What a test cannot have is changed, and only that:
- Gleap: the copy's config.example.toml sends to the tests' loopback stand-in (its base_url), as
  fast as it answers (its requests_per_minute), and `GLEAP_API_TOKEN=...` is the stand-in's token.
- The port: `serve` gets `--listen 127.0.0.1:PORT` on a free port (9464 may be taken on a shared
  machine), runs in the background until its page answers, and is stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx

from tests.gleap_standin import GleapStandIn

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- quickstart -->\n```sh\n(.*?)```\n<!-- /quickstart -->", re.S)
TOKEN = "quickstart-token"  # the stand-in's


def quickstart_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_marks_its_quick_start() -> None:
    blocks = quickstart_blocks()
    assert len(blocks) == 3, blocks
    assert blocks[0].startswith("python3 -m venv .venv && .venv/bin/pip install -e . && ")
    assert "GLEAP_API_TOKEN=... audiencesync --config config.example.toml sync\n" in blocks[1]
    assert blocks[2].rstrip().endswith("audiencesync --config demo/config.toml serve")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def user_environment() -> dict[str, str]:
    """This environment without any venv: as a new user's shell, before the quick start."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "GLEAP_API_TOKEN", "PYTHONPATH"}}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if not (Path(p).parent / "pyvenv.cfg").exists()]
    env["PATH"] = os.pathsep.join(path)
    return env


def copy_of_the_repository(destination: Path) -> Path:
    ignored = shutil.ignore_patterns(
        ".git", ".venv", "mutants", "__pycache__", "*.db", "*.db-wal", "*.db-shm", "*.egg-info",
        ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "dist", "demo", "results",
    )  # fmt: skip
    shutil.copytree(ROOT, destination, ignore=ignored)
    return destination


def sh(script: str, cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def serve_until_it_answers(line: str, cwd: Path, env: dict[str, str]) -> str:
    """Run a `serve` line in the background on a free port; its overview page, once it answers."""
    port = free_port()
    server = subprocess.Popen(
        ["bash", "-c", f"exec {line} --listen 127.0.0.1:{port}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise AssertionError(f"{line!r} exited {server.returncode}: {server.communicate()[1]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"{line!r} did not answer on port {port} within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_the_readme_quick_start_runs_as_written_in_a_fresh_venv(tmp_path: Path) -> None:
    first, real_sync, web_page = quickstart_blocks()
    repo = copy_of_the_repository(tmp_path / "audiencesync")
    env = user_environment()

    # Try it: a fresh venv, the demo source, a dry run.
    run = sh(first, repo, env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    calls = int(re.search(r"dry run: (\d+) call\(s\) would be made", run.stderr).group(1))  # type: ignore[union-attr]
    assert calls > 1000 and "nothing was sent or stored" in run.stderr
    assert not (repo / "audiencesync.db").exists()

    # To really sync: the venv activated, the store created, the token set.
    with GleapStandIn(TOKEN) as gleap:
        config = repo / "config.example.toml"
        text = config.read_text()
        for old, new in (
            ('base_url = "https://api.gleap.io"', f'base_url = "{gleap.base_url}"'),
            ("requests_per_minute = 1000 ", "requests_per_minute = 600000 "),
        ):
            assert old in text, old
            text = text.replace(old, new)
        config.write_text(text)
        assert "GLEAP_API_TOKEN=... " in real_sync
        run = sh(real_sync.replace("GLEAP_API_TOKEN=... ", f"GLEAP_API_TOKEN={TOKEN} "), repo, env)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        assert len(gleap.identify_calls) == calls  # what the dry run listed, sent
    assert stat.S_IMODE((repo / "audiencesync.db").stat().st_mode) == 0o600

    # The web page on the demo data, without a browser.
    *build, serve = [line for line in web_page.splitlines() if line.strip()]
    assert serve.split("#")[0].rstrip().endswith(" serve")
    run = sh("\n".join(build), repo, env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    page = serve_until_it_answers(serve.split("#")[0].rstrip(), repo, env)
    assert "<title>Overview · audiencesync" in page and "order_completed_last_30_days" in page
