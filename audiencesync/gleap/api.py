"""Gleap's admin API as the client calls it: the paths, the identify call's query string,
the bodies of identify and track calls, and the limit on custom keys.

Apart from ``client.py`` (which sends the calls, with the limiter, the breaker and
retries) because what a call carries is a contract of its own: the client sends
exactly these, and a dry run prints them (``identify_url``, ``track_url``,
``track_event``) without a client.
"""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime
from typing import Any

import httpx

from audiencesync.config.loading import GleapConfig

IDENTIFY_PATH = "/admin/identify"
TRACK_PATH = "/admin/track"
AUTH_PATH = "/admin/auth"
# Gleap's documented limit on custom data keys in one identify call.
MAX_CUSTOM_KEYS = 35


def identify_body(user_id: str, attributes: dict[str, Any]) -> dict[str, Any]:
    # userId last so that no attribute can override it (as Gleap's own SDK does).
    return {**attributes, "userId": user_id}


def event_date(at: datetime) -> str:
    """An event's ``date``: ISO 8601 in UTC with milliseconds and ``Z``, as Gleap's docs and SDK send."""
    at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def track_event(
    user_id: str, name: str, at: datetime, data: dict[str, str | int | float | bool]
) -> dict[str, Any]:
    """One event of a track call; ``data`` stays flat, as Gleap documents custom data."""
    return {"name": name, "date": event_date(at), "userId": user_id, "data": data}


def track_url(config: GleapConfig) -> str:
    """The full track URL, as a dry run prints it."""
    return config.base_url + TRACK_PATH


def identify_params(config: GleapConfig) -> dict[str, str]:
    """The identify call's query string: by default, leave the contact's last activity alone."""
    return {"preventLastActivityUpdate": "true"} if config.prevent_last_activity_update else {}


def delete_path(config: GleapConfig, user_id: str) -> str:
    """The contact deletion path for one user: the id URL-encoded whole ("/" too), so it stays one segment."""
    return config.delete_path.replace("{user_id}", urllib.parse.quote(user_id, safe=""))


def identify_url(config: GleapConfig) -> str:
    """The full identify URL, as a dry run prints it."""
    return str(httpx.URL(config.base_url + IDENTIFY_PATH, params=identify_params(config)))
