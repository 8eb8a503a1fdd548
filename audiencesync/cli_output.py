"""What the command line shares: its exit statuses, and how it prints tables and times."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import IO

from audiencesync import store
from audiencesync.config import Config
from audiencesync.errors import iso_time

EXIT_OK = 0
EXIT_INCOMPLETE = 1  # changes remain pending or failed, or a source failed
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_BUSY = 4  # another process holds the store's writer lease
EXIT_GLEAP_DOWN = 5  # the circuit breaker opened: Gleap failed for many users in a row
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM


def iso(value: object) -> str:
    """JSON's ``default``: datetimes as ISO 8601 with their offset (UTC when the value has none)."""
    if isinstance(value, datetime):
        return aware(value).isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def when(value: object) -> str:
    """A time for people: ISO 8601 to the second, with its offset, e.g. 2026-12-01T19:25:25+00:00."""
    return iso_time(value) if isinstance(value, datetime) else "-"


def aware(value: datetime) -> datetime:
    # The store hands out aware UTC datetimes; a naive one can only mean UTC too.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def print_table(rows: list[tuple[str, ...]], out: IO[str]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out
        )


def open_store(config: Config) -> store.Store:
    return store.Store(store.engine_for(config.store))
