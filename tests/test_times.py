"""times.parse_time: every TIME form accepted, spans from an injected now, and a bad TIME's message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from audiencesync.cli.times import parse_time
from audiencesync.errors import BadTimeError, ConfigError

NOW = datetime(2026, 12, 1, 19, 25, 25, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T12:00:00Z", datetime(2026, 11, 1, 12, tzinfo=UTC)),
        ("2026-11-01T12:00:00+02:00", datetime(2026, 11, 1, 10, tzinfo=UTC)),
        ("2026-11-01 12:00", datetime(2026, 11, 1, 12, tzinfo=UTC)),  # no offset: UTC
        (" 2026-11-01T12:00:00.5Z ", datetime(2026, 11, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2999-01-01", datetime(2999, 1, 1, tzinfo=UTC)),  # the future is the caller's call
        ("30s", NOW - timedelta(seconds=30)),
        ("90m", NOW - timedelta(minutes=90)),
        ("12h", NOW - timedelta(hours=12)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("3d", NOW - timedelta(days=3)),
        ("2w", NOW - timedelta(weeks=2)),
        ("1w2d12h", NOW - timedelta(days=9, hours=12)),
        ("now", NOW),
        (" NOW ", NOW),
    ],
)
def test_every_accepted_form(text: str, expected: datetime) -> None:
    parsed = parse_time(text, NOW)
    assert parsed == expected and parsed.tzinfo is UTC


def test_a_span_counts_back_from_the_now_given() -> None:
    assert parse_time("3d", datetime(2026, 1, 4, tzinfo=UTC)) == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_time("1h", datetime(2026, 1, 4, 1)) == datetime(2026, 1, 4, tzinfo=UTC)  # naive now: UTC


@pytest.mark.parametrize(
    "text", ["2026-13-01", "2026-11-01T25:00", "yesterday", "3x", "-3d", "3 d", "", "d", "99999999999w"]
)
def test_a_bad_time_says_which_option_and_how_to_write_one(text: str) -> None:
    with pytest.raises(BadTimeError) as caught:
        parse_time(text, NOW, option="--at")
    assert isinstance(caught.value, ConfigError)  # exit status 2
    assert str(caught.value) == (
        f"--at {text!r} is not a time. Fix: write ISO 8601 (2026-11-01, 2026-11-01T12:00:00Z; "
        "no offset means UTC), a span before now (90m, 12h, 3d, 2w), or now"
    )
