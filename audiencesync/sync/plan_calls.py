"""The dry run's identify calls, read from its plan: built exactly as the delivery builds them.

Apart from ``plan.py`` (which writes the plan's rows: what each audience owes) because
reading them back is a concern of its own: the plan, the members' fields and what
Gleap holds are streamed in user order and walked side by side, so that a million
planned users are never held in memory, and each user's calls come from the
delivery's own ``identify_calls.user_calls``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain, groupby
from typing import Any

from sqlalchemy import Connection, text

from audiencesync import values
from audiencesync.delivery.identify_calls import user_calls
from audiencesync.store.outcomes import PendingChange


def planned_calls(
    conn: Connection,
    plan: str,
    max_keys: int,
    conflicts: Counter[str] | None = None,
    *,
    only: str | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(user id, attributes) per call, built as the delivery builds them (``identify_calls``):
    a user's planned values with their winning fields, at most ``max_keys`` custom keys a call.
    ``conflicts`` counts, per losing audience key, the fields that would go out with another
    audience's value, as the delivery counts them.

    The plan and the members' fields are both streamed in user order and walked
    side by side, so the plan is never held in memory.

    ``only``: a table of the users to build the calls of (``store.plan_rows.python_users``: the
    listing reads the others' from the plan as rows); None for every planned user.
    """
    stream = {"stream_results": True, "yield_per": 10_000}
    chosen = f" WHERE user_id IN (SELECT user_id FROM {only})" if only is not None else ""
    rows = conn.execute(
        text(
            f"SELECT user_id, key, kind, value, data, acked_data, unknown FROM {plan}{chosen} "
            "ORDER BY user_id, key"
        ),
        execution_options=stream,
    )
    has_fields = conn.execute(text(f"SELECT 1 FROM {plan}_fields LIMIT 1")).first() is not None
    # What Gleap holds of the planned users' fields, in the plan's order of ids (code points).
    collate = ' COLLATE "C"' if conn.dialect.name == "postgresql" else ""
    streams = (
        [
            conn.execute(
                text(f"SELECT user_id, key, data FROM {plan}_fields{chosen} ORDER BY user_id, rank"),
                execution_options=stream,
            ),
            conn.execute(
                text(
                    "SELECT c.user_id, c.field, c.value FROM contact_fields c WHERE c.user_id IN "
                    f"(SELECT user_id FROM {only or plan}) ORDER BY c.user_id{collate}"
                ),
                execution_options=stream,
            ),
        ]
        if has_fields
        else []
    )
    try:
        members, held_rows = (peekable(s) for s in streams) if streams else (peekable(()), peekable(()))
        yield from _walk(rows, members, held_rows, max_keys, conflicts)
    finally:
        # A stream left unread would keep the plan's tables in use (PostgreSQL refuses to drop them).
        for result in streams:
            result.close()


def _walk(
    rows: Any, members: peekable, held_rows: peekable, max_keys: int, conflicts: Counter[str] | None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The plan's rows, the members' fields and what Gleap holds, walked side by side by user."""
    # Partitions: a row at a time, SQLAlchemy fetches one by one from the driver (4 s per 1M).
    for user_id, group in groupby(chain.from_iterable(rows.partitions(10_000)), key=_first):
        planned = list(group)
        fields: list[tuple[str, Any]] = []
        while members.peek() is not None and members.peek()[0] < user_id:
            next(members)
        while members.peek() is not None and members.peek()[0] == user_id:
            _, key, data = next(members)
            fields.append((key, values.decode(data)))
        held: dict[str, str] = {}
        while held_rows.peek() is not None and held_rows.peek()[0] < user_id:
            next(held_rows)
        while held_rows.peek() is not None and held_rows.peek()[0] == user_id:
            _, name, value = next(held_rows)
            held[name] = value
        if not fields and len(planned) <= max_keys and all(_plain(row) for row in planned):
            # Audiences' booleans alone (no fields, no values): the call is the rows' keys, as
            # user_calls would make it; most of a first sync's million calls take this path.
            yield user_id, {row[1]: bool(row[3]) for row in planned}
            continue
        keys: dict[int, str] = {}
        changes: list[PendingChange] = []
        for number, (_, key, kind, value, data, _acked, unknown) in enumerate(planned):
            keys[number] = key
            changes.append(
                PendingChange(
                    number, user_id, bool(value), bool(unknown), kind=kind, value=values.decode(data)
                )
            )
        made, lost = user_calls(changes, keys, fields, held, max_keys)
        if conflicts is not None:
            conflicts.update(conflict.loser for conflict in lost)
        for call in made:
            yield user_id, call.attributes


def _first(row: Any) -> Any:
    return row[0]


def _plain(row: Any) -> bool:
    """An audience's boolean with no value now."""
    return bool(row[2] == "audience" and row[4] is None)


class peekable:
    """An iterator that can look one row ahead (None at the end)."""

    def __init__(self, rows: Iterable[Any]) -> None:
        self._rows = iter(rows)
        self._next: Any = next(self._rows, None)

    def peek(self) -> Any:
        return self._next

    def __iter__(self) -> peekable:
        return self

    def __next__(self) -> Any:
        if self._next is None:
            raise StopIteration
        row, self._next = self._next, next(self._rows, None)
        return row
