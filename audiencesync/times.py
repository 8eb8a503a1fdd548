"""TIME arguments: an instant in ISO 8601, or a span before now (90m, 12h, 3d, 2w)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from audiencesync.errors import BadTimeError

SPAN = re.compile(r"(\d+)([mhdw])")
UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_time(text: str, now: datetime) -> datetime:
    """The instant ``text`` names, aware and in UTC. Without an offset, an ISO time is UTC: the
    store's clock, whatever the host's time zone."""
    span = SPAN.fullmatch(text.strip())
    if span:
        return now - int(span[1]) * UNITS[span[2]]
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadTimeError(text) from None
    return (parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed).astimezone(UTC)
