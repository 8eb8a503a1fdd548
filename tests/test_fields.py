"""fields.py: an audience query's extra columns as Gleap's identify fields (pure, no I/O)."""

from __future__ import annotations

import decimal
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from audiencesync import fields
from audiencesync.fields import Conflict, FieldMapper, FieldStats, merge_fields


def mapped(
    row: dict[str, Any], property_keys: Sequence[str] = (), user_id: str = "u1"
) -> tuple[fields.Fields | None, FieldStats, FieldMapper]:
    columns = ["user_id", *row]
    mapper = FieldMapper(columns, property_keys)
    stats = FieldStats()
    return mapper.fields([user_id, *row.values()], user_id, stats), stats, mapper


def test_every_standard_column_maps_onto_its_gleap_field() -> None:
    out, stats, mapper = mapped(
        {
            "first_name": "Ada",
            "last_name": "Lovelace",
            "email": "ada@example.com",
            "phone": "+44 20 7946 0000",
            "plan": "pro",
            "company_name": "Analytical Engines",
            "company_id": 42,
            "lang": " EN-gb ",
            "value": decimal.Decimal("129.90"),
            "created_at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
            "last_activity": "2026-11-30T12:00:00+02:00",
            "last_page_view": "https://example.com/pricing",
        }
    )
    assert out == {
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "phone": "+44 20 7946 0000",
        "plan": "pro",
        "companyName": "Analytical Engines",
        "companyId": "42",
        "lang": "en-gb",
        "value": 129.9,
        "createdAt": "2026-01-02T03:04:05.678Z",
        "lastActivity": "2026-11-30T10:00:00.000Z",
        "lastPageView": {"page": "https://example.com/pricing", "date": "2026-11-30T10:00:00.000Z"},
    }
    assert stats.total == 0 and mapper.notices == []


@pytest.mark.parametrize(
    ("first", "last", "name"),
    [
        ("Ada", None, "Ada"),
        (None, "Lovelace", "Lovelace"),
        ("  Ada ", " Lovelace", "Ada Lovelace"),
        ("", "", None),
    ],
)
def test_name_joins_first_and_last_either_alone(
    first: str | None, last: str | None, name: str | None
) -> None:
    out, _, _ = mapped({"first_name": first, "last_name": last})
    assert (out or {}).get("name") == name


def test_last_page_view_without_a_last_activity_has_no_date() -> None:
    out, _, _ = mapped({"last_page_view": "/docs", "last_activity": None})
    assert out == {"lastPageView": {"page": "/docs"}}


def test_nulls_and_blank_text_are_left_out_and_an_empty_object_is_none() -> None:
    out, stats, mapper = mapped({"email": None, "plan": "  ", "value": None, "nickname": None})
    assert out is None
    assert stats.total == 0 and mapper.has_fields


def test_a_query_without_extra_columns_gives_none() -> None:
    mapper = FieldMapper(["user_id"])
    assert not mapper.has_fields
    assert mapper.fields(["u1"], "u1", FieldStats()) is None


def test_a_wrong_type_skips_only_that_field_and_is_counted_with_a_sample() -> None:
    stats = FieldStats()
    mapper = FieldMapper(["user_id", "email", "value", "created_at", "score"])
    a = mapper.fields(["u1", "a@x.io", "lots", "yesterday", [1, 2]], "u1", stats)
    b = mapper.fields(["u2", "b@x.io", "12", datetime(2026, 1, 1), 7], "u2", stats)
    assert a == {"email": "a@x.io"}
    assert b == {"email": "b@x.io", "createdAt": "2026-01-01T00:00:00.000Z", "score": 7}
    assert stats.skipped == {
        ("value", fields.NOT_NUMBER): 2,
        ("created_at", fields.NOT_TIMESTAMP): 1,
        ("score", fields.NOT_CUSTOM): 1,
    }
    assert stats.total == 4
    assert stats.describe() == (
        "created_at: not a timestamp x1 (e.g. user 'u1'); "
        "score: not a string, number, boolean or timestamp x1 (e.g. user 'u1'); "
        "value: not a number x2 (e.g. user 'u1')"
    )


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        (datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=-5))), "2026-03-01T17:30:00.000Z"),
        (datetime(2026, 3, 1, 12, 30, 1, 999999), "2026-03-01T12:30:01.999Z"),  # naive: UTC
        (date(2026, 3, 1), "2026-03-01T00:00:00.000Z"),
        ("2026-03-01", "2026-03-01T00:00:00.000Z"),
        ("2026-03-01 12:30:00", "2026-03-01T12:30:00.000Z"),  # SQLite's CURRENT_TIMESTAMP
        ("2026-03-01T12:30:00Z", "2026-03-01T12:30:00.000Z"),
        ("2026-03-01T12:30:00.25+01:00", "2026-03-01T11:30:00.250Z"),
        ("March 1st", None),
        (1767225600, None),  # epoch seconds or milliseconds? refused
        (True, None),
    ],
)
def test_timestamps_go_out_as_iso_8601_utc_with_z(raw: object, sent: str | None) -> None:
    assert fields.iso_utc(raw) == sent


def test_text_fields_take_ids_given_as_numbers_or_uuids_but_not_fractions() -> None:
    some = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert fields.text(42) == "42"
    assert fields.text(decimal.Decimal("42.0")) == "42"
    assert fields.text(some) == str(some)
    assert fields.text(4.2) is None
    assert fields.text(False) is None


def test_custom_attributes_take_scalars_and_timestamps_under_their_snake_case_name() -> None:
    out, stats, mapper = mapped(
        {
            "FavoriteColor": "teal",
            "score": decimal.Decimal("3.0"),
            "is_beta": True,
            "renews_on": date(2027, 1, 31),
            "blob": b"\x00",
        }
    )
    assert out == {
        "favorite_color": "teal",
        "score": 3,
        "is_beta": True,
        "renews_on": "2027-01-31T00:00:00.000Z",
    }
    assert stats.skipped == {("blob", fields.NOT_CUSTOM): 1}
    assert mapper.custom == {"favorite_color": 1, "score": 2, "is_beta": 3, "renews_on": 4, "blob": 5}


@pytest.mark.parametrize(
    ("column", "clash"),
    [
        ("Email", "Gleap's contact field 'email'"),
        ("EMAIL", "Gleap's contact field 'email'"),
        ("e_mail", "Gleap's contact field 'email'"),
        ("userId", "'userId'"),
        ("USER_ID", "'userId'"),
        ("companyName", "Gleap's contact field 'companyName'"),
        ("createdAt", "Gleap's contact field 'createdAt'"),
        ("FirstName", "the standard column 'first_name'"),
        ("tags", "Gleap's contact field 'tags'"),
        ("Unsubscribed", "Gleap's contact field 'unsubscribed'"),
        ("vip", "the audience or trait key 'vip'"),
        ("VIP", "the audience or trait key 'vip'"),
        ("high_value_users", "the audience or trait key 'highvalueusers'"),
    ],
)
def test_a_custom_attribute_never_overrides_a_standard_field_userid_or_a_property_key(
    column: str, clash: str
) -> None:
    out, _, mapper = mapped({column: "x", "email": "real@x.io"}, property_keys=["vip", "highvalueusers"])
    assert out == {"email": "real@x.io"}
    assert mapper.custom == {}
    [notice] = mapper.notices
    assert notice.startswith(f"column {column!r} is not sent") and clash in notice


def test_two_columns_with_one_custom_key_the_first_wins_and_the_second_is_noted() -> None:
    out, _, mapper = mapped({"fav_color": "teal", "FavColor": "red"})
    assert out == {"fav_color": "teal"}
    assert mapper.notices == [
        "column 'FavColor' is not sent: column 'fav_color' already gives the custom attribute 'fav_color'"
    ]


def test_a_column_with_no_usable_name_is_noted_not_sent() -> None:
    out, _, mapper = mapped({"!!!": 1})
    assert out is None and "no usable name" in mapper.notices[0]


def test_an_audience_gives_at_most_34_custom_attributes() -> None:
    row = {f"attr_{n:02d}": n for n in range(36)}
    out, _, mapper = mapped(row)
    assert out is not None and len(out) == fields.MAX_CUSTOM_COLUMNS
    assert "attr_33" in out and "attr_34" not in out
    assert len(mapper.notices) == 2 and "at most 34 custom attributes" in mapper.notices[0]


def test_merge_takes_the_first_audience_in_config_order_and_reports_conflicts() -> None:
    merged, conflicts = merge_fields(
        [
            ("gold", {"email": "a@x.io", "plan": "gold"}),
            ("trial", None),
            ("silver", {"email": "b@x.io", "plan": "gold", "lang": "de"}),
            ("bronze", {"email": "c@x.io"}),
        ]
    )
    assert merged == {"email": "a@x.io", "plan": "gold", "lang": "de"}
    assert conflicts == [Conflict("email", "gold", "silver"), Conflict("email", "gold", "bronze")]


def test_merge_tells_true_from_one() -> None:
    _, conflicts = merge_fields([("a", {"flag": True}), ("b", {"flag": 1})])
    assert conflicts == [Conflict("flag", "a", "b")]


def test_only_non_contact_fields_count_as_custom_keys() -> None:
    assert not fields.is_custom("lastPageView") and not fields.is_custom("userId")
    assert fields.is_custom("vip") and fields.is_custom("favorite_color")
