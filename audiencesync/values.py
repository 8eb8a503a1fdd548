"""Property values as the store keeps them: canonical JSON text, and the trait values it is made from.

One text per value, whatever driver produced it, so that the diff compares
texts: a value that did not change never looks changed (``10`` vs ``10.0``,
``Decimal("10.50")`` vs ``10.5``, a timestamp in another zone).
"""

from __future__ import annotations

import decimal
import json
import math
from datetime import UTC, date, datetime
from typing import Any


def encode(value: Any) -> str:
    """The canonical JSON text of an already canonical value (see ``trait_value``)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def decode(text: str | None) -> Any:
    """The value a canonical JSON text holds; None for NULL."""
    return None if text is None else json.loads(text)


class UnsupportedValue(ValueError):
    """A source value that no Gleap attribute can hold (bytes, a dict, NaN...)."""

    def __init__(self, value: Any) -> None:
        super().__init__(f"a value of type {type(value).__name__} can't be a trait")
        self.type_name = type(value).__name__


def trait_value(value: Any) -> str | int | float | bool:
    """A trait's value from a source column, in the one form Gleap gets.

    - booleans stay booleans (checked first: ``bool`` is an ``int``);
    - numbers: an integral int, float or Decimal is an int (``10``, never
      ``10.0``), any other a float; NaN and infinities are refused;
    - a ``datetime`` is a timestamp: ISO 8601 in UTC with milliseconds and
      ``Z`` (a naive one is taken as UTC); a ``date`` is that day at midnight UTC;
    - strings go as they are (ISO text is not parsed: it stays text).
    Anything else raises ``UnsupportedValue``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float | decimal.Decimal):
        if not math.isfinite(value):
            raise UnsupportedValue(value)
        if value == value.to_integral_value() if isinstance(value, decimal.Decimal) else value.is_integer():
            return int(value)
        return float(value)
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, date):
        return trait_value(datetime(value.year, value.month, value.day, tzinfo=UTC))
    if isinstance(value, str):
        return value
    raise UnsupportedValue(value)
