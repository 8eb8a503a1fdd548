"""Contact fields: an audience query's extra columns, turned into the fields of Gleap's identify body.

Pure: no I/O. A ``FieldMapper`` is made once per source read from the column
names the driver gives, and maps each row to the user's fields object (the
JSON-native dict stored as the membership's ``value``). ``merge_fields``
combines the objects of a user's audiences in config order.

Decisions (the README's Configuration reference says the same):

- Column names are taken as the driver gives them (PostgreSQL folds unquoted
  names to lowercase, SQLite keeps an alias as written). A standard column
  matches only its exact snake_case name; any other column is a custom
  attribute under the snake_case of its name.
- A custom attribute never overrides ``userId``, a Gleap contact field, a
  standard column, or an audience or trait key: names are compared with case
  and underscores folded away (``Email``, ``e_mail``, ``USER_ID``, ``userId``
  all collide). Such a column is not sent, and the mapper says so once.
- NULL is "no value": the field is left out, and Gleap keeps what it has. A
  blank string in a standard text field counts as NULL.
- A value of the wrong type skips that field for that user, with a counted
  warning; the rest of the row, and the membership, go on.
- Timestamps go out as ISO 8601 UTC with milliseconds and ``Z``; a naive
  time or a date means UTC, as everywhere in audiencesync.
- Numbers never flap between cycles or drivers: an integral value becomes an
  int (10.0, Decimal("10.00") -> 10), any other a float. Numbers and
  timestamps are canonicalised by ``values`` (``number``, ``timestamp``,
  ``canonical``), as traits' values are.
"""

from __future__ import annotations

import decimal
import re
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from audiencesync import values
from audiencesync.keys import RESERVED_KEYS, key_for_name

ID_COLUMN = "user_id"

# Gleap's other contact fields (GLEAP_API.md): a custom attribute must not clobber them either.
OTHER_CONTACT_FIELDS = frozenset(
    {"blocked", "unsubscribed", "avatar", "sla", "tags", "location", "sessions", "organisation", "project"}
)

# The standard columns and the Gleap field each one feeds.
STANDARD_COLUMNS: Mapping[str, str] = {
    "first_name": "name",
    "last_name": "name",
    "email": "email",
    "phone": "phone",
    "plan": "plan",
    "company_name": "companyName",
    "company_id": "companyId",
    "lang": "lang",
    "value": "value",
    "created_at": "createdAt",
    "last_activity": "lastActivity",
    "last_page_view": "lastPageView",
}
_TEXT = ("email", "phone", "plan", "company_name", "company_id")
_TIMES = ("created_at", "last_activity")

# Gleap takes at most 35 custom keys a call; one of them is the audience's own
# boolean, so that one audience's row always fits one call.
MAX_CUSTOM_COLUMNS = 34

_VALID_KEY = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")

NOT_TEXT = "not text"
NOT_NUMBER = "not a number"
NOT_TIMESTAMP = "not a timestamp"
NOT_CUSTOM = "not a string, number, boolean or timestamp"

JSONScalar = values.JSONScalar
Fields = dict[str, Any]


def fold(name: str) -> str:
    """A name as Gleap and people might confuse it: no case, no underscores or punctuation."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def reserved_names(property_keys: Collection[str] = ()) -> frozenset[str]:
    """The folded names no custom attribute may take."""
    names = set(RESERVED_KEYS) | OTHER_CONTACT_FIELDS | set(STANDARD_COLUMNS) | {ID_COLUMN}
    return frozenset(fold(n) for n in names | set(property_keys))


# --- values ---------------------------------------------------------------------


def iso_utc(value: object) -> str | None:
    """A timestamp as ISO 8601 UTC with milliseconds and Z (``values.timestamp``), or None when it is not one.

    Takes datetimes (naive means UTC), dates (midnight UTC) and ISO 8601 text
    (``2026-11-01``, ``2026-11-01 12:00:00``, ``...T12:00:00+02:00``, ``...Z``).
    Numbers are refused: epoch seconds and milliseconds can't be told apart.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    return values.timestamp(value)


def text(value: object) -> str | None:
    """A standard text field: strings, and ids given as numbers or UUIDs (sent as Gleap's ids are)."""
    if isinstance(value, str):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool):
        n = values.number(value)
        return str(n) if isinstance(n, int) else None
    return None


def custom_value(value: object) -> JSONScalar | None:
    """A custom attribute's value: a string, number or boolean (timestamps as ISO text), as a
    trait's value is (``values.canonical``); None when no attribute can hold it."""
    try:
        return values.canonical(value)
    except values.UnsupportedValue:
        return None


# --- what a read saw ---------------------------------------------------------------


@dataclass
class FieldStats:
    """Skipped fields by (column, reason), with a user id for each, across one source read."""

    skipped: Counter[tuple[str, str]] = field(default_factory=Counter)
    samples: dict[tuple[str, str], str] = field(default_factory=dict)

    def skip(self, column: str, reason: str, user_id: str) -> None:
        self.skipped[(column, reason)] += 1
        self.samples.setdefault((column, reason), user_id)

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def describe(self) -> str:
        """One line for the summary: ``value: not a number x2 (e.g. user 'u7'); ...``."""
        return "; ".join(
            f"{column}: {reason} x{count} (e.g. user {self.samples[(column, reason)]!r})"
            for (column, reason), count in sorted(self.skipped.items())
        )


# --- columns to fields ---------------------------------------------------------------


class FieldMapper:
    """How one query's columns become Gleap fields; made once per read, from the driver's column names.

    ``property_keys`` are the configured audience and trait keys, which a
    custom attribute may not take. ``notices`` says, once, which columns are
    not sent and why.
    """

    def __init__(self, columns: Sequence[str], property_keys: Collection[str] = ()) -> None:
        self.standard: dict[str, int] = {}
        self.custom: dict[str, int] = {}  # attribute key -> column index
        self.notices: list[str] = []
        reserved = reserved_names(property_keys)
        folded_keys = {fold(k): k for k in property_keys}
        taken: dict[str, str] = {}  # folded custom key -> the column that took it
        for index, column in enumerate(columns):
            if column == ID_COLUMN:
                continue
            if column in STANDARD_COLUMNS:
                if column in self.standard:
                    self.notices.append(f"column {column!r} appears twice; only the first is sent")
                else:
                    self.standard[column] = index
                continue
            key = key_for_name(column)
            folded = fold(key)
            if not _VALID_KEY.fullmatch(key):
                self.notices.append(
                    f"column {column!r} is not sent: it has no usable name. "
                    "Fix: alias it, e.g. AS my_attribute"
                )
            elif folded in reserved:
                self.notices.append(
                    f"column {column!r} is not sent: as a custom attribute it would override "
                    f"{_clash(folded, folded_keys)}. Fix: alias it to another name, or to the "
                    "standard column's exact name if that is what it holds"
                )
            elif folded in taken:
                self.notices.append(
                    f"column {column!r} is not sent: column {taken[folded]!r} already gives the "
                    f"custom attribute {key!r}"
                )
            elif len(self.custom) >= MAX_CUSTOM_COLUMNS:
                self.notices.append(
                    f"column {column!r} is not sent: Gleap takes at most 35 custom keys a call, one "
                    f"of them the audience's own, so an audience gives at most {MAX_CUSTOM_COLUMNS} "
                    "custom attributes"
                )
            else:
                taken[folded] = column
                self.custom[key] = index

    @property
    def has_fields(self) -> bool:
        """Whether the query gives any field at all (else every row's value is NULL)."""
        return bool(self.standard or self.custom)

    def fields(self, row: Sequence[Any], user_id: str, stats: FieldStats) -> Fields | None:
        """The user's Gleap fields from one row, or None when there are none."""
        out: Fields = {}
        raw = {column: row[index] for column, index in self.standard.items()}

        def take(column: str, convert: Any, reason: str) -> Any:
            value = raw.get(column)
            if value is None:
                return None
            converted = convert(value)
            if converted is None:
                stats.skip(column, reason, user_id)
            return converted

        name = " ".join(
            part.strip() for part in (take(c, text, NOT_TEXT) for c in ("first_name", "last_name")) if part
        ).strip()
        if name:
            out["name"] = name
        for column in _TEXT:
            value = take(column, text, NOT_TEXT)
            if value is not None and value.strip():
                out[STANDARD_COLUMNS[column]] = value
        lang = take("lang", text, NOT_TEXT)
        if lang is not None and lang.strip():
            out["lang"] = lang.strip().lower()
        value = take("value", values.number, NOT_NUMBER)
        if value is not None:
            out["value"] = value
        for column in _TIMES:
            moment = take(column, iso_utc, NOT_TIMESTAMP)
            if moment is not None:
                out[STANDARD_COLUMNS[column]] = moment
        page = take("last_page_view", text, NOT_TEXT)
        if page is not None and page.strip():
            # Gleap's shape; the date is the last activity, when the row gives one.
            view: Fields = {"page": page}
            if "lastActivity" in out:
                view["date"] = out["lastActivity"]
            out["lastPageView"] = view
        for key, index in self.custom.items():
            if row[index] is None:
                continue
            scalar = custom_value(row[index])
            if scalar is None:
                stats.skip(key, NOT_CUSTOM, user_id)
            else:
                out[key] = scalar
        return out or None


class FieldReader:
    """What ``Sources.read_values`` needs for an audience: each row's fields as canonical JSON.

    One per source read. After the read, ``stats`` holds the skipped fields and
    ``notices`` the columns not sent (said once per read, not once per row).
    """

    def __init__(self, property_keys: Collection[str] = ()) -> None:
        self.property_keys = property_keys
        self.stats = FieldStats()
        self.notices: list[str] = []
        self.has_fields = False  # known once the query's columns are

    def __call__(self, columns: list[str]) -> Callable[[Sequence[Any]], str | None]:
        mapper = FieldMapper(columns, self.property_keys)
        self.notices = list(mapper.notices)
        self.has_fields = mapper.has_fields
        if not mapper.has_fields:
            return values.no_value
        id_index = columns.index(ID_COLUMN)

        def value_of(row: Sequence[Any]) -> str | None:
            found = mapper.fields(row, str(row[id_index]), self.stats)
            return None if found is None else values.encode(found)

        return value_of


def _clash(folded: str, property_keys: Mapping[str, str]) -> str:
    if folded in property_keys:
        return f"the audience or trait key {property_keys[folded]!r}"
    if folded == fold(ID_COLUMN):
        return "'userId'"
    for name in sorted(RESERVED_KEYS | OTHER_CONTACT_FIELDS):
        if fold(name) == folded:
            return f"Gleap's contact field {name!r}"
    standard = next(c for c in STANDARD_COLUMNS if fold(c) == folded)
    return f"the standard column {standard!r} (Gleap's {STANDARD_COLUMNS[standard]!r})"


# --- several audiences, one user -------------------------------------------------------


@dataclass(frozen=True)
class Conflict:
    """Two audiences gave one user different values for a field; ``winner`` comes first in the config."""

    field: str
    winner: str
    loser: str


def merge_fields(objects: Iterable[tuple[str, Mapping[str, Any] | None]]) -> tuple[Fields, list[Conflict]]:
    """One user's fields from their audiences' objects, given in config order: the first to give a field wins.

    A later audience that gives the same field a different value is a conflict;
    the same value is not.
    """
    merged: Fields = {}
    winners: dict[str, str] = {}
    conflicts: list[Conflict] = []
    for audience, fields in objects:
        for name, value in (fields or {}).items():
            if name not in merged:
                merged[name], winners[name] = value, audience
            elif not _same(merged[name], value):
                conflicts.append(Conflict(name, winners[name], audience))
    return merged, conflicts


def _same(a: object, b: object) -> bool:
    # Strict: True == 1 in Python, but Gleap would be told different things.
    return type(a) is type(b) and a == b


def is_custom(name: str) -> bool:
    """Whether a key of the identify body counts towards Gleap's 35 custom keys."""
    return name not in RESERVED_KEYS
