"""The config file's settings tables ([store], [gleap], [sync], [schedule], [server],
[retention], [sources.NAME]): frozen, typed objects and the parsing of each."""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from audiencesync.config.secret import Secret
from audiencesync.config.tomltable import Table
from audiencesync.config.urls import check_base_url, is_loopback, resolve_url
from audiencesync.errors import ConfigError

ENV_TOKEN = "GLEAP_API_TOKEN"  # noqa: S105 - the name of the variable, not a secret
# The web status page's token: [server] auth_token, or this variable (preferred).
ENV_SERVER_TOKEN = "AUDIENCESYNC_SERVER_TOKEN"  # noqa: S105 - the name of the variable, not a secret
# Shorter tokens fall to guessing over the network; 16 characters of `openssl rand -hex 16` are 128 bits.
MIN_SERVER_TOKEN = 16

log = logging.getLogger(__name__)

# A prune's `before` may be no later than this long ago (so `[retention] keep` no shorter):
# runs still going and answers still arriving keep their history, and clocks of several
# hosts may disagree a little. Here, not in lifecycle.prune, because the config is checked
# at load time and may not import the layers above it.
MIN_AGE = timedelta(days=1)


@dataclass(frozen=True)
class StoreConfig:
    url: str
    # How long a write waits for SQLite's lock before it fails (and is retried).
    busy_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class GleapConfig:
    base_url: str = "https://api.gleap.io"
    api_token: Secret | None = None
    requests_per_minute: int = 1000
    max_concurrency: int = 8
    timeout_seconds: float = 30.0
    max_retries: int = 6
    allow_http: bool = False
    # Gleap sets a contact's last activity to "now" on every identify unless told
    # not to: a background sync must not make every contact look active today.
    prevent_last_activity_update: bool = True
    # The circuit breaker: this many failed calls in a row (no answer or a 5xx),
    # for at least two different users, with no success between, stop delivery.
    breaker_failures: int = 20
    # After an outage the breaker is half-open: this many trial calls go out, and it closes
    # when at most this share of them failed (else it opens again). Not 0: with 10% of
    # calls still failing, one unlucky 500 would keep delivery paused (issue 22).
    breaker_trial_calls: int = 10
    breaker_trial_failure_rate: float = 0.5
    # Contact deletion (`forget --in-gleap`): from Segment's destination code, not
    # Gleap's docs (GLEAP_API.md), hence a setting. {user_id} is the URL-encoded id.
    delete_path: str = "/admin/contacts/{user_id}"
    # Audience Entered / Exited events (POST /admin/track): the default of each
    # audience's `events`, the two names, and how many events one request carries.
    events: bool = False
    entered_event: str = "Audience Entered"
    exited_event: str = "Audience Exited"
    track_batch_size: int = 100


# Gleap documents no maximum batch. An event is about 150-250 bytes of JSON, so
# 500 of them stay near 100 KB, the default JSON body limit of common Node servers;
# a batch that is still refused as too large (413) is split like a 400 one.
MAX_TRACK_BATCH = 500
MAX_EVENT_NAME = 255


@dataclass(frozen=True)
class SyncConfig:
    max_removal_fraction: float = 0.5
    max_attempts: int = 5
    lease_seconds: float = 60.0
    # A user whose delivery failed waits this long before the next try, doubling
    # with each further failure up to retry_backoff_max.
    retry_backoff_seconds: float = 60.0
    retry_backoff_max_seconds: float = 3600.0


@dataclass(frozen=True)
class ScheduleConfig:
    interval: float = 2 * 3600.0
    jitter: float = 3600.0
    shutdown_grace_seconds: float = 30.0
    # APScheduler's default is 1 s: a busy start-up would silently drop a run.
    misfire_grace_seconds: float = 3600.0


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    # /healthz answers 503 when work is due and nothing was acknowledged for this long.
    stall_after_seconds: float = 900.0
    # Required on every page but /healthz when set; required to listen beyond loopback.
    auth_token: Secret | None = None


@dataclass(frozen=True)
class RetentionConfig:
    # `run` prunes history older than this once a day; None (the default): it keeps everything.
    keep_seconds: float | None = None


@dataclass(frozen=True)
class SourceConfig:
    name: str
    url: str
    timeout_seconds: float = 3600.0
    # Run the audiences' queries inside the store when the source is the store's own
    # PostgreSQL database (pushdown.py); false always streams the ids out and back.
    pushdown: bool = True


GLEAP_KEYS = (
    "base_url",
    "api_token",
    "requests_per_minute",
    "max_concurrency",
    "timeout_seconds",
    "max_retries",
    "allow_http",
    "prevent_last_activity_update",
    "breaker_failures",
    "breaker_trial_calls",
    "breaker_trial_failure_rate",
    "delete_path",
    "events",
    "entered_event",
    "exited_event",
    "track_batch_size",
)
SYNC_KEYS = ("max_removal_fraction", "max_attempts", "lease_seconds", "retry_backoff", "retry_backoff_max")
STORE_KEYS = ("url", "busy_timeout_seconds")
SOURCE_KEYS = ("url", "timeout_seconds", "pushdown")
DEFAULT_STORE_URL = "sqlite:///audiencesync.db"  # beside the config file
SERVER_KEYS = ("listen", "stall_after", "auth_token")
RETENTION_KEYS = ("keep",)
SCHEDULE_KEYS = ("interval", "jitter", "shutdown_grace_seconds", "misfire_grace_seconds")


def store_config(store_t: Table, environ: Mapping[str, str]) -> StoreConfig:
    return StoreConfig(
        url=_url(store_t, store_t.take("url", str, DEFAULT_STORE_URL), environ),
        busy_timeout_seconds=store_t.take_positive(
            "busy_timeout_seconds", float, StoreConfig.busy_timeout_seconds
        ),
    )


def gleap_config(gleap_t: Table, path: Path, environ: Mapping[str, str]) -> GleapConfig:
    defaults = GleapConfig()
    file_token = gleap_t.take_optional("api_token", str)
    env_token = environ.get(ENV_TOKEN)
    token = env_token or file_token
    gleap = GleapConfig(
        base_url=gleap_t.take("base_url", str, defaults.base_url).rstrip("/"),
        api_token=Secret(token) if token else None,
        requests_per_minute=gleap_t.take_positive("requests_per_minute", int, defaults.requests_per_minute),
        max_concurrency=gleap_t.take_positive("max_concurrency", int, defaults.max_concurrency),
        timeout_seconds=gleap_t.take_positive("timeout_seconds", float, defaults.timeout_seconds),
        max_retries=gleap_t.take("max_retries", int, defaults.max_retries),
        allow_http=gleap_t.take("allow_http", bool, False),
        prevent_last_activity_update=gleap_t.take(
            "prevent_last_activity_update", bool, defaults.prevent_last_activity_update
        ),
        breaker_failures=gleap_t.take_positive("breaker_failures", int, defaults.breaker_failures),
        breaker_trial_calls=gleap_t.take_positive("breaker_trial_calls", int, defaults.breaker_trial_calls),
        breaker_trial_failure_rate=trial_failure_rate(gleap_t, defaults.breaker_trial_failure_rate),
        delete_path=delete_path(gleap_t, defaults.delete_path),
        events=gleap_t.take("events", bool, defaults.events),
        entered_event=_event_name(gleap_t, "entered_event", defaults.entered_event),
        exited_event=_event_name(gleap_t, "exited_event", defaults.exited_event),
        track_batch_size=gleap_t.take_positive("track_batch_size", int, defaults.track_batch_size),
    )
    if gleap.track_batch_size > MAX_TRACK_BATCH:
        raise gleap_t.error(
            f"is {gleap.track_batch_size}, more events than one request should carry",
            key="track_batch_size",
            fix=f"use at most {MAX_TRACK_BATCH} (the default is 100)",
        )
    if gleap.entered_event == gleap.exited_event:
        raise gleap_t.error(
            f"is {gleap.exited_event!r}, the same name as entered_event, so a workflow could not tell "
            "an entry from an exit",
            key="exited_event",
            fix="give entered_event and exited_event different names",
        )
    check_base_url(
        gleap.base_url, allow_http=gleap.allow_http, config_path=path, where=gleap_t.place("base_url")
    )
    if file_token and not env_token:
        _warn_if_readable(path)
    return gleap


def delete_path(table: Table, default: str) -> str:
    """A path on base_url that holds ``{user_id}`` once, and nothing else in braces."""
    path = table.take("delete_path", str, default)
    rest = path.replace("{user_id}", "", 1)
    if not path.startswith("/") or "{user_id}" not in path or "{" in rest or "}" in rest or "?" in path:
        raise table.error(
            f"{path!r} is not a path with {{user_id}} in it",
            key="delete_path",
            fix=f'write a path on base_url that holds {{user_id}} once, e.g. delete_path = "{default}"',
        )
    return path


def _event_name(table: Table, key: str, default: str) -> str:
    name = table.take(key, str, default).strip()
    if not name or len(name) > MAX_EVENT_NAME or any(ord(c) < 32 for c in name):
        raise table.error(
            f"{name!r} is not a usable event name",
            key=key,
            fix=f"write 1 to {MAX_EVENT_NAME} printable characters, e.g. {default!r}",
        )
    return name


def sync_config(sync_t: Table) -> SyncConfig:
    sync_defaults = SyncConfig()
    sync = SyncConfig(
        max_removal_fraction=fraction(sync_t, sync_defaults.max_removal_fraction),
        max_attempts=sync_t.take_positive("max_attempts", int, sync_defaults.max_attempts),
        lease_seconds=sync_t.take_positive("lease_seconds", float, sync_defaults.lease_seconds),
        retry_backoff_seconds=sync_t.take_duration(
            "retry_backoff", sync_defaults.retry_backoff_seconds, allow_zero=True
        ),
        retry_backoff_max_seconds=sync_t.take_duration(
            "retry_backoff_max", sync_defaults.retry_backoff_max_seconds, allow_zero=True
        ),
    )
    if sync.retry_backoff_max_seconds < sync.retry_backoff_seconds:
        raise sync_t.error(
            "is shorter than retry_backoff, so the backoff could never grow",
            key="retry_backoff_max",
            fix="set retry_backoff_max to at least retry_backoff",
        )
    return sync


def schedule_config(schedule_t: Table) -> ScheduleConfig:
    schedule_defaults = ScheduleConfig()
    return ScheduleConfig(
        interval=schedule_t.take_duration("interval", schedule_defaults.interval),
        jitter=schedule_t.take_duration("jitter", schedule_defaults.jitter, allow_zero=True),
        shutdown_grace_seconds=schedule_t.take_positive(
            "shutdown_grace_seconds", float, schedule_defaults.shutdown_grace_seconds
        ),
        misfire_grace_seconds=schedule_t.take_positive(
            "misfire_grace_seconds", float, schedule_defaults.misfire_grace_seconds
        ),
    )


def source_configs(raw: dict[str, Any], path: Path, environ: Mapping[str, str]) -> dict[str, SourceConfig]:
    sources: dict[str, SourceConfig] = {}
    for name, table in raw.items():
        source_t = Table(table, path, f"[sources.{name}]", list(SOURCE_KEYS))
        sources[name] = SourceConfig(
            name=name,
            url=_url(source_t, source_t.take("url", str, required=True), environ),
            timeout_seconds=source_t.take_positive("timeout_seconds", float, SourceConfig.timeout_seconds),
            pushdown=source_t.take("pushdown", bool, SourceConfig.pushdown),
        )
    return sources


def server_config(table: Table, environ: Mapping[str, str]) -> tuple[ServerConfig | None, Secret | None]:
    """The daemon's server (None without listen), and the status pages' token: without listen,
    `serve --listen` still serves with it (and `run` says it serves nothing)."""
    listen = table.take_optional("listen", str)
    file_token = table.take_optional("auth_token", str)
    token = server_token(environ, file_token, table)
    if listen is None:
        return None, token
    host, port = parse_listen(listen)
    if host is None:
        raise table.error(f"{listen!r} is not HOST:PORT", key="listen", fix='write listen = "127.0.0.1:9464"')
    stall_after = table.take_duration("stall_after", ServerConfig.stall_after_seconds)
    if token is None and not is_loopback(host):
        raise table.error(
            f"listen = {listen!r} serves the status pages beyond this host, and no token protects them",
            key="auth_token",
            fix=f"set {ENV_SERVER_TOKEN} (or auth_token here) to a secret of at least {MIN_SERVER_TOKEN} "
            'characters, e.g. from `openssl rand -hex 16`; or listen on loopback: listen = "127.0.0.1:9464"',
        )
    return ServerConfig(host, port, stall_after, token), token


def parse_listen(listen: str) -> tuple[str | None, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); (None, 0) when it is not that."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return None, 0
    return host.strip("[]"), int(port)


def server_token(
    environ: Mapping[str, str], file_token: str | None = None, table: Table | None = None
) -> Secret | None:
    """The status pages' token: the environment's first, as for the Gleap token, then the file's
    ``[server] auth_token`` (read from ``table``). Refused when short enough to guess."""
    token, where = environ.get(ENV_SERVER_TOKEN), ENV_SERVER_TOKEN
    if not token and table is not None:
        token, where = file_token, table.place("auth_token")
    if not token:
        return None
    if len(token) < MIN_SERVER_TOKEN or token != token.strip():
        raise ConfigError(
            f"the status pages' token is shorter than {MIN_SERVER_TOKEN} characters, or has blanks at an end",
            path=str(table.path) if table is not None and where != ENV_SERVER_TOKEN else None,
            where=where,
            fix="use a random secret, e.g. the output of `openssl rand -hex 16`",
        )
    return Secret(token)


def retention_config(table: Table) -> RetentionConfig:
    keep = table.take_duration("keep", 0.0) or None  # absent: keep everything
    if keep is not None and keep < MIN_AGE.total_seconds():
        raise table.error(
            "keeps less than a day of history",
            key="keep",
            fix='keep at least "1d", e.g. keep = "90d"; remove the key to keep all history',
        )
    return RetentionConfig(keep)


def fraction(table: Table, default: float) -> float:
    value = table.take("max_removal_fraction", float, default)
    if not 0.0 <= value <= 1.0:
        raise table.error(
            "must be between 0 and 1",
            key="max_removal_fraction",
            fix="write the largest share of members one cycle may remove, e.g. 0.5",
        )
    return value


def trial_failure_rate(table: Table, default: float) -> float:
    value = table.take("breaker_trial_failure_rate", float, default)
    if not 0.0 <= value < 1.0:
        raise table.error(
            "must be at least 0 and less than 1",
            key="breaker_trial_failure_rate",
            fix="write the largest share of the trial calls after an outage that may fail, e.g. 0.5",
        )
    return value


def _warn_if_readable(path: Path) -> None:
    """The token sits in the file: warn when others can read it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "%s holds api_token and is readable by group or others (mode %s). "
            "Fix: chmod 600 %s, or move the token to the GLEAP_API_TOKEN environment variable.",
            path,
            stat.filemode(mode),
            path,
        )


def _url(table: Table, url: str, environ: Mapping[str, str]) -> str:
    return resolve_url(url, config_path=table.path, where=table.place("url"), environ=environ)
