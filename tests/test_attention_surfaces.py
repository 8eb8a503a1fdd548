"""One truth about what needs a person (issue 20): with the daemon running, each condition shows
the same state and the same fix on /healthz, `status` (table and JSON) and /metrics, and in the
alerts; and it clears everywhere once it ends. The web page's banners: test_web_browser.py.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from audiencesync.alerts import attention
from audiencesync.config.loading import Config
from audiencesync.store.schema import memberships
from tests.alert_receiver import AlertReceiver
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, Daemon, cli, daemons, free_port, members_true, wait_for
from tests.test_daemon_hardening import healthz as probe  # (status, body); 0 while not serving

__all__ = ["daemons"]  # the fixture, used by name

SYNC = 'lease_seconds = 3\nretry_backoff = "0s"'


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    with AlertReceiver() as hooks:
        yield hooks


@dataclass(frozen=True)
class Seen:
    """What each surface says is open: (state, subject, fix)."""

    healthz_status: int
    healthz_first: str
    healthz: set[tuple[str, str]]  # (label, fix) of each line after the first
    status_json: set[tuple[str, str | None, str]]
    status_daemon: str
    status_table: set[tuple[str, str]]  # (label, fix) of each "needs attention" line
    conditions_column: dict[str, str]  # audience -> the table's condition column
    metrics: set[tuple[str, str]]  # (condition, audience) of each gauge at 1
    metrics_healthy: bool


def label_and_fix(line: str) -> tuple[str, str]:
    label, _, rest = line.strip().partition(": ")
    return label, rest.rpartition(". Fix: ")[2]


def look(config: Config, port: int) -> Seen:
    code, body = probe(port)
    first, *lines = body.splitlines()
    as_json = cli(config, "status", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    table = cli(config, "status").stdout.splitlines()
    header = table[0].split()
    column = {
        line.split()[0]: line.split()[1]
        for line in table[1:]
        if line
        and not line.startswith((" ", "daemon", "active", "health", "last prune", "needs"))
        and len(line.split()) > len(header) // 2
    }
    needs = table[table.index("needs attention:") + 1 :] if "needs attention:" in table else []
    gauges, healthy = scrape(port)
    return Seen(
        code, first, {label_and_fix(line) for line in lines},
        {(c["state"], c["subject"], c["action"]) for c in data["concerns"]}, data["daemon"]["state"],
        {label_and_fix(line) for line in needs}, column,
        gauges, healthy,
    )  # fmt: skip


def scrape(port: int) -> tuple[set[tuple[str, str]], bool]:
    """/metrics: the conditions' gauges set to 1, (state, audience), and whether it says healthy."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        scraped = response.read().decode()
    gauges = re.findall(r'audiencesync_condition\{audience="([^"]*)",condition="([^"]+)"\} 1\.0', scraped)
    return {(state, audience) for audience, state in gauges}, "audiencesync_healthy 1.0" in scraped


def agree(seen: Seen) -> set[tuple[str, str | None]]:
    """The surfaces name the same conditions with the same fixes; returns them, (state, subject)."""
    by_json = {(attention.label(state), fix) for state, _, fix in seen.status_json}
    assert seen.status_table == by_json, seen
    assert seen.metrics == {(state, subject or "") for state, subject, _ in seen.status_json}, seen
    # /healthz is the daemon's own reading: the same conditions, each with the same fix.
    assert seen.healthz == by_json, seen
    return {(state, subject) for state, subject, _ in seen.status_json}


def start(
    make_config: ConfigFactory,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    extra: str = "",
    extra_gleap: str = "",
) -> tuple[Config, int]:
    port = free_port()
    config = make_config(
        gleap.base_url, token=None, sync=SYNC, extra_gleap=extra_gleap,
        extra=SCHEDULE + f'[server]\nlisten = "127.0.0.1:{port}"\n' + extra,
    )  # fmt: skip
    daemons(config)
    wait_for(lambda: probe(port)[0] != 0, what="the daemon's /healthz")
    return config, port


def settled(config: Config, port: int, want: set[tuple[str, str | None]]) -> Seen:
    """Poll until every surface shows ``want`` (a daemon's state moves with its cycles)."""
    # The daemon's /metrics first, an HTTP read: the CLI's two `status` runs (a second of CPU
    # each, on a loaded CI machine) are then polled only once the daemon has got there.
    gauges = {(state, subject or "") for state, subject in want}
    wait_for(lambda: scrape(port)[0] == gauges, timeout=60, what=f"/metrics to show {want}")
    found: list[Seen] = []

    def check() -> bool:
        seen = look(config, port)
        found[:] = [seen]
        try:
            return agree(seen) == want
        except AssertionError:
            return False

    try:
        wait_for(check, timeout=60, what=f"every surface to show {want}")
    except AssertionError:
        raise AssertionError(f"the surfaces did not settle on {want}: {found}") from None
    return found[0]


def quiet(config: Config, port: int) -> bool:
    """Nothing open anywhere, and the audience ok: its changes delivered, not only unblocked."""
    gauges, healthy = scrape(port)
    if gauges or not healthy:
        return False  # the daemon's own surface is not quiet yet: no need to run the CLI
    seen = look(config, port)
    try:
        return agree(seen) == set() and seen.conditions_column == {"segment_a": "ok"}
    except AssertionError:
        return False  # the surfaces read at slightly different instants: look again


def test_a_refused_token_shows_everywhere_then_clears(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    receiver: AlertReceiver,
) -> None:
    source.set(["u1", "u2"])
    gleap.set_token("a-token-rotated-in-gleap")  # ours is refused: 401 on every call
    config, port = start(make_config, gleap, daemons, f'[[alerts]]\nurl = "{receiver.url()}"\n')
    seen = settled(config, port, {("token_refused", None)})
    assert seen.healthz_status == 503 and "refuses the API token" in seen.healthz_first
    assert seen.status_daemon == "token_refused" and not seen.metrics_healthy
    assert seen.conditions_column == {"segment_a": "token"}  # "token refused", split by the table's spaces
    (fired,) = receiver.wait_for(1)
    assert (fired.body["event"], fired.body["state"]) == ("token_refused", "firing")

    # The runs the daemon closes meanwhile end "aborted", with the reason, as a plain sync's do.
    def runs() -> list[dict[str, object]]:
        listed = cli(config, "audit", "runs", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        return list(json.loads(listed.stdout))

    wait_for(lambda: any(r["status"] == "aborted" for r in runs()), what="a run closed while refused")
    assert {r["status"] for r in runs()} <= {"aborted", "running"}
    assert all("the API token is wrong" in str(r["error"]) for r in runs() if r["status"] == "aborted")

    gleap.set_token(TOKEN)
    wait_for(lambda: members_true(gleap) == {"u1", "u2"}, what="the changes the token held back")
    wait_for(lambda: quiet(config, port), what="every surface to say ok")
    seen = look(config, port)
    assert (seen.healthz_status, seen.healthz_first) == (200, "ok") and seen.metrics_healthy
    assert seen.status_daemon == "ok" and seen.conditions_column == {"segment_a": "ok"}
    resolved = receiver.wait_for(2)[1]
    assert (resolved.body["event"], resolved.body["state"]) == ("token_refused", "resolved")


def test_runs_closed_while_the_token_is_refused_end_aborted_even_when_nothing_is_due(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    """A pass that makes no call (everything owed waits out a backoff) is no sign that Gleap
    takes the token again: the runs closed after it still end "aborted" with the reason, not
    "partial" as if Gleap had been answering (failed once in CI, when the refused calls' retries
    were not yet due)."""
    source.set(["u1", "u2"])
    gleap.set_token("a-token-rotated-in-gleap")
    config, _ = start(make_config, gleap, daemons)

    def runs() -> list[dict[str, object]]:
        listed = cli(config, "audit", "runs", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        return list(json.loads(listed.stdout))

    wait_for(lambda: any(r["status"] == "aborted" for r in runs()), what="a run closed while refused")
    # What the refused calls owe waits an hour: the passes that follow have nothing due.
    engine = sa.create_engine(config.store.url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.update(memberships)
                .where(memberships.c.pending == sa.true())
                .values(next_attempt_at=datetime.now(UTC) + timedelta(hours=1))
            )
    finally:
        engine.dispose()

    def closed() -> dict[object, object]:
        return {r["run_id"]: r["status"] for r in runs() if r["status"] != "running"}

    # Runs closed before Gleap's first 401 reached the daemon ended "partial": owed, with no
    # verdict yet (under load, the second refresh can close a run before the first pass's
    # call is answered). The runs meant here close after it.
    before = closed()
    # The daemon refreshes every 2 s: several runs close with nothing due.
    wait_for(lambda: len(closed()) >= len(before) + 3, what="more runs closed")
    assert {status for run_id, status in closed().items() if run_id not in before} == {"aborted"}
    assert members_true(gleap) == set()


def test_a_held_audience_is_listed_everywhere_and_the_daemon_stays_healthy(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    source.set(["u1", "u2", "u3"])
    config, port = start(make_config, gleap, daemons)
    wait_for(lambda: gleap.contacts.get("u3", {}).get("segment_a") is True, what="the first sync")
    source.set([])  # would remove everyone: the guard holds it
    seen = settled(config, port, {("held", "segment_a")})
    assert seen.healthz_status == 200 and seen.healthz_first == "ok" and seen.metrics_healthy
    assert seen.conditions_column == {"segment_a": "held"}
    (fix,) = {fix for _, _, fix in seen.status_json}
    assert "audiencesync sync --audience segment_a --allow-removals" in fix

    source.set(["u1", "u2", "u3"])  # the source is back: the hold ends with the next refresh
    wait_for(lambda: quiet(config, port), what="every surface to say ok")


def test_parked_changes_show_everywhere_and_clear_after_retry(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    source.set(["good", "bad"])
    gleap.fail_user("bad", 422, body="nope")
    config, port = start(make_config, gleap, daemons, "[sync]\nmax_attempts = 1\n")
    seen = settled(config, port, {("parked", "segment_a")})
    assert seen.healthz_status == 200 and seen.conditions_column == {"segment_a": "parked"}

    gleap.clear_faults()
    assert cli(config, "retry", "--all").returncode == 0
    # Retried, it is pending (no condition) at once, and delivered with the daemon's next pass.
    wait_for(lambda: gleap.contacts.get("bad", {}).get("segment_a") is True, what="the retried change")
    settled(config, port, set())


def test_gleap_down_opens_the_breaker_everywhere_then_clears(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    source.set(["u1", "u2"])
    gleap.fail_next(1_000_000, 503)
    # Two failures in a row, across both users, open the breaker (20 by default).
    config, port = start(make_config, gleap, daemons, extra_gleap="breaker_failures = 2")
    seen = settled(config, port, {("gleap_down", None)})
    assert seen.healthz_status == 503 and seen.status_daemon == "gleap_down" and not seen.metrics_healthy

    gleap.clear_faults()
    settled(config, port, set())
    wait_for(lambda: members_true(gleap) == {"u1", "u2"}, what="the changes held back by the outage")


def test_with_no_daemon_past_runs_are_overdue(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    source.set(["u1"])
    port = free_port()
    config = make_config(
        gleap.base_url, token=None, sync=SYNC,
        extra=SCHEDULE + f'[server]\nlisten = "127.0.0.1:{port}"\n',
    )  # fmt: skip
    daemon = daemons(config)
    wait_for(lambda: gleap.contacts.get("u1", {}).get("segment_a") is True, what="the first sync")
    assert daemon.stop() == 0
    # The next run it planned (2-3 s ahead) passes with nobody to run it: polled, not slept.
    wait_for(
        lambda: json.loads(cli(config, "status", "--format", "json").stdout)["daemon"]["state"] == "overdue",
        what="status to say the runs are overdue",
    )
    data = json.loads(cli(config, "status", "--format", "json").stdout)
    assert {(c["state"], c["subject"]) for c in data["concerns"]} == {
        ("overdue", None),
        ("overdue", "segment_a"),
    }
    assert "audiencesync run" in data["daemon"]["action"]
    assert data["audiences"][0]["condition"]["state"] == "overdue"
