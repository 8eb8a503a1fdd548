"""Loading and validating the TOML configuration into frozen, typed objects.

Everything is checked before anything runs; each problem is reported with the
file, the place in it and the fix (see ``errors.ConfigError``).
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiencesync.errors import ConfigError
from audiencesync.keys import key_for_name, key_problem
from audiencesync.prune import MIN_AGE
from audiencesync.tomltable import Table, parse_duration
from audiencesync.urls import check_base_url, display_url, resolve_url

# Re-exported: other modules import these from here.
__all__ = [
    "AudienceConfig",
    "Config",
    "GleapConfig",
    "RetentionConfig",
    "ScheduleConfig",
    "Secret",
    "ServerConfig",
    "SourceConfig",
    "StoreConfig",
    "SyncConfig",
    "display_url",
    "find_config",
    "load_config",
    "parse_duration",
]

ENV_CONFIG = "AUDIENCESYNC_CONFIG"
ENV_TOKEN = "GLEAP_API_TOKEN"  # noqa: S105 - the name of the variable, not a secret
DEFAULT_CONFIG_NAME = "audiencesync.toml"

log = logging.getLogger(__name__)


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


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


@dataclass(frozen=True)
class RetentionConfig:
    # `run` prunes history older than this once a day; None (the default): it keeps everything.
    keep_seconds: float | None = None


@dataclass(frozen=True)
class SourceConfig:
    name: str
    url: str
    timeout_seconds: float = 3600.0


@dataclass(frozen=True)
class AudienceConfig:
    name: str
    key: str
    source: str
    query: str
    max_removal_fraction: float = 0.5
    allow_empty: bool = False
    interval: float = ScheduleConfig.interval
    jitter: float = ScheduleConfig.jitter


@dataclass(frozen=True)
class Config:
    path: Path
    store: StoreConfig
    gleap: GleapConfig
    sync: SyncConfig
    sources: Mapping[str, SourceConfig]
    schedule: ScheduleConfig
    server: ServerConfig | None
    audiences: tuple[AudienceConfig, ...]
    retention: RetentionConfig = RetentionConfig()

    def audience(self, key: str) -> AudienceConfig:
        for audience in self.audiences:
            if audience.key == key:
                return audience
        known = ", ".join(a.key for a in self.audiences) or "none"
        raise ConfigError(
            f"no audience has the key {key!r}",
            path=str(self.path),
            fix=f"use one of the configured keys: {known}",
        )


def find_config(cli_path: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """The config file to use: --config, then $AUDIENCESYNC_CONFIG, then ./audiencesync.toml."""
    if cli_path:
        return Path(cli_path)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    return Path(DEFAULT_CONFIG_NAME)


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            "the config file does not exist",
            path=str(path),
            fix=f"pass --config PATH, set {ENV_CONFIG}, or create ./{DEFAULT_CONFIG_NAME} "
            "(config.example.toml is a starting point)",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file ({exc.strerror})", path=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("the file is not UTF-8 text", path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already names the line and column.
        raise ConfigError(f"invalid TOML: {exc}", path=str(path)) from None
    return _parse(raw, path, environ)


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
)
SYNC_KEYS = ("max_removal_fraction", "max_attempts", "lease_seconds", "retry_backoff", "retry_backoff_max")
AUDIENCE_KEYS = (
    "name",
    "key",
    "source",
    "query",
    "max_removal_fraction",
    "allow_empty",
    "interval",
    "jitter",
)
SCHEDULE_KEYS = ("interval", "jitter", "shutdown_grace_seconds", "misfire_grace_seconds")


def _parse(raw: dict[str, Any], path: Path, environ: Mapping[str, str]) -> Config:
    root = Table(
        raw,
        path,
        "top level",
        ["store", "gleap", "sync", "schedule", "server", "retention", "sources", "audiences"],
    )
    store_t = Table(root.take("store", dict, {}), path, "[store]", ["url", "busy_timeout_seconds"])
    gleap_t = Table(root.take("gleap", dict, {}), path, "[gleap]", list(GLEAP_KEYS))
    sync_t = Table(root.take("sync", dict, {}), path, "[sync]", list(SYNC_KEYS))
    schedule_t = Table(root.take("schedule", dict, {}), path, "[schedule]", list(SCHEDULE_KEYS))
    server_t = Table(root.take("server", dict, {}), path, "[server]", ["listen", "stall_after"])
    sources_raw = root.take("sources", dict, {})
    audiences_raw = root.take("audiences", list, [])

    store = StoreConfig(
        url=_url(store_t, store_t.take("url", str, "sqlite:///audiencesync.db"), environ),
        busy_timeout_seconds=store_t.take_positive(
            "busy_timeout_seconds", float, StoreConfig.busy_timeout_seconds
        ),
    )

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
    )
    check_base_url(
        gleap.base_url, allow_http=gleap.allow_http, config_path=path, where=gleap_t.place("base_url")
    )
    if file_token and not env_token:
        _warn_if_readable(path)

    sync_defaults = SyncConfig()
    sync = SyncConfig(
        max_removal_fraction=_fraction(sync_t, sync_defaults.max_removal_fraction),
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

    schedule_defaults = ScheduleConfig()
    schedule = ScheduleConfig(
        interval=schedule_t.take_duration("interval", schedule_defaults.interval),
        jitter=schedule_t.take_duration("jitter", schedule_defaults.jitter, allow_zero=True),
        shutdown_grace_seconds=schedule_t.take_positive(
            "shutdown_grace_seconds", float, schedule_defaults.shutdown_grace_seconds
        ),
        misfire_grace_seconds=schedule_t.take_positive(
            "misfire_grace_seconds", float, schedule_defaults.misfire_grace_seconds
        ),
    )
    server = _listen(server_t)
    retention = _retention(Table(root.take("retention", dict, {}), path, "[retention]", ["keep"]))

    sources: dict[str, SourceConfig] = {}
    for name, table in sources_raw.items():
        source_t = Table(table, path, f"[sources.{name}]", ["url", "timeout_seconds"])
        sources[name] = SourceConfig(
            name=name,
            url=_url(source_t, source_t.take("url", str, required=True), environ),
            timeout_seconds=source_t.take_positive("timeout_seconds", float, SourceConfig.timeout_seconds),
        )

    audiences: list[AudienceConfig] = []
    seen: dict[str, str] = {}
    for index, table in enumerate(audiences_raw, start=1):
        audience_t = Table(table, path, f"[[audiences]] #{index}", list(AUDIENCE_KEYS))
        name = audience_t.take("name", str, required=True).strip()
        if name:
            audience_t.where = f"[[audiences]] #{index} ({name!r})"
        else:
            raise audience_t.error("the name is empty", key="name", fix="give the audience a name")
        explicit_key = audience_t.take_optional("key", str)
        key = explicit_key if explicit_key is not None else key_for_name(name)
        problem = key_problem(key)
        if problem:
            fix = (
                'set an explicit key, e.g. key = "my_audience"'
                if explicit_key is None
                else "use lowercase letters, digits and single underscores, not a Gleap contact field"
            )
            raise audience_t.error(problem, key="key" if explicit_key is not None else "name", fix=fix)
        if key in seen:
            raise audience_t.error(
                f"the key {key!r} is already used by audience {seen[key]!r}",
                fix="rename one audience or give it an explicit, different key",
            )
        seen[key] = name
        source = audience_t.take("source", str, required=True)
        if source not in sources:
            known = ", ".join(sources) or "none defined"
            raise audience_t.error(
                f"unknown source {source!r}",
                key="source",
                fix=f"use one of the [sources.NAME] tables ({known}) or add [sources.{source}]",
            )
        query = audience_t.take("query", str, required=True).strip()
        if not query:
            raise audience_t.error(
                "the query is empty", key="query", fix="write a SELECT that yields a user_id column"
            )
        audiences.append(
            AudienceConfig(
                name=name,
                key=key,
                source=source,
                query=query,
                max_removal_fraction=_fraction(audience_t, sync.max_removal_fraction),
                allow_empty=audience_t.take("allow_empty", bool, False),
                interval=audience_t.take_duration("interval", schedule.interval),
                jitter=audience_t.take_duration("jitter", schedule.jitter, allow_zero=True),
            )
        )

    return Config(
        path=path,
        store=store,
        gleap=gleap,
        sync=sync,
        sources=sources,
        schedule=schedule,
        server=server,
        audiences=tuple(audiences),
        retention=retention,
    )


def _listen(table: Table) -> ServerConfig | None:
    listen = table.take_optional("listen", str)
    if listen is None:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise table.error(f"{listen!r} is not HOST:PORT", key="listen", fix='write listen = "127.0.0.1:9464"')
    stall_after = table.take_duration("stall_after", ServerConfig.stall_after_seconds)
    return ServerConfig(host.strip("[]"), int(port), stall_after)


def _retention(table: Table) -> RetentionConfig:
    keep = table.take_duration("keep", 0.0) or None  # absent: keep everything
    if keep is not None and keep < MIN_AGE.total_seconds():
        raise table.error(
            "keeps less than a day of history",
            key="keep",
            fix='keep at least "1d", e.g. keep = "90d"; remove the key to keep all history',
        )
    return RetentionConfig(keep)


def _fraction(table: Table, default: float) -> float:
    value = table.take("max_removal_fraction", float, default)
    if not 0.0 <= value <= 1.0:
        raise table.error(
            "must be between 0 and 1",
            key="max_removal_fraction",
            fix="write the largest share of members one cycle may remove, e.g. 0.5",
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
