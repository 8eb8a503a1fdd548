"""What goes over the wire: Gleap's paths and limits, a recorded request, the answers, and
whether a body is one Gleap takes. Imports nothing of the stand-in's."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

AUTH_PATH: Final = "/admin/auth"
IDENTIFY_PATH: Final = "/admin/identify"
CONTACTS_PATH: Final = "/admin/contacts/"  # DELETE /admin/contacts/<userId>
TRACK_PATH: Final = "/admin/track"
# An event's date as Gleap's docs and admin SDK send it: UTC, milliseconds, Z.
EVENT_DATE: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
RATE_WINDOW_SECONDS: Final = 60.0
# Gleap's documented limits on an identify call's custom data.
MAX_CUSTOM_KEYS: Final = 35
CONTACT_FIELDS: Final = frozenset(
    {"userId", "email", "name", "phone", "companyName", "companyId", "lang", "plan", "value",
     "createdAt", "lastActivity", "lastPageView"}
)  # fmt: skip
JSON: Final = "application/json"
ROUTE_KINDS: Final = {IDENTIFY_PATH: "identify", TRACK_PATH: "track", AUTH_PATH: "auth"}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased header names
    body: Any  # parsed JSON or None
    status: int  # status answered (0 when the connection was dropped)


@dataclass(frozen=True)
class Reply:
    status: int  # 0 means: drop the connection without answering
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class Invalid:
    """Marks a body that is not valid JSON, which is not the same as a JSON ``null``."""


INVALID: Final = Invalid()


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(payload).encode(), {"Content-Type": JSON, **(headers or {})})


def text_reply(status: int, text: str, headers: dict[str, str] | None = None) -> Reply:
    extra = dict(headers or {})
    if text:
        try:
            json.loads(text)
            extra.setdefault("Content-Type", JSON)
        except ValueError:
            extra.setdefault("Content-Type", "text/plain; charset=utf-8")
    return Reply(status, text.encode(), extra)


def ok_reply(status: int, payload: Any, headers: dict[str, str]) -> Reply:
    """A success: 200 unless a script asked for another 2xx (204 has no body)."""
    if status == 204:
        return Reply(204, b"", dict(headers))
    return json_reply(status, payload, headers)


def _reject_constant(name: str) -> Any:
    # JSON.parse on Gleap's side refuses NaN/Infinity; Python would accept them silently.
    raise ValueError(f"not JSON: {name}")


def parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return INVALID


def track_problem(body: Any) -> str | None:
    """Why a track body is not what Gleap takes, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("events"), list) or not body["events"]:
        return 'Body must be {"events": [...]} with at least one event'
    for event in body["events"]:
        if not isinstance(event, dict) or set(event) != {"name", "date", "userId", "data"}:
            return "Each event has exactly name, date, userId and data"
        if not isinstance(event["name"], str) or not event["name"]:
            return "name must be a non-empty string"
        if not isinstance(event["userId"], str) or not event["userId"]:
            return "userId must be a non-empty string"
        if not isinstance(event["date"], str) or not EVENT_DATE.fullmatch(event["date"]):
            return f"date must be ISO 8601 UTC with milliseconds, got {event['date']!r}"
        data = event["data"]
        if not isinstance(data, dict) or not all(
            isinstance(v, str | int | float | bool) for v in data.values()
        ):
            return "data must be flat: strings, numbers and booleans"
    return None
