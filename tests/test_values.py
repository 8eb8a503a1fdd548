"""values.py: the one canonical form of numbers and timestamps, shared by traits and contact fields."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from audiencesync import fields, values
from audiencesync.fields import FieldMapper, FieldStats

SAMPLES = [
    (10, 10),
    (10.0, 10),
    (Decimal("10"), 10),
    (Decimal("10.00"), 10),
    (Decimal("1E+2"), 100),
    (Decimal("10.50"), 10.5),
    (10.5, 10.5),
    (2.0**60, 2.0**60),  # past 2**53 a float is not exact: it stays a float
    (True, True),
    ("pro", "pro"),
    ("2026-12-01T10:00:00+02:00", "2026-12-01T10:00:00+02:00"),  # text stays text
    (uuid.UUID("12345678-1234-5678-1234-56781234ABCD"), "12345678-1234-5678-1234-56781234abcd"),
    (datetime(2026, 12, 1, 10, 0, tzinfo=timezone(timedelta(hours=2))), "2026-12-01T08:00:00.000Z"),
    (datetime(2026, 12, 1, 8, 0, 0, 123456), "2026-12-01T08:00:00.123Z"),  # naive: UTC
    (datetime(2026, 12, 1, 8, 0, 0, 999999, tzinfo=UTC), "2026-12-01T08:00:00.999Z"),  # cut, not rounded
    (date(2026, 12, 1), "2026-12-01T00:00:00.000Z"),
    (date(999, 1, 2), "0999-01-02T00:00:00.000Z"),  # four-digit years, as ISO 8601 has them
]

REFUSED = [b"x", {"a": 1}, [1], float("nan"), float("inf"), Decimal("NaN"), Decimal("Infinity"), object()]


@pytest.mark.parametrize(("raw", "sent"), SAMPLES)
def test_a_value_has_one_form_whatever_the_driver_gave(raw: object, sent: object) -> None:
    got = values.canonical(raw)
    assert got == sent and type(got) is type(sent)
    assert values.decode(values.encode(got)) == sent


@pytest.mark.parametrize("raw", REFUSED)
def test_values_no_attribute_can_hold_are_refused(raw: object) -> None:
    with pytest.raises(values.UnsupportedValue):
        values.canonical(raw)
    assert fields.custom_value(raw) is None


@pytest.mark.parametrize(("raw", "sent"), SAMPLES)
def test_a_trait_and_a_custom_attribute_get_the_same_value(raw: object, sent: object) -> None:
    # The same column value, as a trait's value and as an audience's custom attribute.
    stats = FieldStats()
    out = FieldMapper(["user_id", "score"]).fields(["u1", raw], "u1", stats)
    assert out == {"score": values.canonical(raw)}
    assert type(out["score"]) is type(sent) and stats.total == 0


@pytest.mark.parametrize(
    ("raw", "sent"),
    [(r, s) for r, s in SAMPLES if isinstance(r, int | float | Decimal) and not isinstance(r, bool)]
    + [(True, None), ("10", None), (float("nan"), None), (Decimal("NaN"), None)],
)
def test_the_value_field_is_the_canonical_number(raw: object, sent: object) -> None:
    got = values.number(raw)
    assert got == sent and type(got) is type(sent)
    stats = FieldStats()
    out = FieldMapper(["user_id", "value"]).fields(["u1", raw], "u1", stats)
    assert out == (None if sent is None else {"value": sent})
    assert stats.total == (1 if sent is None else 0)


@pytest.mark.parametrize(("raw", "sent"), [(r, s) for r, s in SAMPLES if isinstance(r, date)])
def test_a_timestamp_field_is_the_canonical_timestamp(raw: date, sent: str) -> None:
    assert values.timestamp(raw) == sent
    assert fields.iso_utc(raw) == sent
    assert fields.iso_utc(raw.isoformat()) == sent  # the same time given as ISO text
    stats = FieldStats()
    assert FieldMapper(["user_id", "created_at"]).fields(["u1", raw], "u1", stats) == {"createdAt": sent}


def test_a_time_that_cant_be_in_utc_is_no_timestamp() -> None:
    early = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    assert values.timestamp(early) is None
    with pytest.raises(values.UnsupportedValue):
        values.canonical(early)
