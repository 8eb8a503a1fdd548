"""The starter config `audiencesync init` writes: every option, its default and what it does.

The defaults are read from the config's own dataclasses (``config_sections``,
``config_audiences``), never typed twice, so the file can't drift from what the
loader does; tests check that every key the loader knows is here. A commented-
out option is at its default: uncommenting it changes nothing until it is edited.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from audiencesync import __version__
from audiencesync.config.alerts import AlertConfig
from audiencesync.config.secret import Secret
from audiencesync.config.sections import (
    DEFAULT_STORE_URL,
    ENV_TOKEN,
    MAX_TRACK_BATCH,
    GleapConfig,
    ScheduleConfig,
    ServerConfig,
    SourceConfig,
    StoreConfig,
    SyncConfig,
)
from audiencesync.fields import STANDARD_COLUMNS
from audiencesync.keys import key_for_name

TomlValue = str | bool | int | float | list[str] | dict[str, str]


@dataclass(frozen=True)
class Option:
    key: str
    value: TomlValue
    explain: str  # one line
    default: bool = True  # False: no default, the value is an example (the option is off unless set)
    active: bool = False  # written uncommented: the starter's own choice, to be edited


@dataclass(frozen=True)
class Section:
    header: str  # "[store]", "[[audiences]]"
    intro: Sequence[str]
    options: Sequence[Option]
    commented: bool = False  # an optional table, off until uncommented


def duration(seconds: float) -> str:
    """A duration as the config writes it ("2h", "1h30m", "90s"): what ``parse_duration`` reads back."""
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    parts = []
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def toml_value(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 30, not 30.0: the loader takes an integer where a float goes
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


AUDIENCE_NAME = "Pro Users"
SOURCE_NAME = "app"
SOURCE_URL = "sqlite:///app.db"
AUDIENCE_QUERY = "SELECT id AS user_id FROM users WHERE plan = 'pro'"


def sections() -> list[Section]:
    gleap, sync, schedule = GleapConfig(), SyncConfig(), ScheduleConfig()
    alert = AlertConfig(url=Secret(""))  # only its defaults are read
    store_ = StoreConfig(url=DEFAULT_STORE_URL)
    return [
        Section(
            "[store]",
            ["Where audiencesync keeps its snapshot of every audience and its log of calls to Gleap."],
            [
                Option(
                    "url",
                    store_.url,
                    "SQLite file or PostgreSQL, e.g. postgresql+psycopg://sync:${PGPASSWORD}@db/audiencesync",
                    active=True,
                ),
                Option(
                    "busy_timeout_seconds",
                    store_.busy_timeout_seconds,
                    "SQLite: how long a write waits for the lock",
                ),
            ],
        ),
        Section(
            "[gleap]",
            [
                f"The API token is read from the environment variable {ENV_TOKEN} (Gleap: Project >",
                "Settings > Security); keep it out of this file. api_token below is only a fallback.",
            ],
            [
                Option(
                    "base_url",
                    gleap.base_url,
                    "Gleap's API; an on-premise Gleap or a staging stand-in elsewhere",
                ),
                Option(
                    "api_token",
                    "...",
                    f"fallback when {ENV_TOKEN} is unset; then chmod 600 this file (no default)",
                    default=False,
                ),
                Option("requests_per_minute", gleap.requests_per_minute, "rate limit, all calls together"),
                Option("max_concurrency", gleap.max_concurrency, "calls in flight at once"),
                Option("timeout_seconds", gleap.timeout_seconds, "per call"),
                Option("max_retries", gleap.max_retries, "retries of a timeout, 408 or 5xx within one run"),
                Option(
                    "allow_http",
                    gleap.allow_http,
                    "plain http to a non-loopback base_url (sends the token in clear)",
                ),
                Option(
                    "prevent_last_activity_update",
                    gleap.prevent_last_activity_update,
                    "don't set each synced contact's last activity to now",
                ),
                Option(
                    "breaker_failures", gleap.breaker_failures, "failed calls in a row that pause delivery"
                ),
                Option(
                    "breaker_trial_calls",
                    gleap.breaker_trial_calls,
                    "after an outage: trial calls that decide whether delivery resumes",
                ),
                Option(
                    "breaker_trial_failure_rate",
                    gleap.breaker_trial_failure_rate,
                    "...resumes when at most this share of them failed",
                ),
                Option("delete_path", gleap.delete_path, "`forget --in-gleap`: the contact deletion path"),
                Option(
                    "events", gleap.events, "post Audience Entered/Exited events (each audience may override)"
                ),
                Option("entered_event", gleap.entered_event, "the entry event's name"),
                Option("exited_event", gleap.exited_event, "the exit event's name"),
                Option(
                    "track_batch_size",
                    gleap.track_batch_size,
                    f"events per track call, 1 to {MAX_TRACK_BATCH}",
                ),
            ],
        ),
        Section(
            "[sync]",
            ["How one cycle guards, retries and holds the store."],
            [
                Option(
                    "max_removal_fraction",
                    sync.max_removal_fraction,
                    "hold a cycle that would remove more than this share of an audience",
                ),
                Option(
                    "max_attempts", sync.max_attempts, "Gleap's rejections of one change before it is parked"
                ),
                Option(
                    "lease_seconds",
                    sync.lease_seconds,
                    "the writer lease's time to live, renewed every eighth",
                ),
                Option(
                    "retry_backoff", duration(sync.retry_backoff_seconds), "a failed user waits this long..."
                ),
                Option(
                    "retry_backoff_max", duration(sync.retry_backoff_max_seconds), "...doubling up to this"
                ),
            ],
        ),
        Section(
            "[schedule]",
            ['For `audiencesync run`. Durations: "90s", "45m", "2h", "1h30m", "3d", "2w".'],
            [
                Option(
                    "interval", duration(schedule.interval), "each audience is refreshed every interval..."
                ),
                Option("jitter", duration(schedule.jitter), "...plus a random 0 to jitter"),
                Option(
                    "shutdown_grace_seconds",
                    schedule.shutdown_grace_seconds,
                    "on SIGTERM, how long calls in flight may finish",
                ),
                Option(
                    "misfire_grace_seconds",
                    schedule.misfire_grace_seconds,
                    "a refresh that could not start on time still runs within this",
                ),
            ],
        ),
        Section(
            "[server]",
            [
                "The web status page, /healthz and /metrics for `audiencesync run`: off unless",
                "listen is set. Any address but loopback needs a token: AUDIENCESYNC_SERVER_TOKEN",
                "(preferred) or auth_token, at least 16 characters (openssl rand -hex 16).",
            ],
            [
                Option("listen", "127.0.0.1:9464", "HOST:PORT to serve on (no default)", default=False),
                Option(
                    "stall_after",
                    duration(ServerConfig.stall_after_seconds),
                    "/healthz answers 503 when work is due and nothing was acknowledged this long",
                ),
                Option(
                    "auth_token",
                    "<openssl rand -hex 16>",
                    "fallback for AUDIENCESYNC_SERVER_TOKEN; asked on every page but /healthz",
                    default=False,
                ),
            ],
            commented=True,
        ),
        Section(
            "[retention]",
            ["For `audiencesync run`: off unless keep is set, and all history is kept."],
            [
                Option(
                    "keep", "90d", 'once a day, prune history older than this, at least "1d"', default=False
                )
            ],
            commented=True,
        ),
        Section(
            f"[sources.{SOURCE_NAME}]",
            [
                "A database the audiences read: any number of [sources.NAME], any SQLAlchemy URL.",
                "${VAR} in a URL is the environment variable VAR; relative SQLite paths follow this file.",
            ],
            [
                Option(
                    "url",
                    SOURCE_URL,
                    "e.g. postgresql+psycopg://reader:${APP_DB_PASSWORD}@db.internal/app",
                    active=True,
                ),
                Option(
                    "timeout_seconds", SourceConfig.timeout_seconds, "a query running longer is cancelled"
                ),
                Option(
                    "pushdown", SourceConfig.pushdown, "the store's own PostgreSQL: run the query inside it"
                ),
            ],
        ),
        Section(
            "[[audiences]]",
            [
                *textwrap.wrap(
                    "An audience: a query that returns user_id; Gleap gets a boolean per member, named "
                    "by the key. Columns beside user_id are contact fields: "
                    f"{', '.join(STANDARD_COLUMNS)}; any other column is a custom attribute. "
                    "Repeat [[audiences]] for more.",
                    90,
                ),
            ],
            _entry_options(AUDIENCE_NAME, AUDIENCE_QUERY, active=True, events=gleap.events),
        ),
        Section(
            "[[traits]]",
            ["A trait: a computed value per user (a score, a date), sent as a custom attribute."],
            [
                *_entry_options(
                    "Lifetime Value",
                    "SELECT user_id, sum(amount) AS value FROM orders GROUP BY user_id",
                    active=False,
                ),
                Option(
                    "missing",
                    "free",
                    "sent to a user who no longer has a value (default: null)",
                    default=False,
                ),
            ],
            commented=True,
        ),
        Section(
            "[[alerts]]",
            [
                "A webhook told once when a condition starts and once when it ends (docs/alerts.md);",
                "repeat [[alerts]] for more. `audiencesync alert-test` tries each one.",
            ],
            [
                Option(
                    "url",
                    "https://hooks.example.com/audiencesync",
                    'the webhook; a secret one from the environment: url = "${SLACK_WEBHOOK_URL}"',
                    default=False,
                ),
                Option(
                    "format", alert.format, 'json (an object, see docs/alerts.md) or "slack" ({"text": ...})'
                ),
                Option("events", list(alert.events), "the events this webhook hears (default: all)"),
                Option(
                    "headers",
                    {},
                    'extra headers, e.g. {Authorization = "Bearer ${ALERT_TOKEN}"} (values may use ${VAR})',
                ),
                Option(
                    "remind_every",
                    "4h",
                    "repeat a condition still open this often (default: off, only its start and end)",
                    default=False,
                ),
            ],
            commented=True,
        ),
    ]


def _entry_options(name: str, query: str, *, active: bool, events: bool | None = None) -> list[Option]:
    sync, schedule = SyncConfig(), ScheduleConfig()
    options = [
        Option("name", name, "shown in logs and events", default=False, active=active),
        Option("key", key_for_name(name), "the property in Gleap; by default the name, snake_cased"),
        Option("source", SOURCE_NAME, "one of the [sources.NAME]", default=False, active=active),
        Option("query", query, "run on the source every cycle", default=False, active=active),
        Option("max_removal_fraction", sync.max_removal_fraction, "its own guard ([sync]'s by default)"),
        Option("allow_empty", False, "an empty result is a real answer, not a broken source"),
        Option("interval", duration(schedule.interval), "its own schedule ([schedule]'s by default)"),
        Option("jitter", duration(schedule.jitter), "its own jitter ([schedule]'s by default)"),
        Option("previous_keys", [], "keys it had before a rename: each is retired in Gleap once"),
        Option("enabled", True, "false pauses it: kept in the store, neither refreshed nor delivered"),
    ]
    if events is not None:  # only audiences have entries and exits
        options.insert(
            -2, Option("events", events, "its Audience Entered/Exited events ([gleap]'s by default)")
        )
    return options


def render() -> str:
    lines = [
        f"# audiencesync configuration, written by `audiencesync init` (audiencesync {__version__}).",
        "# Every option is listed with its default; a commented-out option is at its default.",
        '# Reference: the docs\' "Configuration reference" (docs/configuration.md).',
    ]
    for section in sections():
        off = "# " if section.commented else ""
        lines += ["", *(f"# {line}" for line in section.intro), f"{off}{section.header}"]
        for option in section.options:
            lines.append(f"# {option.explain}")
            commented = "" if option.active and not section.commented else "# "
            lines.append(f"{commented}{option.key} = {toml_value(option.value)}")
    return "\n".join(lines) + "\n"
