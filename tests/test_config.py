"""Config loading: every mistake is refused with the file, the place and the fix."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from audiencesync.cli.main import main
from audiencesync.config.loading import display_url, find_config, load_config, parse_duration
from audiencesync.errors import ConfigError

BASE = """
[store]
url = "sqlite:///store.db"

[sources.warehouse]
url = "sqlite:///source.db"
"""

AUDIENCE = """
[[audiences]]
name = "High Value Users"
source = "warehouse"
query = "SELECT user_id FROM t"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "audiencesync.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLEAP_API_TOKEN", raising=False)
    config = load_config(Path(__file__).parent.parent / "config.example.toml")
    assert [a.key for a in config.audiences] == ["order_completed_last_30_days", "high_value_users"]
    assert config.gleap.requests_per_minute == 1000 and config.gleap.api_token is None


def test_defaults_keys_and_relative_sqlite_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLEAP_API_TOKEN", "from-env")
    config = load_config(write(tmp_path, BASE + AUDIENCE + '[gleap]\napi_token = "from-file"\n'))
    assert config.audiences[0].key == "high_value_users"
    assert config.store.url == f"sqlite:///{tmp_path / 'store.db'}"
    assert config.sources["warehouse"].url == f"sqlite:///{tmp_path / 'source.db'}"
    assert config.gleap.api_token is not None and config.gleap.api_token.reveal() == "from-env"
    assert "from-env" not in repr(config)
    assert config.gleap.base_url == "https://api.gleap.io" and config.gleap.max_concurrency == 8


def test_config_path_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_config("x.toml", {"AUDIENCESYNC_CONFIG": "y.toml"}) == Path("x.toml")
    assert find_config(None, {"AUDIENCESYNC_CONFIG": "y.toml"}) == Path("y.toml")
    assert find_config(None, {}) == Path("audiencesync.toml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            AUDIENCE.replace('"warehouse"', '"warehous"'),
            ["unknown source 'warehous'", "High Value Users", "warehouse"],
        ),
        (
            AUDIENCE.replace('query = "SELECT user_id FROM t"', ""),
            ["'query' is required", "High Value Users"],
        ),
        (AUDIENCE.replace('name = "High Value Users"', ""), ["'name' is required", "#1"]),
        (AUDIENCE.replace("query =", "querry ="), ["unknown key 'querry'", "did you mean 'query'"]),
        (AUDIENCE + AUDIENCE, ["'high_value_users' is already used", "#2"]),
        (AUDIENCE.replace("High Value Users", "!!!"), ["the key is empty", "explicit key"]),
        (AUDIENCE + 'key = "High__Value"\n', ["single underscores"]),
        (AUDIENCE.replace("High Value Users", "Email"), ["contact field 'email'"]),
        (AUDIENCE + 'key = "plan"\n', ["contact field 'plan'"]),
        (AUDIENCE.replace('query = "SELECT user_id FROM t"', 'query = "  "'), ["the query is empty"]),
        (AUDIENCE + "[gleap]\nmax_concurrency = 0\n", ["[gleap].max_concurrency", "greater than zero"]),
        (
            AUDIENCE + '[gleap]\nrequests_per_minute = "fast"\n',
            ["must be an integer, not a string", "(without quotes)"],
        ),
        (AUDIENCE + '[gleap]\nbase_url = "api.gleap.io"\n', ["http(s) URL"]),
        (AUDIENCE + "[extra]\nx = 1\n", ["unknown key 'extra'"]),
        (AUDIENCE + "[sources.other]\n", ["'url' is required", "[sources.other]"]),
    ],
)
def test_bad_config_is_refused_with_a_useful_message(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, BASE + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message


@pytest.mark.parametrize(
    ("gleap", "ok"),
    [
        ('base_url = "http://127.0.0.1:8080"', True),
        ('base_url = "http://127.3.4.5:8080"', True),
        ('base_url = "http://[::1]:8080"', True),
        ('base_url = "http://localhost:8080"', True),
        ('base_url = "http://LocalHost:8080"', True),
        ('base_url = "http://127.example.com"', False),
        ('base_url = "http://127.0.0.1.nip.io"', False),
        ('base_url = "http://localhost.example.com"', False),
        ('base_url = "http://128.0.0.1"', False),
        ('base_url = "http://0.0.0.0:8080"', False),
        ('base_url = "http://[::ffff:127.0.0.1]:8080"', False),
        ('base_url = "http://[::2]:8080"', False),
        ('base_url = "http://gleap.internal"', False),
        ('base_url = "http://gleap.internal"\nallow_http = true', True),
        ('base_url = "https://gleap.internal"', True),
    ],
)
def test_plain_http_only_to_loopback_unless_allowed(tmp_path: Path, gleap: str, ok: bool) -> None:
    path = write(tmp_path, BASE + AUDIENCE + f"[gleap]\n{gleap}\n")
    if ok:
        load_config(path)
    else:
        with pytest.raises(ConfigError, match=r"unencrypted.*allow_http"):
            load_config(path)


def test_readable_config_holding_the_token_draws_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLEAP_API_TOKEN", raising=False)
    path = write(tmp_path, BASE + AUDIENCE + '[gleap]\napi_token = "t0k3n"\n')
    path.chmod(0o644)
    load_config(path)
    assert "readable by group or others" in caplog.text and "chmod 600" in caplog.text
    assert "t0k3n" not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    load_config(path)
    assert caplog.text == ""


def test_sync_settings_and_per_audience_guard(tmp_path: Path) -> None:
    text = BASE + "[sync]\nmax_removal_fraction = 0.2\nmax_attempts = 3\n" + AUDIENCE
    text += AUDIENCE.replace("High Value", "Other") + "max_removal_fraction = 0.9\nallow_empty = true\n"
    config = load_config(write(tmp_path, text))
    assert config.sync.max_attempts == 3
    assert [(a.max_removal_fraction, a.allow_empty) for a in config.audiences] == [(0.2, False), (0.9, True)]
    with pytest.raises(ConfigError, match="between 0 and 1"):
        load_config(write(tmp_path, BASE + "[sync]\nmax_removal_fraction = 1.5\n" + AUDIENCE))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("45m", 2700),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1.5s", 1.5),
        ("90d", 90 * 86400),
        ("2w3d12h", 17 * 86400 + 12 * 3600),
        ("3d2w", None),
        ("2x", None),
        ("", None),
        ("h", None),
    ],
)
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_schedule_server_and_per_audience_overrides(tmp_path: Path) -> None:
    text = BASE + '[schedule]\ninterval = "90s"\njitter = "0s"\n[server]\nlisten = "127.0.0.1:9464"\n'
    text += AUDIENCE + AUDIENCE.replace("High Value", "Other") + 'interval = "1h30m"\njitter = "10m"\n'
    config = load_config(write(tmp_path, text))
    assert config.server is not None and (config.server.host, config.server.port) == ("127.0.0.1", 9464)
    assert [(a.interval, a.jitter) for a in config.audiences] == [(90, 0), (5400, 600)]
    assert config.schedule.misfire_grace_seconds > 1  # never APScheduler's 1 s default


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('[schedule]\ninterval = "2 hours"\n', 'write interval as a string like "90s"'),
        ('[schedule]\ninterval = "0s"\n', "is not a duration"),
        ('[server]\nlisten = "9464"\n', "is not HOST:PORT"),
    ],
)
def test_bad_schedule_or_server(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(tmp_path, BASE + extra + AUDIENCE))


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "\n[[audiences]]\nname = \n")
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 9"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*--config"):
        load_config(tmp_path / "nope.toml")


def test_cli_exits_2_on_config_errors_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BASE + AUDIENCE.replace('"warehouse"', '"nowhere"'))
    assert main(["--config", str(path), "sync", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown source 'nowhere'" in err and "Traceback" not in err


def test_cli_refuses_unknown_audience_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BASE + AUDIENCE)
    assert main(["--config", str(path), "sync", "--dry-run", "--audience", "nope"]) == 2
    assert "high_value_users" in capsys.readouterr().err


def test_cli_without_token_refuses_and_says_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GLEAP_API_TOKEN", raising=False)
    path = write(tmp_path, BASE + AUDIENCE)
    assert main(["--config", str(path), "sync"]) == 2
    err = capsys.readouterr().err
    assert "GLEAP_API_TOKEN" in err and "--dry-run" in err
    assert not (tmp_path / "store.db").exists()  # refused before touching the store


def test_new_settings_parse(tmp_path: Path) -> None:
    text = BASE.replace('url = "sqlite:///store.db"', 'url = "sqlite:///store.db"\nbusy_timeout_seconds = 5')
    text += "[gleap]\nprevent_last_activity_update = false\nbreaker_failures = 3\n"
    text += "breaker_trial_calls = 4\nbreaker_trial_failure_rate = 0\n"
    text += '[sync]\nretry_backoff = "30s"\nretry_backoff_max = "1h30m"\n'
    text += '[server]\nlisten = "127.0.0.1:9464"\nstall_after = "5m"\n' + AUDIENCE
    config = load_config(write(tmp_path, text))
    assert config.store.busy_timeout_seconds == 5.0
    assert config.gleap.prevent_last_activity_update is False and config.gleap.breaker_failures == 3
    assert (config.gleap.breaker_trial_calls, config.gleap.breaker_trial_failure_rate) == (4, 0.0)
    assert (config.sync.retry_backoff_seconds, config.sync.retry_backoff_max_seconds) == (30, 5400)
    assert config.server is not None and config.server.stall_after_seconds == 300


def test_new_settings_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE + '[server]\nlisten = "127.0.0.1:9464"\n' + AUDIENCE))
    assert config.store.busy_timeout_seconds == 30.0
    assert config.gleap.prevent_last_activity_update is True and config.gleap.breaker_failures == 20
    assert (config.gleap.breaker_trial_calls, config.gleap.breaker_trial_failure_rate) == (10, 0.5)
    assert (config.sync.retry_backoff_seconds, config.sync.retry_backoff_max_seconds) == (60, 3600)
    assert config.server is not None and config.server.stall_after_seconds == 900


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[store]\nbusy_timeout_seconds = 0\n", ["[store].busy_timeout_seconds", "greater than zero"]),
        (
            '[store]\nbusy_timeout_seconds = "30s"\n',
            ["[store].busy_timeout_seconds", "must be a number, not"],
        ),
        (
            '[gleap]\nprevent_last_activity_update = "no"\n',
            ["prevent_last_activity_update", "must be true or false"],
        ),
        ("[gleap]\nbreaker_failures = 0\n", ["[gleap].breaker_failures", "greater than zero"]),
        ("[gleap]\nbreaker_failures = 2.5\n", ["[gleap].breaker_failures", "must be an integer, not a"]),
        ("[gleap]\nbreaker_trial_calls = 0\n", ["[gleap].breaker_trial_calls", "greater than zero"]),
        (
            "[gleap]\nbreaker_trial_failure_rate = 1\n",
            ["[gleap].breaker_trial_failure_rate", "less than 1", "e.g. 0.5"],
        ),
        ("[gleap]\nbreaker_trial_failure_rate = -0.1\n", ["breaker_trial_failure_rate", "at least 0"]),
        ("[sync]\nretry_backoff = 60\n", ["[sync].retry_backoff", "must be a string, not an integer"]),
        ('[sync]\nretry_backoff = "1 minute"\n', ["[sync].retry_backoff", "is not a duration"]),
        ('[sync]\nretry_backoff_max = "1x"\n', ["[sync].retry_backoff_max", "is not a duration"]),
        (
            '[sync]\nretry_backoff = "2h"\nretry_backoff_max = "1h"\n',
            ["[sync].retry_backoff_max", "at least retry_backoff"],
        ),
        ('[server]\nlisten = "127.0.0.1:9464"\nstall_after = "0s"\n', ["[server].stall_after", "duration"]),
        ('[server]\nlisten = "127.0.0.1:9464"\nstall_afterr = "5m"\n', ["did you mean 'stall_after'"]),
    ],
)
def test_new_settings_are_validated(tmp_path: Path, extra: str, expected: list[str]) -> None:
    text = BASE + AUDIENCE + extra
    if extra.startswith("[store]"):
        text = BASE.replace("[store]\n", extra) + AUDIENCE
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    for fragment in expected:
        assert fragment in str(info.value)


def test_database_urls_expand_environment_variables(tmp_path: Path) -> None:
    environ = {"PGPASS": "pa$$w0rd", "WAREHOUSE_DIR": str(tmp_path / "wh")}
    text = BASE.replace(
        'url = "sqlite:///store.db"', 'url = "postgresql+psycopg://app:${PGPASS}@db.internal/audiencesync"'
    ).replace('url = "sqlite:///source.db"', 'url = "sqlite:///${WAREHOUSE_DIR}/source.db"')
    config = load_config(write(tmp_path, text + AUDIENCE), environ)
    assert make_url(config.store.url).password == "pa$$w0rd"
    assert display_url(config.store.url) == "postgresql+psycopg://app:***@db.internal/audiencesync"
    assert config.sources["warehouse"].url == f"sqlite:///{tmp_path / 'wh' / 'source.db'}"
    # Only ${NAME} is a reference: a bare $ (common in passwords) stays as written.
    literal = BASE.replace('url = "sqlite:///store.db"', 'url = "postgresql+psycopg://app:a$b@h/db"')
    assert make_url(load_config(write(tmp_path, literal + AUDIENCE), {}).store.url).password == "a$b"


def test_display_url_masks_a_password_in_the_query_too() -> None:
    shown = display_url("postgresql+psycopg://app@h/db?password=hunter2&sslmode=require")
    assert "hunter2" not in shown and "sslmode=require" in shown


@pytest.mark.parametrize(
    ("table", "key"),
    [("[store]", "[store].url"), ("[sources.warehouse]", "[sources.warehouse].url")],
)
def test_a_missing_environment_variable_is_named(tmp_path: Path, table: str, key: str) -> None:
    text = BASE + AUDIENCE
    head, _, tail = text.partition(table + "\n")
    text = (
        head
        + table
        + '\nurl = "postgresql+psycopg://app:${NOT_SET_ANYWHERE}@h/db"\n'
        + tail.split("\n", 1)[1]
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert str(path) in message and key in message
    assert "environment variable 'NOT_SET_ANYWHERE'" in message and "export NOT_SET_ANYWHERE=" in message
