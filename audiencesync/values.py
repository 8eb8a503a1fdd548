"""Property values as the store keeps them: canonical JSON text, and the one canonical form of a source value.

One text per value, whatever driver produced it, so that the diff compares
texts: a value that did not change never looks changed (``10`` vs ``10.0``,
``Decimal("10.50")`` vs ``10.5``, a timestamp in another zone). Traits and
contact fields both go through ``canonical`` (and its parts ``number`` and
``timestamp``), so a number or a time goes out the same way whichever of
them carries it.
"""

from __future__ import annotations

import decimal
import json
import math
import uuid
from datetime import UTC, date, datetime
from typing import Any

JSONScalar = str | int | float | bool

# Beyond 2**53 a float no longer holds every integer: it stays a float rather than
# turning into digits it never had.
_EXACT_FLOAT = 2**53


def encode(value: Any) -> str:
    """The canonical JSON text of an already canonical value (see ``canonical``)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def no_value(row: Any) -> None:
    """A source row's value when its query has no value columns. Readers (``sources``) recognise
    this function and pair ids with None a batch at a time, not a call per row."""
    return None


def shown(value: Any) -> str:
    """A property value as every surface shows it to a person: as JSON writes it (``608.44``,
    ``null``, ``true``, ``"gold"``), never as Python's ``True`` or ``None``. The one formatter
    of the web pages, `failures` and the CLI tables for a value Gleap holds or is sent."""
    return encode(value)


def shown_text(text: str | None) -> str:
    """``shown`` of a value the store keeps as canonical JSON text: the text itself; NULL is ``null``."""
    return "null" if text is None else text


def decode(text: str | None) -> Any:
    """The value a canonical JSON text holds; None for NULL."""
    return None if text is None else json.loads(text)


class UnsupportedValue(ValueError):
    """A source value that no Gleap attribute can hold (bytes, a dict, NaN...)."""

    def __init__(self, value: Any) -> None:
        super().__init__(f"a value of type {type(value).__name__} can't be a trait")
        self.type_name = type(value).__name__


def number(value: object) -> int | float | None:
    """A JSON number that is the same every cycle, whatever the driver's type; None when not a number.

    An integral int, float or Decimal is an int (``10``, never ``10.0``), any
    other a float; NaN, infinities and booleans are not numbers.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() and abs(value) < _EXACT_FLOAT else value
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    return None


def timestamp(value: object) -> str | None:
    """A date-time as ISO 8601 UTC with milliseconds and ``Z``; None when it is not one.

    A naive datetime is taken as UTC, a ``date`` is that day at midnight UTC.
    Text is not parsed here (a trait's ISO text stays text; contact fields parse
    theirs first).
    """
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    else:
        return None
    try:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (OverflowError, ValueError):  # a year-1 time with a positive offset
        return None
    # isoformat, not strftime: %Y drops the leading zeros of years before 1000.
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def canonical(value: Any) -> JSONScalar:
    """A source value in the one form Gleap gets: a trait's value, or a custom attribute's.

    - booleans stay booleans (checked first: ``bool`` is an ``int``);
    - numbers as ``number`` gives them;
    - a ``datetime`` or ``date`` as ``timestamp`` gives it;
    - strings go as they are (ISO text is not parsed: it stays text), UUIDs
      as their lowercase hyphenated text (as user ids are).
    Anything else (bytes, a dict, NaN...) raises ``UnsupportedValue``.
    """
    if isinstance(value, bool | str):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    found = number(value) if isinstance(value, int | float | decimal.Decimal) else timestamp(value)
    if found is None:
        raise UnsupportedValue(value)
    return found
