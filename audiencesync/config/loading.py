"""Loading and validating the TOML configuration into frozen, typed objects.

Everything is checked before anything runs; each problem is reported with the
file, the place in it and the fix (see ``errors.ConfigError``).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audiencesync.config.alerts import AlertConfig, alert_configs
from audiencesync.config.audiences import AudienceConfig, audience_configs, check_previous_keys
from audiencesync.config.secret import Secret
from audiencesync.config.sections import (
    ENV_TOKEN,
    GLEAP_KEYS,
    RETENTION_KEYS,
    SCHEDULE_KEYS,
    SERVER_KEYS,
    STORE_KEYS,
    SYNC_KEYS,
    GleapConfig,
    RetentionConfig,
    ScheduleConfig,
    ServerConfig,
    SourceConfig,
    StoreConfig,
    SyncConfig,
    gleap_config,
    retention_config,
    schedule_config,
    server_config,
    source_configs,
    store_config,
    sync_config,
)
from audiencesync.config.tomltable import Table, parse_duration
from audiencesync.config.traits import trait_configs
from audiencesync.config.urls import display_url
from audiencesync.errors import AudiencePausedError, ConfigError

# Re-exported: other modules import these from here.
__all__ = [
    "ENV_TOKEN",
    "AlertConfig",
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
# The config file's top-level tables, in the order the starter (starter.py) writes them.
ROOT_KEYS = (
    *("store", "gleap", "sync", "schedule", "server", "retention"),
    *("sources", "audiences", "traits", "alerts"),
)
DEFAULT_CONFIG_NAME = "audiencesync.toml"


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
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    traits: tuple[AudienceConfig, ...] = ()  # [[traits]]: AudienceConfigs of kind "trait"
    alerts: tuple[AlertConfig, ...] = ()  # [[alerts]]: the webhooks (alerts.py)
    # The status pages' token ($AUDIENCESYNC_SERVER_TOKEN, else [server] auth_token), also without
    # [server] listen: `serve --listen` serves with it. With listen, it is server.auth_token.
    pages_token: Secret | None = None

    @property
    def properties(self) -> tuple[AudienceConfig, ...]:
        """Everything synced, audiences then traits: what is scheduled, refreshed and delivered."""
        return self.audiences + self.traits

    @property
    def active(self) -> tuple[AudienceConfig, ...]:
        """The properties that are refreshed and delivered: all but the paused ones (enabled = false)."""
        return tuple(p for p in self.properties if p.enabled)

    def runnable(self, key: str) -> AudienceConfig:
        """``audience(key)``, refusing a paused one: it is neither refreshed nor delivered."""
        found = self.audience(key)
        if not found.enabled:
            raise AudiencePausedError(found.kind, key, path=str(self.path))
        return found

    def audience(self, key: str) -> AudienceConfig:
        """The audience or trait with this key (keys are unique across both)."""
        for audience in self.properties:
            if audience.key == key:
                return audience
        keys = [a.key for a in self.properties]
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"no audience or trait has the key {key!r}",
            path=str(self.path),
            fix=f"{hint}Use one of the configured keys: {', '.join(keys) or 'none'}",
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


def _parse(raw: dict[str, Any], path: Path, environ: Mapping[str, str]) -> Config:
    root = Table(raw, path, "top level", list(ROOT_KEYS))

    def section(name: str, keys: Sequence[str]) -> Table:
        return Table(root.take(name, dict, {}), path, f"[{name}]", list(keys))

    store = store_config(section("store", STORE_KEYS), environ)
    gleap = gleap_config(section("gleap", GLEAP_KEYS), path, environ)
    sync = sync_config(section("sync", SYNC_KEYS))
    schedule = schedule_config(section("schedule", SCHEDULE_KEYS))
    server, pages_token = server_config(section("server", SERVER_KEYS), environ)
    retention = retention_config(section("retention", RETENTION_KEYS))
    sources = source_configs(root.take("sources", dict, {}), path, environ)
    keys: dict[str, str] = {}
    audiences = audience_configs(
        root.take("audiences", list, []), path, sources, sync, schedule, keys, events=gleap.events
    )
    traits = trait_configs(root.take("traits", list, []), path, sources, sync, schedule, keys)
    check_previous_keys((*audiences, *traits), path)
    alerts = alert_configs(root.take("alerts", list, []), path, environ)
    return Config(
        path=path,
        store=store,
        gleap=gleap,
        sync=sync,
        sources=sources,
        schedule=schedule,
        server=server,
        audiences=audiences,
        retention=retention,
        traits=traits,
        alerts=alerts,
        pages_token=pages_token,
    )
