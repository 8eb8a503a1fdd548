"""Admin actions reach a running daemon (issue 20, What 5).

`sync --audience KEY` while `audiencesync run` holds the store is handed to the
daemon like `--full`: it refreshes those audiences now and the command prints the
outcome. And a daemon becoming active re-runs at once what was left aborted or
failed, instead of leaving it red for a whole interval.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.store import store as store_mod
from audiencesync.store.schema import leases
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SYNC, Daemon, cli, daemons, members_true, wait_for
from tests.test_daemon_hardening import InProcess, query
from tests.test_sync import TWO_AUDIENCES, cycle

__all__ = ["daemons"]  # the fixture, re-used

# Long enough that nothing in a test is due by its interval: a refresh seen is one asked for.
HOURLY = """
[schedule]
interval = "1h"
jitter = "0s"
shutdown_grace_seconds = 5
"""


def runs(store_url: str) -> list[tuple[int, str, str, str]]:
    """(run id, audience key, mode, status), oldest first."""
    rows = query(
        store_url,
        "SELECT r.id, a.key, r.mode, r.status FROM sync_runs r "
        "JOIN audiences a ON a.id = r.audience_id ORDER BY r.id",
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def fake_daemon_lease(store_url: str, *, seconds: float) -> None:
    """A daemon elsewhere holding the lease, that never polls for requests (hung, or gone)."""
    engine = store_mod.create_engine(store_url)
    now = store_mod.utc_now()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(leases).values(
                name="writer", holder="h", host="elsewhere", pid=1, acquired_at=now, renewed_at=now,
                expires_at=now + timedelta(seconds=seconds), role="daemon",
            )
        )  # fmt: skip
    engine.dispose()


# --- sync --audience KEY is handed to the daemon -------------------------------------------------


def test_sync_audience_is_carried_out_by_the_running_daemon(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    store_url: str,
) -> None:
    source.set(["a1", "a2"])
    source.set(["b1"], segment="b")
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=HOURLY, audiences=TWO_AUDIENCES)
    daemon = daemons(config)
    wait_for(lambda: members_true(gleap) == {"a1", "a2"}, what="the first sync of segment_a")
    wait_for(lambda: members_true(gleap, "segment_b") == {"b1"}, what="the first sync of segment_b")

    source.set(["a1", "a2", "a3"])
    source.set(["b1", "b2"], segment="b")
    # A dry run stays local: it writes nothing, so it needs nothing from the daemon.
    planned = cli(config, "sync", "--audience", "segment_a", "--dry-run")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "a3" in planned.stdout
    assert query(store_url, "SELECT count(*) FROM admin_requests")[0][0] == 0

    asked = cli(config, "sync", "--audience", "segment_a", "--audience", "segment_b", "--wait", "60")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert f"the daemon on {socket.gethostname()} (pid {daemon.process.pid})" in asked.stdout
    assert "asked it to refresh segment_a, segment_b" in asked.stdout
    assert "segment_a: refreshed (incremental) entered=1 left=0" in asked.stdout
    assert "segment_b: refreshed (incremental) entered=1 left=0" in asked.stdout
    wait_for(lambda: members_true(gleap) == {"a1", "a2", "a3"}, what="the refreshed segment_a")
    wait_for(lambda: members_true(gleap, "segment_b") == {"b1", "b2"}, what="the refreshed segment_b")
    assert [tuple(r) for r in query(store_url, "SELECT kind, state FROM admin_requests ORDER BY id")] == [
        ("refresh", "done"),
        ("refresh", "done"),
    ]

    source.set([], segment="b")  # the guard holds an audience that would lose every member
    held = cli(config, "sync", "--audience", "segment_b", "--wait", "60")
    assert held.returncode == 1, held.stdout + held.stderr
    assert "segment_b: held, nothing was applied: " in held.stdout
    assert "--audience segment_b --allow-removals" in held.stdout  # how to release it
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_a_refresh_the_daemon_does_not_take_up_is_withdrawn(
    make_config: ConfigFactory, store_url: str
) -> None:
    config = make_config()
    fake_daemon_lease(store_url, seconds=3600)
    asked = cli(config, "sync", "--audience", "segment_a", "--wait", "1")
    assert asked.returncode == 1, asked.stdout + asked.stderr
    assert "asked it to refresh segment_a" in asked.stdout
    # The line that says it failed names the daemon, and what to do.
    (withdrawn,) = [line for line in asked.stdout.splitlines() if "withdrawn" in line]
    assert "elsewhere (pid 1)" in withdrawn and "Fix:" in withdrawn
    assert [tuple(r) for r in query(store_url, "SELECT kind, state FROM admin_requests")] == [
        ("refresh", "failed")
    ]


def test_a_plain_sync_names_what_a_daemon_takes(make_config: ConfigFactory, store_url: str) -> None:
    # Every audience is the daemon's own schedule: a plain sync is not handed over (cron's
    # overlapping run), and its message says what is, instead of "let it finish".
    config = make_config()
    fake_daemon_lease(store_url, seconds=3600)
    plain = cli(config, "sync")
    assert plain.returncode == 4, plain.stdout + plain.stderr
    assert "elsewhere pid 1" in plain.stderr and "`sync --audience KEY`" in plain.stderr
    assert "let it finish" not in plain.stderr
    assert query(store_url, "SELECT count(*) FROM admin_requests")[0][0] == 0


def test_a_refresh_is_withdrawn_once_no_daemon_holds_the_store(
    make_config: ConfigFactory, store_url: str
) -> None:
    # SYNC: leases of 3 s, so the command gives a standby 3 s to take over before it gives up.
    config = make_config(sync=SYNC)
    fake_daemon_lease(store_url, seconds=3600)
    asking = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "audiencesync",
            "--config",
            str(config.path),
            "sync",
            "--audience",
            "segment_a",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"GLEAP_API_TOKEN": TOKEN},
    )
    try:
        wait_for(
            lambda: query(store_url, "SELECT count(*) FROM admin_requests")[0][0] == 1, what="the request"
        )
        # The daemon dies before it takes the request up: its lease runs out.
        engine = store_mod.create_engine(store_url)
        with engine.begin() as conn:
            conn.execute(sa.update(leases).values(expires_at=store_mod.utc_now() - timedelta(seconds=1)))
        engine.dispose()
        out, err = asking.communicate(timeout=120)  # well short of the default --wait of 600 s
    finally:
        if asking.poll() is None:
            asking.kill()
            asking.wait()
    assert asking.returncode == 1, out + err
    (withdrawn,) = [line for line in out.splitlines() if "withdrawn" in line]
    assert "elsewhere (pid 1) stopped holding the store" in withdrawn and "Fix:" in withdrawn
    assert [tuple(r) for r in query(store_url, "SELECT kind, state FROM admin_requests")] == [
        ("refresh", "failed")
    ]


def test_an_unknown_key_is_named_with_the_nearest_one(make_config: ConfigFactory) -> None:
    config = make_config()
    asked = cli(config, "sync", "--audience", "segmnt_a")
    assert asked.returncode == 2, asked.stdout + asked.stderr
    assert "'segmnt_a'" in asked.stderr and "did you mean 'segment_a'?" in asked.stderr


# --- a daemon becoming active re-runs what was left aborted or failed ------------------------------

THREE = (
    TWO_AUDIENCES
    + """
[[audiences]]
name = "Segment C"
source = "main"
query = "SELECT user_id FROM members WHERE segment = 'c'"
enabled = {c_enabled}
"""
)


def leave_runs(kind: str, config: Config, source: SourceDB, gleap: GleapStandIn) -> None:
    """A manual sync whose runs end ``kind`` for every audience."""
    if kind == "aborted":  # a token Gleap refuses: the delivery stops, every run of the cycle aborts
        source.set(["a1", "a2"])  # something to send
        gleap.set_token("rotated")
        try:
            cycle(config)
        finally:
            gleap.set_token(TOKEN)
    else:  # the source's table is gone for a moment: every refresh fails
        with sqlite3.connect(source.path) as conn:
            conn.execute("ALTER TABLE members RENAME TO gone")
        conn.close()
        try:
            cycle(config)
        finally:
            with sqlite3.connect(source.path) as conn:
                conn.execute("ALTER TABLE gone RENAME TO members")
            conn.close()


@pytest.mark.parametrize(("kind", "takeover"), [("aborted", False), ("failed", False), ("aborted", True)])
def test_the_daemon_reruns_at_once_what_was_left_aborted_or_failed(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    store_url: str,
    kind: str,
    takeover: bool,
) -> None:
    source.set(["a1"])
    source.set(["b1"], segment="b")
    source.set(["c1"], segment="c")
    config = make_config(gleap.base_url, sync=SYNC, extra=HOURLY, audiences=THREE.format(c_enabled="true"))
    assert cycle(config).complete
    leave_runs(kind, config, source, gleap)
    left = runs(store_url)
    assert {(key, status) for _, key, _, status in left[3:]} == {
        ("segment_a", kind),
        ("segment_b", kind),
        ("segment_c", kind),
    }
    # segment_b has nothing pending and was refreshed a moment ago: only its red run makes it due.
    # segment_c is paused meanwhile: it stays as it is.
    config = make_config(gleap.base_url, sync=SYNC, extra=HOURLY, audiences=THREE.format(c_enabled="false"))
    if takeover:  # the daemon starts in standby and becomes active once the old lease expires
        engine = store_mod.create_engine(store_url)
        with engine.begin() as conn:
            conn.execute(sa.delete(leases))
        engine.dispose()
        fake_daemon_lease(store_url, seconds=2)
    last = left[-1][0]

    def rerun(key: str) -> bool:
        return any(r[1] == key and r[0] > last and r[3] == "succeeded" for r in runs(store_url))

    with InProcess(config):
        wait_for(lambda: rerun("segment_b"), what="segment_b's refresh at start")
        wait_for(lambda: rerun("segment_a"), what="segment_a's refresh at start")
    assert not [r for r in runs(store_url) if r[1] == "segment_c" and r[0] > last]
