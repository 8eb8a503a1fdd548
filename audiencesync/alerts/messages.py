"""One alert, and its two shapes on the wire: audiencesync's JSON object and Slack's ``{"text": ...}``.

The JSON object is a documented, stable contract (README, "Alerts"): add keys,
never rename or drop one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from audiencesync.config.secret import scrub
from audiencesync.errors import iso_time, with_fix

FIRING, RESOLVED, NOTICE = "firing", "resolved", "notice"
_SLACK_MARK = {FIRING: ":rotating_light:", RESOLVED: ":white_check_mark:", NOTICE: ":information_source:"}


@dataclass(frozen=True)
class Alert:
    event: str  # one of config_alerts.EVENTS, or "test"
    state: str  # firing | resolved | notice (a one-time event with no end: a takeover, a test)
    subject: str  # what the condition is about: an audience key, "gleap", "delivery", a host
    summary: str  # one paragraph a person can act on, the fix included
    time: datetime
    host: str
    audience: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    fix: str | None = None  # the command or change that fixes it, when there is one
    opened_at: datetime | None = None  # when the condition started
    reminder: bool = False  # a repeat of a condition still open (remind_every)

    def as_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "state": self.state,
            "reminder": self.reminder,
            "audience": self.audience,
            "subject": self.subject,
            "summary": self.summary,
            "fix": self.fix,
            "details": dict(self.details),
            "opened_at": iso_time(self.opened_at) if self.opened_at else None,
            "time": iso_time(self.time),
            "host": self.host,
        }

    def slack_text(self) -> str:
        mark = ":bell:" if self.reminder else _SLACK_MARK.get(self.state, "")
        text = f"{mark} audiencesync on {self.host}: {self.summary}"
        if self.state == FIRING and self.fix and self.fix not in self.summary:
            text = with_fix(text, self.fix)
        if self.opened_at is not None and (self.reminder or self.state == RESOLVED):
            text += f" (since {iso_time(self.opened_at)})"
        return text


def render(alert: Alert, fmt: str, secrets: Sequence[str] = ()) -> bytes:
    """The request body for a webhook of this format, without the ``secrets`` (the Gleap token),
    whatever an error quoted: every string value is scrubbed of their whole occurrences before it
    is encoded (secret.py), so the keys, the timestamps and the JSON itself stay as they are."""
    body = {"text": alert.slack_text()} if fmt == "slack" else alert.as_json()
    return json.dumps(_scrubbed(body, secrets), ensure_ascii=False).encode()


def _scrubbed(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, Mapping):
        return {key: _scrubbed(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item, secrets) for item in value]
    return value
