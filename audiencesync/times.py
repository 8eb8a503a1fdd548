"""TIME on the command line: an ISO 8601 time, or a span before now such as ``3d``.

A stand-in with the interface of the `formats` branch's module, until that
branch is merged (its version replaces this one). A time without an offset
means UTC, as the store keeps UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from audiencesync.errors import BadTimeError
from audiencesync.tomltable import parse_duration


def parse_time(text: str, now: datetime, *, option: str | None = None) -> datetime:
    """The aware UTC time ``text`` means; spans count back from ``now``."""
    written = text.strip()
    span = parse_duration(written)
    if span is not None:
        return now.astimezone(UTC) - timedelta(seconds=span)
    try:
        value = datetime.fromisoformat(written)
    except ValueError:
        raise BadTimeError(text, option) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
