"""The store's write transactions: SQLite's write lock taken up front, and the lease's fence first.

Apart from ``schema.py`` (the tables) because every module that writes opens its
transaction here, whatever tables it writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import sqlalchemy as sa


def write_connection(engine: sa.Engine) -> sa.Connection:
    """A connection whose transactions take SQLite's write lock up front (BEGIN IMMEDIATE).

    A deferred transaction that reads and then writes fails at once with
    "database is locked" when another connection wrote meanwhile; an immediate
    one waits for the lock (busy_timeout) instead. Every other transaction is
    deferred, so readers never take the lock. No effect on PostgreSQL.
    """
    return engine.connect().execution_options(sqlite_begin="IMMEDIATE")


@contextlib.contextmanager
def fenced_write(engine: sa.Engine, fence: Callable[[sa.Connection], None] | None) -> Iterator[sa.Connection]:
    """A write transaction, its ``fence`` (the lease's check, which raises to roll it back) first."""
    with write_connection(engine) as conn, conn.begin():
        if fence is not None:
            fence(conn)
        yield conn
