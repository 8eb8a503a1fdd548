"""The store's timestamps: aware UTC datetimes in and out, the same on SQLite and PostgreSQL.

Apart from ``schema.py`` (the tables) because it is the one column type of its own,
used by the tables and by the SQL that binds times (``diff``, ``plan``, ``events``...).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect

# SQLite has no timestamp type: store ISO 8601 text that carries its offset, so an
# analyst reading the file sees UTC said plainly, and string order is time order.
SQLITE_STORAGE_FORMAT = (
    "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d+00:00"
)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on both databases.

    PostgreSQL keeps them as ``timestamptz``. SQLite keeps text such as
    ``2026-12-01 19:25:25.123456+00:00``: one fixed format, so comparisons in
    SQL stay correct.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sqlite.DATETIME(storage_format=SQLITE_STORAGE_FORMAT))  # type: ignore[no-untyped-call]
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return _read_aware_time(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        # Streaming a million members with their times, the reading of the times was the
        # biggest cost. SQLite: the text is always ISO 8601, which the C fromisoformat reads
        # several times faster than SQLAlchemy's regular expression (3 s of 6). PostgreSQL:
        # the driver hands out datetimes already, and one plain function instead of
        # TypeDecorator's chain around process_result_value saved 1 s of 5.
        if dialect.name == "sqlite":
            return _read_sqlite_time
        if self.load_dialect_impl(dialect).result_processor(dialect, coltype) is None:
            return _read_aware_time
        return super().result_processor(dialect, coltype)


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is UTC:  # what the store writes, and what a session in UTC reads
        return value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _read_sqlite_time(value: str | None) -> datetime | None:
    return None if value is None else _as_utc(datetime.fromisoformat(value))


def _read_aware_time(value: datetime | None) -> datetime | None:
    return None if value is None else _as_utc(value)
