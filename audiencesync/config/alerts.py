"""The config file's [[alerts]]: the webhooks told when something needs a person, and what each hears.

A webhook URL (Slack's holds its secret in the path) and header values may
come from the environment as ``${VAR}``, like a database URL. Both are kept as
``Secret``s: nothing logs or shows them except through ``redacted_url``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from audiencesync.config.secret import Secret
from audiencesync.config.tomltable import Table
from audiencesync.config.urls import expand_env

# Every event a webhook can subscribe to (alerts.py raises them; docs/alerts.md describes each).
EVENTS = ("held", "source_failed", "parked", "gleap_down", "token_refused", "stalled", "lease")
FORMATS = ("json", "slack")
ALERT_KEYS = ["url", "format", "events", "headers", "remind_every"]
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)


@dataclass(frozen=True)
class AlertConfig:
    url: Secret
    format: str = "json"  # json | slack
    events: tuple[str, ...] = EVENTS
    headers: tuple[tuple[str, Secret], ...] = ()
    # Repeat a condition still open this often; None (the default): only its start and its end.
    remind_every_seconds: float | None = None

    @property
    def shown_url(self) -> str:
        return redacted_url(self.url.reveal())


def redacted_url(url: str) -> str:
    """A webhook URL fit to show: scheme, host and the first path segment; credentials,
    the rest of the path (Slack's secret) and the query masked."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    segments = [s for s in parts.path.split("/") if s]
    path = f"/{segments[0]}" if segments else "/"
    if len(segments) > 1:
        path += "/***"
    return f"{parts.scheme}://{host}{path}" + ("?***" if parts.query else "")


def alert_configs(raw: list[Any], path: Path, environ: Mapping[str, str]) -> tuple[AlertConfig, ...]:
    return tuple(
        _alert(Table(table, path, f"[[alerts]] #{index}", ALERT_KEYS), environ)
        for index, table in enumerate(raw, start=1)
    )


def _alert(table: Table, environ: Mapping[str, str]) -> AlertConfig:
    raw_url = table.take("url", str, required=True)
    url = expand_env(raw_url, config_path=table.path, where=table.place("url"), environ=environ)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Not quoted: after expansion the URL may be a secret (Slack's is).
        raise table.error(
            "is not an http(s) URL",
            key="url",
            fix='write the webhook\'s URL, e.g. url = "${SLACK_WEBHOOK_URL}" with the variable set '
            "to https://hooks.slack.com/services/...",
        )
    fmt = table.take("format", str, "json")
    if fmt not in FORMATS:
        raise table.error(
            f"{fmt!r} is not a format",
            key="format",
            fix='write format = "json" (a JSON object, see docs/alerts.md) or format = "slack" '
            '(Slack\'s incoming webhook: {"text": ...})',
        )
    events = table.take("events", list, list(EVENTS))
    unknown = [e for e in events if e not in EVENTS]
    if unknown or not events:
        problem = f"{unknown[0]!r} is not an event" if unknown else "is empty"
        raise table.error(
            problem,
            key="events",
            fix=f"list some of {', '.join(EVENTS)}, or remove the key for all of them",
        )
    remind = table.take_duration("remind_every", 0.0) or None
    return AlertConfig(
        url=Secret(url),
        format=fmt,
        events=tuple(dict.fromkeys(events)),
        headers=_headers(table, environ),
        remind_every_seconds=remind,
    )


def _headers(table: Table, environ: Mapping[str, str]) -> tuple[tuple[str, Secret], ...]:
    raw = table.take("headers", dict, {})
    headers = []
    for name, value in raw.items():
        where = table.place(f"headers.{name}")
        if not _HEADER_NAME.fullmatch(name):
            raise table.error(
                f"{name!r} is not an HTTP header name",
                key="headers",
                fix="use letters, digits and dashes, e.g. Authorization",
            )
        if not isinstance(value, str):
            raise table.error(
                f"the value of {name!r} must be a string, not {type(value).__name__}",
                key=f"headers.{name}",
                fix=f'write {name} = "Bearer ${{ALERT_TOKEN}}" (a ${{VAR}} comes from the environment)',
            )
        expanded = expand_env(value, config_path=table.path, where=where, environ=environ)
        if "\n" in expanded or "\r" in expanded:
            raise table.error(
                f"the value of {name!r} holds a line break",
                key=f"headers.{name}",
                fix="write the header's value on one line (check the environment variable too)",
            )
        headers.append((name, Secret(expanded)))
    return tuple(headers)
