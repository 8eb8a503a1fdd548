"""The status pages' token without [server] listen: `serve --listen` gives the address and uses the
token; `run`, which then serves nothing, says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ConfigFactory

WEB_TOKEN = "web-token-0123456789abcdef"
CLI = (sys.executable, "-m", "audiencesync", "--config")


def environment() -> dict[str, str]:
    """The test's environment without a token of its own: only the config file's counts."""
    return {k: v for k, v in os.environ.items() if k not in ("AUDIENCESYNC_SERVER_TOKEN", "GLEAP_API_TOKEN")}


def test_serve_listen_uses_the_token_of_a_config_without_listen(make_config: ConfigFactory) -> None:
    config = make_config(extra=f'[server]\nauth_token = "{WEB_TOKEN}"\n')
    assert config.server is None  # the daemon serves nothing; the config loads all the same
    process = subprocess.Popen(
        [*CLI, str(config.path), "serve", "--listen", "0.0.0.0:0"],
        stderr=subprocess.PIPE, text=True, env=environment(),
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # blocks until serve says where it listens (or dies)
        found = re.search(r"http://0\.0\.0\.0:(\d+)/", line)
        assert found, line + process.stderr.read()
        base = f"http://127.0.0.1:{found.group(1)}"
        assert httpx.get(base + "/", timeout=10).status_code == 401  # the file's token guards it
        page = httpx.get(base + "/", headers={"Authorization": f"Bearer {WEB_TOKEN}"}, timeout=10)
        assert page.status_code == 200 and "(audiencesync serve)" in page.text
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)  # a missing file stops `run` early
def test_run_with_a_token_and_no_listen_says_it_serves_nothing(make_config: ConfigFactory) -> None:
    config = make_config(extra=f'[server]\nauth_token = "{WEB_TOKEN}"\n', create_store=False)
    # With no store file, `run` stops right after its checks (exit 3): enough to see what it says.
    done = subprocess.run(
        [*CLI, str(config.path), "run"], capture_output=True, text=True, env=environment(), timeout=60
    )
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert (
        "the status pages' token is set ([server] auth_token or $AUDIENCESYNC_SERVER_TOKEN) but "
        "[server] listen is not, so this daemon serves no pages, /healthz or /metrics"
    ) in done.stderr
    assert 'Fix: to serve them here, add listen = "127.0.0.1:9464"' in done.stderr
    assert WEB_TOKEN not in done.stderr
