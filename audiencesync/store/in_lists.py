"""IN lists padded to a few lengths, so that a statement has a few texts, not one per length.

SQLAlchemy expands ``column.in_(values)`` as the statement runs, into one placeholder per value,
so each length is a statement text of its own, and the drivers keep the texts they meet: psycopg
parses each into its parts and keeps the last 128 (of up to 50 parameters), the sqlite3 module
prepares each and keeps the last 32 per connection. A delivery pass's pages hold every number of
users from 1 to 100, so those caches churned with texts met once, and psycopg's filled with the
longer ones over a daemon's first hour (0.54 MB at 20 minutes in a PostgreSQL probe, issue 22).

Padded to the next power of two by repeating the last value (IN is the same with it twice), a
statement has at most 8 texts up to 128 values. Hibernate pads its IN lists the same way
(``in_clause_parameter_padding``), for the same caches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def padded(values: Iterable[T]) -> list[T]:
    """``values`` as a list whose length is a power of two, its last value repeated to fill it
    (an empty list stays empty: SQLAlchemy renders an empty IN as a condition of its own)."""
    items = list(values)
    if len(items) > 1:
        items.extend([items[-1]] * ((1 << (len(items) - 1).bit_length()) - len(items)))
    return items
