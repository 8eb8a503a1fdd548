"""The dry run's identify calls for its listing: the plain ones as the plan's rows, the rest built.

A first sync's million calls are nearly all plain (a user's audiences' booleans, no fields):
building each as a ``PlannedCall`` and then breaking it back into the listing's rows was most
of the dry run's time. Here the store reads those users' rows from the plan in blocks
(``store.plan_rows``), and only the other users (fields, traits, values, more keys than a
call holds) go through ``plan_calls``, which builds their calls as the delivery does. Both come
in user order and are merged here, so the listing's calls are in exactly the order, and with
exactly the rows, that ``plan_calls`` alone gives.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection

from audiencesync.store import plan_rows
from audiencesync.sync import plan_calls
from audiencesync.sync.reports import PlannedCall, PlannedRows

_user = itemgetter(0)


def listed_calls(
    conn: Connection,
    plan: str,
    max_keys: int,
    conflicts: Counter[str] | None = None,
    most_keys: int | None = None,
) -> Iterator[PlannedCall | PlannedRows]:
    """The plan's identify calls in user order: blocks of plain calls' rows, and the other users'
    calls (``plan_calls.planned_calls``) in between, where their users sort. ``most_keys``: at
    most how many distinct keys the plan holds, when the caller knows (``plan_rows.python_users``)."""
    python = plan_rows.python_users(conn, plan, max_keys, most_keys)
    special = plan_rows.has_users(conn, python)
    built = plan_calls.planned_calls(conn, plan, max_keys, conflicts, only=python) if special else iter(())
    blocks = plan_rows.plain_rows(conn, plan, python if special else None)
    try:
        pending = next(built, None)  # the next built call, not yet given
        last: str | None = None  # the user of the last plain row given
        for block in blocks:
            start = 0
            # Built users that sort inside the block cut it: their calls go where they sort.
            while pending is not None and pending[0] < block[-1][0]:
                user = pending[0]
                cut = bisect.bisect_left(block, user, lo=start, key=_user)
                if cut > start:
                    yield _rows(block[start:cut], last)
                    start, last = cut, block[cut - 1][0]
                while pending is not None and pending[0] == user:
                    yield PlannedCall(*pending)
                    pending = next(built, None)
            if start < len(block):
                yield _rows(block[start:], last)
                last = block[-1][0]
        while pending is not None:
            yield PlannedCall(*pending)
            pending = next(built, None)
    finally:
        # Streams left open would keep the plan's tables in use (PostgreSQL refuses to drop them).
        blocks.close()
        if hasattr(built, "close"):
            built.close()
        plan_rows.drop(conn, python)


def _rows(rows: list[tuple[str, str, Any]], last: str | None) -> PlannedRows:
    """A block of rows; its calls are its distinct users (the rows are in user order), less the
    first one's when its call began in the block before."""
    continues = rows[0][0] == last
    return PlannedRows(rows, len(dict.fromkeys(map(_user, rows))) - continues, continues)
