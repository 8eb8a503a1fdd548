"""Alerts (issue 13): each condition alerts once when it starts and once when it ends, in both formats,
from `sync` (one process per cycle) and `run`; a failing webhook never holds up a sync; the Gleap token
and header values never leave in an alert."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from audiencesync.alerts import alerts as alerts_mod
from audiencesync.alerts.alerts import Alerts
from audiencesync.alerts.sender import WebhookSender
from audiencesync.cli import main as cli
from audiencesync.config.alerts import AlertConfig
from audiencesync.config.loading import Config
from audiencesync.config.secret import Secret
from audiencesync.daemon import active_period
from audiencesync.errors import ConfigError
from audiencesync.store import store as store_mod
from audiencesync.store.diff import DiffCounts
from audiencesync.store.utc_time import UtcDateTime
from tests.alert_receiver import AlertReceiver, Post
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, free_port
from tests.test_daemon_hardening import InProcess
from tests.test_sync import TWO_AUDIENCES

HOOK_SECRET = "hook-secret-5e1"  # a header's value, which must stay out of the bodies


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    with AlertReceiver() as server:
        yield server


@pytest.fixture(autouse=True)
def _hook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALERT_TOKEN", HOOK_SECRET)


def hooks(receiver: AlertReceiver, extra: str = "") -> str:
    """Two webhooks on one receiver: JSON (with a header from the environment) on /json, Slack on /slack."""
    return f"""
[[alerts]]
url = "{receiver.url("/json")}"
headers = {{ Authorization = "Bearer ${{ALERT_TOKEN}}" }}
{extra}

[[alerts]]
url = "{receiver.url("/slack")}"
format = "slack"
{extra}
"""


def sync(config: Config, *args: str) -> int:
    """One `audiencesync sync`, in this process: alerts are flushed when it returns."""
    return cli.main(["--config", str(config.path), "sync", *args])


def states(posts: list[Post]) -> list[tuple[str, str | None, str]]:
    return [(p.body["event"], p.body["audience"], p.body["state"]) for p in posts]


def texts(posts: list[Post]) -> list[str]:
    return [p.body["text"] for p in posts]


def assert_no_secrets(receiver: AlertReceiver) -> None:
    """The Gleap token is in no alert; the header's value only in the header it was set for."""
    for post in receiver.posts():
        assert TOKEN.encode() not in post.raw
        assert HOOK_SECRET.encode() not in post.raw
        assert all(TOKEN not in value for value in post.headers.values())
        others = {k: v for k, v in post.headers.items() if k != "authorization"}
        assert all(HOOK_SECRET not in value for value in others.values())


# --- conditions from `sync`, one process per cycle -------------------------------------------------


def test_a_held_audience_alerts_once_when_held_and_once_when_it_recovers(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, receiver: AlertReceiver
) -> None:
    members = [f"u{i}" for i in range(10)]
    source.set(members)
    config = make_config(gleap.base_url, extra=hooks(receiver))
    assert sync(config) == 0
    assert receiver.posts() == []

    source.set([])  # a broken source: would remove everyone
    assert sync(config) == 1
    assert sync(config) == 1  # still held: no second alert
    (held,) = receiver.posts("/json")
    assert states([held]) == [("held", "segment_a", "firing")]
    assert held.body["fix"] == "audiencesync sync --audience segment_a --allow-removals"
    assert held.body["details"] == {"members": 0, "previous": 10, "left": 10, "entered": 0}
    assert "returned no rows" in held.body["summary"] and held.body["opened_at"] and held.body["time"]
    assert held.headers["authorization"] == f"Bearer {HOOK_SECRET}"
    (slack,) = texts(receiver.posts("/slack"))
    assert "segment_a" in slack and "held" in slack and "--allow-removals" in slack

    source.set(members)
    assert sync(config) == 0
    assert sync(config) == 0
    assert states(receiver.posts("/json")) == [
        ("held", "segment_a", "firing"), ("held", "segment_a", "resolved")
    ]  # fmt: skip
    resolved = texts(receiver.posts("/slack"))[1]
    assert "no longer held" in resolved and "since" in resolved
    assert_no_secrets(receiver)


def test_one_audiences_recovery_never_ends_anothers_condition(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, receiver: AlertReceiver
) -> None:
    source.set(["a1", "a2", "a3"], "a")
    source.set(["b1", "b2", "b3"], "b")
    config = make_config(gleap.base_url, audiences=TWO_AUDIENCES, extra=hooks(receiver))
    assert sync(config) == 0
    source.set([], "a")
    source.set([], "b")
    assert sync(config) == 1  # both held
    source.set(["a1", "a2", "a3"], "a")
    assert sync(config) == 1  # a recovers, b stays held
    with sqlite3.connect(source.path) as conn:
        conn.execute("ALTER TABLE members RENAME TO gone")
    conn.close()
    assert sync(config) == 1  # both sources fail; b's hold is neither ended nor told again
    with sqlite3.connect(source.path) as conn:
        conn.execute("ALTER TABLE gone RENAME TO members")
    conn.close()
    assert sync(config) == 1  # both read again; b still held
    assert states(receiver.posts("/json")) == [
        ("held", "segment_a", "firing"),
        ("held", "segment_b", "firing"),
        ("held", "segment_a", "resolved"),
        ("source_failed", "segment_a", "firing"),
        ("source_failed", "segment_b", "firing"),
        ("source_failed", "segment_a", "resolved"),
        ("source_failed", "segment_b", "resolved"),
    ]
    failed = receiver.posts("/json")[3].body
    assert failed["details"]["source"] == "main" and "no such table" in failed["details"]["error"]
    assert len(receiver.posts("/slack")) == 7
    assert_no_secrets(receiver)


def test_retiring_an_audience_ends_what_was_open_about_it_once(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, receiver: AlertReceiver
) -> None:
    source.set(["a1", "a2", "a3"], "a")
    source.set(["b1"], "b")
    config = make_config(gleap.base_url, audiences=TWO_AUDIENCES, extra=hooks(receiver))
    assert sync(config) == 0
    source.set([], "a")
    assert sync(config) == 1  # segment_a held
    # Removed from the config, it is refreshed no more: only its retirement can end the hold.
    only_b = make_config(gleap.base_url, audiences=TWO_AUDIENCES.split("\n\n")[1], extra=hooks(receiver))
    assert [a.key for a in only_b.audiences] == ["segment_b"]
    assert cli.main(["--config", str(only_b.path), "retire", "segment_a"]) == 0
    assert sync(only_b) == 0
    assert states(receiver.posts("/json")) == [
        ("held", "segment_a", "firing"), ("held", "segment_a", "resolved")
    ]  # fmt: skip
    assert "retired" in texts(receiver.posts("/slack"))[1]
    assert_no_secrets(receiver)


def test_parked_changes_alert_with_examples_and_end_once_retried_and_delivered(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, receiver: AlertReceiver
) -> None:
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url, extra="[sync]\nmax_attempts = 1\n" + hooks(receiver))
    gleap.fail_user("u2", 422, body='{"message": "userId rejected"}')
    assert sync(config) == 1
    assert sync(config) == 1  # still parked: nothing new
    (parked,) = receiver.posts("/json")
    assert states([parked]) == [("parked", "segment_a", "firing")]
    assert parked.body["fix"] == "audiencesync failures --audience segment_a"
    assert parked.body["details"]["parked"] == 1
    (example,) = parked.body["details"]["examples"]
    assert example["user_id"] == "u2" and example["status"] == 422 and "userId rejected" in example["error"]
    (slack,) = texts(receiver.posts("/slack"))
    assert "u2 (422" in slack and "audiencesync failures --audience segment_a" in slack

    gleap.clear_faults()
    assert cli.main(["--config", str(config.path), "retry", "--audience", "segment_a"]) == 0
    assert sync(config) == 0
    assert states(receiver.posts("/json"))[1:] == [("parked", "segment_a", "resolved")]
    assert len(receiver.posts("/slack")) == 2
    assert_no_secrets(receiver)


def test_gleap_down_alerts_once_and_recovers_when_calls_go_through(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, receiver: AlertReceiver
) -> None:
    source.set(["u1", "u2", "u3"])
    config = make_config(gleap.base_url, extra_gleap="breaker_failures = 2", extra=hooks(receiver))
    gleap.fail_next(1_000_000, 503)
    assert sync(config) == 5  # EXIT_GLEAP_DOWN
    assert sync(config) == 5
    (down,) = receiver.posts("/json")
    assert states([down]) == [("gleap_down", None, "firing")]
    assert down.body["subject"] == "gleap" and "503" in down.body["details"]["error"]
    gleap.clear_faults()
    assert sync(config) == 0
    assert states(receiver.posts("/json")) == [
        ("gleap_down", None, "firing"), ("gleap_down", None, "resolved")
    ]  # fmt: skip
    assert "Gleap answers again" in texts(receiver.posts("/slack"))[1]
    assert_no_secrets(receiver)


def test_a_refused_token_alerts_once_as_its_own_condition_and_recovers_with_the_right_token(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, receiver: AlertReceiver
) -> None:
    source.set(["u1", "u2", "u3"])
    # /json listens to every event; /old lists only gleap_down, as a config did before
    # token_refused had its own name: it still hears of a refused token.
    extra = (
        hooks(receiver)
        + f"""
[[alerts]]
url = "{receiver.url("/old")}"
events = ["gleap_down"]
"""
    )
    config = make_config(gleap.base_url, extra=extra)
    gleap.set_token("a-token-rotated-in-gleap")  # ours is refused: 401 on every call
    assert sync(config) != 0
    assert sync(config) != 0
    (refused,) = receiver.posts("/json")
    assert states([refused]) == [("token_refused", None, "firing")]
    assert "refuses the API token" in refused.body["summary"] and "GLEAP_API_TOKEN" in refused.body["fix"]
    assert states(receiver.posts("/old")) == [("token_refused", None, "firing")]
    gleap.set_token(TOKEN)
    assert sync(config) == 0
    assert states(receiver.posts("/json")) == [
        ("token_refused", None, "firing"), ("token_refused", None, "resolved")
    ]  # fmt: skip
    assert_no_secrets(receiver)


def test_a_failing_or_hanging_webhook_never_holds_up_sync(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    receiver: AlertReceiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A grace long enough for the working webhook's post on a loaded machine, and a first
    # retry later than any grace: when the sync exits, the failing webhook is surely still
    # waiting to retry, so exactly two alerts (stuck, broken) are dropped.
    monkeypatch.setattr(alerts_mod, "EXIT_GRACE_SECONDS", 3.0)
    monkeypatch.setattr(alerts_mod, "BACKOFF", (600.0, 600.0))
    with AlertReceiver() as stuck, AlertReceiver() as broken:
        stuck.hang()
        broken.status = 500
        extra = f"""
[[alerts]]
url = "{stuck.url()}"

[[alerts]]
url = "{broken.url()}"

[[alerts]]
url = "{receiver.url()}"
"""
        source.set(["u1", "u2"])
        config = make_config(gleap.base_url, extra=extra)
        assert sync(config) == 0
        source.set([])
        assert sync(config) == 1
        # The sync is over while the stuck webhook still holds its request: nobody waited for it.
        assert [p.status for p in stuck.posts()] == [0]
        assert broken.posts() and all(p.status == 500 for p in broken.posts())
        assert states(receiver.posts()) == [("held", "segment_a", "firing")]
        assert "2 alert(s) not sent within 3 s of exiting" in capsys.readouterr().err
        # The condition was recorded all the same: the next cycle does not alert again.
        assert sync(config) == 1
        assert len(receiver.posts()) == 1


# --- the sender -------------------------------------------------------------------------------


def webhook(url: str, **kwargs: object) -> AlertConfig:
    return AlertConfig(url=Secret(url), **kwargs)  # type: ignore[arg-type]


def test_a_webhook_that_fails_is_retried_with_backoff_then_dropped_without_showing_its_secret(
    receiver: AlertReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500, 503]
    sender = WebhookSender(webhook(receiver.url("/services/T0/SECRETPART")), backoff=(0.01, 0.02))
    sender.put(b'{"n": 1}')
    assert sender.close(time.monotonic() + 30) == 0
    assert [p.status for p in receiver.posts()] == [500, 503, 200]

    receiver.status = 502
    failing = WebhookSender(webhook(receiver.url("/services/T0/SECRETPART")), backoff=(0.01, 0.02))
    failing.put(b'{"n": 2}')
    assert failing.close(time.monotonic() + 30) == 0
    assert len(receiver.posts()) == 3 + 4  # ATTEMPTS, then dropped
    receiver.status = 400
    refused = WebhookSender(webhook(receiver.url("/services/T0/SECRETPART")), backoff=(0.01, 0.02))
    refused.put(b'{"n": 3}')
    assert refused.close(time.monotonic() + 30) == 0
    assert len(receiver.posts()) == 3 + 4 + 1  # a 4xx is not retried
    assert "alert to http://127.0.0.1" in caplog.text and "/services/***" in caplog.text
    assert "HTTP 502" in caplog.text and "HTTP 400" in caplog.text
    assert "SECRETPART" not in caplog.text


def test_the_gleap_token_is_scrubbed_from_whatever_an_alert_would_say(
    store: store_mod.Store, receiver: AlertReceiver
) -> None:
    alerts = Alerts([webhook(receiver.url())], store.engine, secrets=[TOKEN])
    alerts.gleap(f"an error that quotes the token {TOKEN}")
    alerts.close(30)
    (post,) = receiver.posts()
    assert TOKEN.encode() not in post.raw and "quotes the token ***" in post.body["summary"]


# --- reminders --------------------------------------------------------------------------------


def test_reminders_repeat_an_open_condition_every_remind_every_and_only_where_asked(
    store: store_mod.Store, receiver: AlertReceiver
) -> None:
    now = [datetime(2026, 12, 5, 12, 0, tzinfo=UTC)]
    hourly = webhook(receiver.url("/hourly"), remind_every_seconds=3600.0)
    quiet = webhook(receiver.url("/quiet"), format="slack")
    alerts = Alerts([hourly, quiet], store.engine, clock=lambda: now[0])
    held = DiffCounts(members=0, entered=0, left=5)
    steps = [0, 30, 61, 90, 119, 121, 300]  # minutes after the start, when the audience is seen held
    for minutes in steps:
        now[0] = datetime(2026, 12, 5, 12, 0, tzinfo=UTC) + timedelta(minutes=minutes)
        alerts.refreshed("segment_a", "audience", held, "would remove everyone")
    alerts.refreshed("segment_a", "audience", DiffCounts(members=5, entered=5, left=0), None)
    alerts.close(30)
    hourly_posts = receiver.posts("/hourly")
    assert [(p.body["state"], p.body["reminder"]) for p in hourly_posts] == [
        ("firing", False), ("firing", True), ("firing", True), ("firing", True), ("resolved", False)
    ]  # fmt: skip  # at 0, then 61 (hour 1), 121 (hour 2), 300 (hour 5: one reminder, not three)
    assert {p.body["opened_at"] for p in hourly_posts} == {"2026-12-05T12:00:00+00:00"}
    quiet_texts = texts(receiver.posts("/quiet"))
    assert len(quiet_texts) == 2 and ":rotating_light:" in quiet_texts[0]
    assert ":white_check_mark:" in quiet_texts[1]


def test_the_open_condition_survives_the_process(store: store_mod.Store, receiver: AlertReceiver) -> None:
    """`sync` from cron: each cycle is a new process; the store says what is already open."""
    first = Alerts([webhook(receiver.url())], store.engine)
    first.stalled("delivery stalled: 3 change(s) due")
    first.close(30)
    second = Alerts([webhook(receiver.url())], store.engine)
    second.stalled("delivery stalled: 4 change(s) due")
    second.stalled(None)
    second.stalled(None)
    second.close(30)
    assert [(p.body["event"], p.body["state"]) for p in receiver.posts()] == [
        ("stalled", "firing"), ("stalled", "resolved")
    ]  # fmt: skip


def test_a_store_failure_in_the_alerts_is_logged_not_raised(
    tmp_path: Path, receiver: AlertReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'no-tables.db'}")
    alerts = Alerts([webhook(receiver.url())], engine)
    alerts.gleap("down")  # no alert_conditions table
    alerts.close(1)
    assert "alerts: could not record or send gleap_down for gleap" in caplog.text
    engine.dispose()


# --- the daemon ---------------------------------------------------------------------------------


def test_the_daemon_alerts_on_gleap_down_and_a_stall_and_their_recovery(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    receiver: AlertReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(active_period, "STALL_POLL_SECONDS", 0.2)
    source.set(["u1", "u2", "u3"])
    extra = SCHEDULE + f'[server]\nlisten = "127.0.0.1:{free_port()}"\n' + hooks(receiver)
    config = make_config(gleap.base_url, extra_gleap="breaker_failures = 2", sync=SYNC, extra=extra)
    gleap.fail_next(1_000_000, 503)  # the breaker opens on the second failure
    with InProcess(config):
        receiver.wait_for(1, "/json")
        gleap.clear_faults()
        receiver.wait_for(2, "/json")
    assert states(receiver.posts("/json")) == [
        ("gleap_down", None, "firing"), ("gleap_down", None, "resolved")
    ]  # fmt: skip

    # A stall without the breaker: every call answers 503, but too few of them in a pass to open it
    # (20 by default), and nothing is acknowledged for longer than stall_after.
    before = len(receiver.posts("/json"))
    source.set(["u1", "u2", "u3", "u4", "u5"])
    server = f'[server]\nlisten = "127.0.0.1:{free_port()}"\nstall_after = "1s"\n'
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE + server + hooks(receiver))
    gleap.fail_next(1_000_000, 503)
    with InProcess(config):
        receiver.wait_for(before + 1, "/json")
        gleap.clear_faults()
        receiver.wait_for(before + 2, "/json")
    assert states(receiver.posts("/json"))[before:] == [
        ("stalled", None, "firing"), ("stalled", None, "resolved")
    ]  # fmt: skip
    assert "delivery stalled" in receiver.posts("/json")[before].body["summary"]
    assert len(receiver.posts("/slack")) == len(receiver.posts("/json"))
    assert_no_secrets(receiver)


def test_the_daemon_alerts_when_it_loses_the_lease_and_when_it_takes_over(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    receiver: AlertReceiver,
    store_url: str,
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, sync=SYNC, extra=SCHEDULE + hooks(receiver))
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:  # a crashed daemon's lease, expired
        conn.execute(
            sa.text(
                "INSERT INTO leases (name, holder, host, pid, acquired_at, renewed_at, expires_at, role) "
                "VALUES ('writer', 'gone', 'elsewhere', 1, :at, :at, :at, 'daemon')"
            ).bindparams(sa.bindparam("at", type_=UtcDateTime)),
            {"at": datetime.now(UTC) - timedelta(hours=1)},
        )
    with InProcess(config):
        (takeover,) = receiver.wait_for(1, "/json")
        assert (takeover.body["event"], takeover.body["state"]) == ("lease", "notice")
        assert "took over the store's writer lease from elsewhere pid 1" in takeover.body["summary"]
        steal = "UPDATE leases SET holder = 'thief', host = 'elsewhere', pid = 1, expires_at = :until"
        with engine.begin() as conn:  # another host takes the store over
            conn.execute(
                sa.text(steal).bindparams(sa.bindparam("until", type_=UtcDateTime)),
                {"until": datetime.now(UTC) + timedelta(hours=1)},
            )
        lost = receiver.wait_for(2, "/json")[1]
        assert (lost.body["event"], lost.body["state"]) == ("lease", "firing")
        assert "lost the store's writer lease" in lost.body["summary"]
        with engine.begin() as conn:  # ...and gives it back
            conn.execute(sa.text("DELETE FROM leases"))
        back = receiver.wait_for(3, "/json")[2]
        assert (back.body["event"], back.body["state"]) == ("lease", "resolved")
    engine.dispose()
    assert len(receiver.posts("/json")) == 3 and len(receiver.posts("/slack")) == 3
    assert_no_secrets(receiver)


# --- alert-test and the config ----------------------------------------------------------------------


def test_alert_test_posts_to_each_webhook_and_says_what_each_answered(
    make_config: ConfigFactory, receiver: AlertReceiver, capsys: pytest.CaptureFixture[str]
) -> None:
    with AlertReceiver() as broken:
        broken.status = 500
        extra = f"""
[[alerts]]
url = "{receiver.url("/services/T0/SECRETPART")}"
format = "slack"

[[alerts]]
url = "{broken.url("/hook")}?token=SECRETQUERY"
"""
        config = make_config(extra=extra, create_store=False)  # no store needed
        assert cli.main(["--config", str(config.path), "alert-test"]) == 1
        out, err = capsys.readouterr()
        (post,) = receiver.posts()
        assert "test message" in post.body["text"]
        assert broken.posts()[0].body["event"] == "test"
    lines = out.splitlines()
    assert lines[0].endswith("/services/*** (slack): HTTP 200 OK")
    assert lines[1].endswith("/hook?*** (json): HTTP 500 Internal Server Error")
    assert "SECRET" not in out + err and "did not take the test message" in err


BASE = """
[store]
url = "sqlite:///store.db"
"""


@pytest.mark.parametrize(
    ("table", "where", "fix"),
    [
        ('url = "ftp://example.com"', "[[alerts]] #1.url", "webhook's URL"),
        ('url = "https://x.test"\nformat = "teams"', "[[alerts]] #1.format", 'format = "slack"'),
        ('url = "https://x.test"\nevents = ["held", "gone"]', "[[alerts]] #1.events", "source_failed"),
        ('url = "https://x.test"\nevents = []', "[[alerts]] #1.events", "remove the key"),
        ('url = "https://x.test"\nremind_every = "often"', "[[alerts]] #1.remind_every", '"2h"'),
        ('url = "${NO_SUCH_HOOK}"', "[[alerts]] #1.url", "export NO_SUCH_HOOK"),
        ('url = "https://x.test"\nheaders = { "X-Key" = "${NO_SUCH_KEY}" }', "headers.X-Key", "export NO_"),
        ('url = "https://x.test"\nheaders = { "X-Key" = 5 }', "[[alerts]] #1.headers.X-Key", "Bearer"),
        ('url = "https://x.test"\nheaders = { "Bad Name" = "v" }', "[[alerts]] #1.headers", "dashes"),
        ('url = "https://x.test"\nremind = "1h"', "[[alerts]] #1.remind", "remind_every"),
        ('format = "json"', "[[alerts]] #1", "add url"),
    ],
)
def test_config_errors_name_the_file_the_key_and_the_fix(
    tmp_path: Path, table: str, where: str, fix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from audiencesync.config.loading import load_config

    monkeypatch.delenv("NO_SUCH_HOOK", raising=False)
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    path = tmp_path / "audiencesync.toml"
    path.write_text(BASE + "[[alerts]]\n" + table + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert str(path) in message and where in message and fix in message, message


def test_config_reads_webhooks_with_secrets_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from audiencesync.config.loading import load_config

    monkeypatch.setenv("SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T0/B0/XYZ")
    path = tmp_path / "audiencesync.toml"
    path.write_text(
        BASE
        + """
[[alerts]]
url = "${SLACK_WEBHOOK_URL}"
format = "slack"
events = ["held", "gleap_down", "held"]
remind_every = "4h"

[[alerts]]
url = "https://ops.example.com/hooks/audiencesync"
headers = { Authorization = "Bearer ${ALERT_TOKEN}" }
"""
    )
    slack, ops = load_config(path).alerts
    assert slack.url.reveal() == "https://hooks.slack.com/services/T0/B0/XYZ"
    assert slack.shown_url == "https://hooks.slack.com/services/***"
    assert (slack.format, slack.events) == ("slack", ("held", "gleap_down"))
    assert slack.remind_every_seconds == 14400
    assert ops.format == "json" and "lease" in ops.events and ops.remind_every_seconds is None
    assert dict(ops.headers)["Authorization"].reveal() == f"Bearer {HOOK_SECRET}"
    assert HOOK_SECRET not in repr(ops) and "XYZ" not in repr(slack)


def test_no_alerts_configured_still_records_the_condition_and_starts_no_thread(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    """Without a webhook nothing is sent, but the condition is kept: status, /healthz, the web
    page and /metrics show it (attention.py)."""
    source.set(["u1"])
    config = make_config(gleap.base_url)
    before = threading.active_count()
    assert sync(config) == 0
    source.set([])
    assert sync(config) == 1  # held
    assert threading.active_count() <= before
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT kind, subject FROM alert_conditions")).all()
    assert [tuple(r) for r in rows] == [("held", "segment_a")]
    engine.dispose()


def test_a_reload_replaces_the_webhooks_and_what_the_old_ones_had_queued_still_goes_out(
    store: store_mod.Store, receiver: AlertReceiver
) -> None:
    alerts = Alerts([webhook(receiver.url("/old"))], store.engine)
    alerts.gleap("down")
    alerts.configure([webhook(receiver.url("/new"), format="slack")], ["a-rotated-token"])
    alerts.gleap(None)
    alerts.stalled("stalled by a-rotated-token")
    alerts.close(30)
    (old,) = receiver.wait_for(1, "/old")
    assert (old.body["event"], old.body["state"]) == ("gleap_down", "firing")
    resolved, stalled = texts(receiver.posts("/new"))
    assert "Gleap answers again" in resolved
    assert "a-rotated-token" not in stalled and "stalled by ***" in stalled
