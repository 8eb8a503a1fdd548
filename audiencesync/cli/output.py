"""What the command line shares: its exit statuses, how it shows times, opening the store, its daemon."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from audiencesync.cli.formats import machine_time
from audiencesync.config.loading import Config
from audiencesync.errors import iso_time
from audiencesync.store import store

EXIT_OK = 0
EXIT_INCOMPLETE = 1  # changes remain pending or failed, or a source failed
EXIT_CONFIG = 2
EXIT_STORE = 3
EXIT_BUSY = 4  # another process holds the store's writer lease
EXIT_GLEAP_DOWN = 5  # the circuit breaker opened: Gleap failed for many users in a row
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM


def iso(value: object) -> str:
    """JSON's ``default``: datetimes as the csv and json formats write them (ISO 8601, UTC, offset)."""
    if isinstance(value, datetime):
        return machine_time(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def when(value: object) -> str:
    """A time for people: ISO 8601 to the second, with its offset, e.g. 2026-12-01T19:25:25+00:00."""
    return iso_time(value) if isinstance(value, datetime) else "-"


def daemon_holding(engine: Engine) -> dict[str, Any] | None:
    """The lease row when a live daemon (`audiencesync run`) holds the store, else None."""
    holder = store.Store(engine).lease_holder()
    if holder is None or holder.get("role") != "daemon" or holder["expires_at"] < store.utc_now():
        return None
    return holder


def open_store(config: Config) -> store.Store:
    return store.Store(store.engine_for(config.store))
