"""Crash safety, faults, the removal guard, parked failures, the writer lease, secrets.

The crash tests kill real `audiencesync sync` processes with SIGKILL and then
check that the next run brings Gleap (the loopback stand-in) to exactly the
source's membership, re-sending at most the calls that were in flight.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from audiencesync.config.loading import Config
from audiencesync.delivery.record_batches import RECORD_WINDOW
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.store.schema import leases
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn

KEY = "segment_a"


def start(config: Config, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("GLEAP_API_TOKEN", "AUDIENCESYNC_FAILPOINT")
    }
    environment |= env or {}
    return subprocess.Popen(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def sync(config: Config, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    process = start(config, "sync", *args, env=env)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_converged(gleap: GleapStandIn, members: Sequence[str], key: str = KEY) -> None:
    """Gleap says true for exactly the source's members, and false (or nothing) for everyone else."""
    told_true = {user for user, attributes in gleap.contacts.items() if attributes.get(key) is True}
    assert told_true == set(members)


def resent(gleap: GleapStandIn) -> int:
    """How many identify calls repeated an earlier call's exact body."""
    counts = Counter(tuple(sorted(body.items())) for body in gleap.identify_calls)
    return sum(n - 1 for n in counts.values())


def resend_bound(config: Config, seen: int) -> int:
    """What the run after a kill may send again, given the ``seen`` identify calls Gleap counted
    before it: the calls whose answers the store had not recorded (logged in ``calls``), and
    the calls in flight, which Gleap may not have counted. The bound of docs/guarantees.md is checked too:
    at most ``max_concurrency`` in flight plus ``RECORD_WINDOW`` answers waiting for their batch."""
    engine = sa.create_engine(config.store.url)
    with engine.connect() as conn:
        recorded = int(conn.execute(sa.text("SELECT count(*) FROM calls")).scalar_one())
    engine.dispose()
    assert 0 <= seen - recorded <= RECORD_WINDOW + config.gleap.max_concurrency
    return seen - recorded + config.gleap.max_concurrency


# --- crashes -------------------------------------------------------------------


@pytest.mark.parametrize("point", ["stage-batch", "after-stage", "before-commit", "after-record:3"])
def test_sigkill_at_each_point_then_rerun_converges(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, point: str
) -> None:
    first = [f"u{i:04d}" for i in range(600)]
    source.set(first)
    config = make_config(gleap.base_url, token=None)
    token = {"GLEAP_API_TOKEN": TOKEN}
    assert sync(config, env=token).returncode == 0

    # Churn, then die somewhere in the middle of the next cycle.
    second = first[100:] + [f"n{i:04d}" for i in range(150)]
    source.set(second)
    killed = sync(config, env=token | {"AUDIENCESYNC_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    bound = resend_bound(config, len(gleap.identify_calls))

    rerun = sync(config, env=token)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_converged(gleap, second)
    # Only calls whose answers were not recorded at the kill go out twice.
    assert resent(gleap) <= bound


def test_sigkill_mid_delivery_from_outside_then_rerun_converges(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    members = [f"u{i:04d}" for i in range(300)]
    source.set(members)
    config = make_config(gleap.base_url, token=None)
    # Gleap answers 60 calls, then holds the rest unanswered: the kill lands
    # mid-delivery however fast or slow each side runs.
    gleap.hold(after=60)
    process = start(config, "sync", env={"GLEAP_API_TOKEN": TOKEN})
    assert gleap.wait_held(1, timeout=60), "delivery never got past 60 calls"
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    delivered_before = len(gleap.identify_calls)
    assert delivered_before == 60
    bound = resend_bound(config, delivered_before)
    gleap.release()  # the calls in flight at the kill reach Gleap after all

    gleap.clear_faults()
    rerun = sync(config, env={"GLEAP_API_TOKEN": TOKEN})
    assert rerun.returncode == 0, rerun.stderr
    assert "interrupted" not in rerun.stdout  # the summary is about this run
    assert_converged(gleap, members)
    assert resent(gleap) <= bound
    engine = sa.create_engine(config.store.url)
    with engine.connect() as conn:
        statuses = [r[0] for r in conn.execute(sa.text("SELECT status FROM sync_runs ORDER BY id"))]
    engine.dispose()
    assert statuses == ["interrupted", "succeeded"]


# --- transient faults ------------------------------------------------------------


def test_random_faults_converge(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
    rng = random.Random(7)
    config = make_config(gleap.base_url, timeout_seconds=2)  # the delays below outlast it
    from tests.test_sync import cycle

    members: list[str] = []
    for round_ in range(3):
        members = sorted(set(members[: len(members) * 2 // 3]) | {f"r{round_}-{i}" for i in range(120)})
        source.set(members)
        for _ in range(rng.randint(2, 6)):
            gleap.fail_next(1, rng.choice([429, 500, 502, 503, 504]), retry_after=rng.choice([None, "0"]))
        gleap.drop_next(rng.randint(1, 4))
        gleap.delay_next(rng.randint(1, 3), 2.5)  # past timeout_seconds = 2
        for _attempt in range(4):
            report = cycle(config)
            if report.complete:
                break
        assert report.complete
        assert_converged(gleap, members)


def test_429s_do_not_use_up_the_retry_budget(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    from tests.test_sync import cycle, only

    source.set(["u1", "u2"])
    gleap.fail_next(8, 429, retry_after="0")  # max_retries = 3, yet 8 429s are fine
    report = cycle(make_config(gleap.base_url))
    assert report.complete
    a = only(report)
    assert a.rate_limited == 8 and a.retries == 8 and a.pending == 0


# --- the mass-removal guard --------------------------------------------------------


def test_mass_removal_is_held_whole_then_released_once(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    members = [f"u{i}" for i in range(10)]
    source.set(members)
    config = make_config(gleap.base_url, token=None)
    token = {"GLEAP_API_TOKEN": TOKEN}
    assert sync(config, env=token).returncode == 0

    half_loaded = [*members[:3], "new1"]  # 7 of 10 would leave; one would enter
    source.set(half_loaded)
    gleap.reset_log()
    held = sync(config, env=token)
    assert held.returncode == 1
    assert "held" in held.stdout and "would remove 7 of 10" in held.stdout
    assert f"audiencesync sync --audience {KEY} --allow-removals" in held.stdout
    assert gleap.identify_calls == []  # the entry is held too: never half-applied
    assert sync(config, env=token).returncode == 1  # still held on the next cycle

    needs_audience = sync(config, "--allow-removals", env=token)
    assert needs_audience.returncode == 2 and "--audience" in needs_audience.stderr
    released = sync(config, "--audience", KEY, "--allow-removals", env=token)
    assert released.returncode == 0, released.stdout
    assert_converged(gleap, half_loaded)
    assert len(gleap.identify_calls) == 8


def test_empty_source_is_held_unless_allowed(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    from tests.test_sync import cycle, only

    source.set(["u1"])
    config = make_config(gleap.base_url)
    cycle(config)
    source.set([])
    report = cycle(config)
    assert only(report).status == "held" and "no rows" in (only(report).error or "")
    assert_converged(gleap, ["u1"])

    audiences = """
        [[audiences]]
        name = "Segment A"
        source = "main"
        query = "SELECT user_id FROM members WHERE segment = 'a'"
        allow_empty = true
    """
    report = cycle(make_config(gleap.base_url, audiences=audiences))
    assert report.complete
    assert_converged(gleap, [])


# --- parked failures ---------------------------------------------------------------


def test_rejections_park_after_max_attempts_until_requeued(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1", "bad"])
    config = make_config(gleap.base_url, token=None, sync='max_attempts = 2\nretry_backoff = "0s"')
    token = {"GLEAP_API_TOKEN": TOKEN}
    gleap.fail_user("bad", 422, body='{"message": "userId rejected"}')
    assert sync(config, env=token).returncode == 1  # attempt 1
    assert sync(config, env=token).returncode == 1  # attempt 2: parked
    before = len(gleap.requests)
    third = sync(config, env=token)
    assert len(gleap.requests) == before  # parked: not tried again
    assert "partial" in third.stdout

    listed = subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), "failures", "--format", "jsonl"],
        capture_output=True,
        text=True,
        check=True,
    )
    (failure,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (failure["audience"], failure["user_id"], failure["value"], failure["attempts"]) == (
        "segment_a", "bad", True, 2
    )  # fmt: skip
    assert "userId rejected" in failure["last_error"]

    refused = subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), "retry"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2 and "--all" in refused.stderr
    gleap.clear_faults()
    requeued = subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), "retry", "--user", "bad"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "re-queued 1" in requeued.stdout
    assert sync(config, env=token).returncode == 0
    assert_converged(gleap, ["u1", "bad"])


# --- the writer lease -----------------------------------------------------------------


def test_second_sync_waits_or_names_the_holder(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set([f"u{i}" for i in range(40)])
    # The first sync's calls are held unanswered until the checks below are done, so
    # it holds the lease throughout however slowly the other processes start.
    # The timeout leaves room for that: a held call must not time out meanwhile.
    config = make_config(gleap.base_url, token=None, timeout_seconds=120)
    token = {"GLEAP_API_TOKEN": TOKEN}
    gleap.hold()
    first = start(config, "sync", env=token)
    try:
        assert gleap.wait_held(1, timeout=60), "the first sync never started delivering"

        busy = sync(config, env=token)
        assert busy.returncode == 4, busy.stderr
        assert "in use by another audiencesync" in busy.stderr and f"pid {first.pid}" in busy.stderr

        # Readers are never blocked by the running sync.
        reader = subprocess.run(
            [sys.executable, "-m", "audiencesync", "--config", str(config.path), "failures"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert reader.returncode == 0, reader.stderr

        waiting = start(config, "sync", "--wait", "120", env=token)
        assert first.poll() is None and waiting.poll() is None  # neither gave up while the store was held
    finally:
        gleap.release()
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    _, stderr = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, stderr
    assert len(gleap.identify_calls) == 40  # the second run found nothing left to send


def test_expired_lease_of_a_dead_holder_is_taken_over(make_config: ConfigFactory, store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    now = store_mod.utc_now()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(leases).values(
                name="writer",
                holder="ghost",
                host="gone",
                pid=1,
                acquired_at=now - timedelta(hours=1),
                renewed_at=now - timedelta(minutes=5),
                expires_at=now - timedelta(minutes=4),
            )
        )
    lease = WriterLease(engine, store_mod.utc_now, ttl_seconds=30)
    assert lease.try_acquire() is None
    other = WriterLease(engine, store_mod.utc_now, ttl_seconds=30)
    holder = other.try_acquire()
    assert holder is not None and holder.pid == os.getpid()
    engine.dispose()


def test_a_process_that_lost_its_lease_stops_writing(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    clock = [store_mod.utc_now()]
    mine = WriterLease(engine, lambda: clock[0], ttl_seconds=10)
    mine.acquire()
    fenced = store_mod.Store(engine, fence=mine.check)
    fenced.ensure_audience("a", "A")
    clock[0] += timedelta(seconds=11)  # we stalled past our expiry...
    thief = WriterLease(engine, lambda: clock[0], ttl_seconds=10)
    thief.acquire()  # ...and another process took over
    from audiencesync.errors import LeaseLostError

    with pytest.raises(LeaseLostError):
        fenced.ensure_audience("b", "B")
    engine.dispose()


# --- sources --------------------------------------------------------------------------


def test_source_query_past_its_timeout_is_cancelled(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, tmp_path: Path
) -> None:
    from tests.test_sync import cycle, only

    endless = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
        "SELECT i AS user_id FROM n WHERE i < 0"
    )
    audiences = f"""
        [[audiences]]
        name = "Segment A"
        source = "main"
        query = "{endless}"
    """
    config = make_config(gleap.base_url, audiences=audiences)
    text = config.path.read_text().replace("[sources.main]\n", "[sources.main]\ntimeout_seconds = 0.5\n")
    config.path.write_text(text)
    from audiencesync.config.loading import load_config

    started = time.monotonic()
    report = cycle(load_config(config.path))
    assert time.monotonic() - started < 20
    error = only(report).error or ""
    assert "timeout_seconds = 0.5" in error and "segment_a" in error and "'main'" in error


# --- secrets ----------------------------------------------------------------------------


def test_the_token_never_leaks(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    secret = "tok-SECRET-5d1e8a"
    gleap.set_token(secret)
    source.set(["u1", "u2", "bad"])
    config = make_config(gleap.base_url, token=None)
    env = {"GLEAP_API_TOKEN": secret}
    outputs = []
    gleap.fail_next(2, 503)
    gleap.fail_user("bad", 400, body="nope")
    debug = start(config, "--log-level", "DEBUG", "sync", env=env)  # retries and a rejection, all logged
    stdout, stderr = debug.communicate(timeout=120)
    outputs.append(subprocess.CompletedProcess(debug.args, debug.returncode, stdout, stderr))
    assert "HTTP Request" in stderr  # the debug log really was on
    outputs.append(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "audiencesync",
                "--config",
                str(config.path),
                "--log-level",
                "DEBUG",
                "sync",
                "--dry-run",
            ],
            capture_output=True,
            text=True,
            env=os.environ | env,
            check=False,
        )
    )
    gleap.set_token("rotated")
    outputs.append(sync(config, "--full", env=env))  # 401
    # An unexpected error with a traceback, mid-delivery.
    gleap.set_token(secret)
    source.set(["u1", "u2", "bad", "u3", "u4"])
    crashed = sync(config, env=env | {"AUDIENCESYNC_FAILPOINT": "after-record:1:raise"})
    assert "Traceback" in crashed.stderr and "failpoint after-record" in crashed.stderr
    outputs.append(crashed)
    for output in outputs:
        assert secret not in output.stdout + output.stderr
    assert any("401" in o.stderr for o in outputs)

    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        for table in sa.inspect(engine).get_table_names():
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):
                assert secret not in repr(tuple(row)), table
    engine.dispose()
    if store_url.startswith("sqlite:///"):
        path = Path(store_url.removeprefix("sqlite:///"))
        for file in path.parent.glob(path.name + "*"):
            assert secret.encode() not in file.read_bytes()
