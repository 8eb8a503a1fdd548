"""The shipped service files: the systemd unit and the Containerfile agree with the daemon they run.

The container's HEALTHCHECK command is run for real, against a daemon's /healthz.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from audiencesync.config.sections import ScheduleConfig
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, free_port, wait_for
from tests.test_daemon_hardening import InProcess

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "audiencesync.service"
CONTAINERFILE = ROOT / "Containerfile"


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_the_unit_is_notify_with_a_watchdog_and_a_stop_timeout_that_fits_the_grace() -> None:
    unit = unit_settings()
    assert unit["Type"] == "notify" and unit["NotifyAccess"] == "main"
    assert unit["KillSignal"] == "SIGTERM" and unit["Restart"] == "on-failure"
    assert unit["User"] == "audiencesync" and unit["EnvironmentFile"] == "/etc/audiencesync/env"
    assert unit["ExecStart"].endswith("--config /etc/audiencesync/audiencesync.toml run")
    # Longer than a store write's default wait for SQLite's lock, and than the wind-down after a
    # lost lease (active_period.ActivePeriod._shutdown_work: two joins of grace + 5 s, then the grace).
    grace = ScheduleConfig.shutdown_grace_seconds
    assert float(unit["WatchdogSec"]) > max(30, 3 * grace + 10)
    assert float(unit["TimeoutStopSec"]) >= ScheduleConfig.shutdown_grace_seconds + 15


def test_the_containerfile_runs_the_daemon_as_a_user_with_the_mounted_config() -> None:
    text = CONTAINERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^USER audiencesync$", text, re.M)
    assert "ENV AUDIENCESYNC_CONFIG=/etc/audiencesync/audiencesync.toml" in text
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert 'ENTRYPOINT ["audiencesync"]\nCMD ["run"]' in text
    # Everything COPY'd exists, and .dockerignore (an allowlist) lets it into the build context.
    allowed = {
        line.strip("!/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    for copy in re.findall(r"^COPY (.+) /src/?\S*$", text, re.M):
        for source in copy.split():
            assert (ROOT / source).exists() and source in allowed, source


def healthcheck(config: Path) -> int:
    """The container's HEALTHCHECK command, run as Docker would run it (exec form)."""
    text = CONTAINERFILE.read_text()
    command = json.loads(re.search(r"^HEALTHCHECK .* CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert command[0] == "python"
    env = os.environ | {"AUDIENCESYNC_CONFIG": str(config)}
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=60).returncode


def test_the_healthcheck_asks_healthz_when_the_server_is_configured(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, tmp_path: Path
) -> None:
    port = free_port()
    source.set(["u1"])
    config = make_config(
        gleap.base_url, sync=SYNC, extra=SCHEDULE + f'[server]\nlisten = "127.0.0.1:{port}"\n'
    )
    bare = tmp_path / "bare.toml"
    bare.write_text('[store]\nurl = "sqlite:///x.db"\n')
    assert healthcheck(bare) == 0  # nothing to ask
    assert healthcheck(config.path) != 0  # nothing answers yet
    any_address = tmp_path / "any.toml"
    any_address.write_text(f'[server]\nlisten = "0.0.0.0:{port}"\n')
    with InProcess(config):
        # Polled, not asked once: /healthz answers 503 for a moment when the daemon falls behind
        # (a 3 s lease on a loaded machine), and each ask is a new interpreter (failed once in CI).
        wait_for(lambda: healthcheck(config.path) == 0, timeout=60, what="the healthcheck to pass")
        # 0.0.0.0 is asked on loopback
        wait_for(lambda: healthcheck(any_address) == 0, timeout=60, what="the healthcheck of 0.0.0.0 to pass")


def test_the_unit_and_the_container_cap_the_malloc_arenas() -> None:
    """glibc's default arenas (8 per core) kept what the daemon's short-lived threads freed:
    RSS crept up while the heap in use stayed flat (docs/performance.md: Memory over time)."""
    assert unit_settings()["Environment"] == "MALLOC_ARENA_MAX=1"
    env = re.search(r"^ENV ((?:.*\\\n)*.*)$", CONTAINERFILE.read_text(), re.M)
    assert env is not None and re.search(r"\bMALLOC_ARENA_MAX=1\b", env.group(1))
