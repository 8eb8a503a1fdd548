"""What every command pays at start-up: the daemon's and the web pages' libraries are imported
by `run` and `serve` alone (cli/sync.py, cli/serve.py). The suite launches the CLI hundreds of
times, and an operator's cron launches it too: each of these costs tens of milliseconds."""

from __future__ import annotations

import json
import subprocess
import sys

ONLY_FOR_RUN_AND_SERVE = (
    "apscheduler",
    "prometheus_client",
    "jinja2",
    "audiencesync.daemon.scheduler",
    "audiencesync.web.app",
)


def test_the_cli_starts_without_the_daemons_and_the_pages_libraries() -> None:
    code = "import json, sys, audiencesync.cli.main; print(json.dumps(sorted(sys.modules)))"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(json.loads(ran.stdout))
    assert "audiencesync.cli.sync" in loaded  # every command is registered; run and serve import these
    # when they run (tests/test_daemon.py and tests/test_serve*.py start them)
    assert loaded.isdisjoint(ONLY_FOR_RUN_AND_SERVE), sorted(loaded & set(ONLY_FOR_RUN_AND_SERVE))
