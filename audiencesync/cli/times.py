"""TIME on the command line: an ISO 8601 time, or a span before now such as ``3d``.

Every command option that takes a time (``members --at``...) reads it here,
so they all accept the same forms and refuse a bad one with the same message.
A time without an offset means UTC: the store keeps UTC, and guessing the
host's zone would make the same command answer differently on two machines.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

from audiencesync.config.tomltable import parse_duration
from audiencesync.errors import BadTimeError

TIME_HELP = (
    "ISO 8601 (2026-11-01, 2026-11-01T12:00:00Z; no offset means UTC), a span before now (90m, 3d), or now"
)


def parse_time(text: str, now: datetime, *, option: str | None = None) -> datetime:
    """The aware UTC time ``text`` means; spans count back from ``now``, and "now" is ``now``.
    A future time is allowed.

    ``option`` (e.g. "--at") only names the option in the error.
    """
    written = text.strip()
    if written.lower() == "now":
        return _utc(now)
    try:
        span = _span(written)
        if span is not None:
            return _utc(now) - span
        return _utc(datetime.fromisoformat(written))
    except (ValueError, OverflowError):
        raise BadTimeError(text, option) from None


def add_time_option(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """An option taking a TIME. It is kept as text: call ``option_time`` in the command.

    Parsing there, not as argparse's ``type``, makes a bad time the project's
    BadTimeError (exit 2, the usual message), and spans count from the
    command's own ``now``.
    """
    parser.add_argument(flag, metavar="TIME", help=f"{help}: {TIME_HELP}")


def option_time(text: str | None, flag: str, now: datetime) -> datetime | None:
    """The value of an option added with ``add_time_option``; None when it was not given."""
    return None if text is None else parse_time(text, now, option=flag)


def _span(text: str) -> timedelta | None:
    seconds = parse_duration(text)  # "90m", "12h", "3d12h", "2w"
    return None if seconds is None else timedelta(seconds=seconds)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
