"""What a delivery pass asks of the store: its pages of due changes and their fields, the
write-ahead marks, the recording of Gleap's answers, and the counts of what is owed and due.

A mixin of ``store.Store``, kept apart because it is the delivery's side of the store:
the refresh writes the snapshot and its changes (``Store.refresh``), and these read
them back a page at a time and record what Gleap answered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync import failpoints
from audiencesync.store import events as events_mod, outcomes
from audiencesync.store.carried_keys import as_carried
from audiencesync.store.in_lists import padded
from audiencesync.store.member_fields import PageFields, holds_fields, read_page_fields
from audiencesync.store.outcomes import Backoff, Outcome, PendingChange
from audiencesync.store.pending import pending_page
from audiencesync.store.schema import DELIVERABLE, audience_counts, memberships


class DeliveryQueries:
    # Provided by the store.
    engine: Engine
    clock: Callable[[], datetime]
    _read: Callable[[], contextlib.AbstractContextManager[Connection]]
    _write: Callable[[], contextlib.AbstractContextManager[Connection]]

    def pending_page(
        self,
        audience_id: int,
        audience_ids: Sequence[int],
        after: str,
        limit: int,
        *,
        now: datetime | None = None,
        passed: Mapping[int, str | None] | None = None,
    ) -> list[PendingChange]:
        """The next ``limit`` users after ``after`` with a change in ``audience_id`` due at ``now``
        (default: the clock's), with all their due changes in ``audience_ids``, ordered by user;
        ``passed``: the pass's other cursors (see ``pending.pending_page_query``).

        Keyset pagination by user id over the primary key: rows acknowledged or
        failed meanwhile never make a page repeat or skip anyone.
        """
        with self._read() as conn:
            return pending_page(conn, audience_id, audience_ids, after, limit, now or self.clock(), passed)

    def page_fields(self, user_ids: Sequence[str], order: Sequence[str]) -> PageFields:
        """These users' contact fields in the audiences ``order`` names (see ``member_fields``)."""
        with self._read() as conn:
            return read_page_fields(conn, user_ids, order)

    def holds_fields(self, audience_id: int) -> bool:
        with self._read() as conn:
            return holds_fields(conn, audience_id)

    def mark_unknown(self, changes: Sequence[PendingChange]) -> None:
        """Write-ahead for calls about to go out: until a verdict is stored, Gleap may hold either value."""
        if not changes:
            return
        with self._write() as conn:
            _set_unknown(conn, [(c.audience_id, c.user_id) for c in changes], True)

    def restore_unknown(self, changes: Sequence[PendingChange]) -> None:
        """Calls marked but never sent: give the rows back the mark they had."""
        if not changes:
            return
        with self._write() as conn:
            for mark in (True, False):
                _set_unknown(conn, [(c.audience_id, c.user_id) for c in changes if c.unknown == mark], mark)

    def record(
        self,
        results: Sequence[Outcome],
        run_ids: dict[int, int],
        *,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
        keys: Mapping[int, str] | None = None,
    ) -> None:
        """Store Gleap's answers in one transaction (see ``outcomes.write_outcomes``); ``keys``:
        the key each row's value went out under, to record it against (``carried_keys``)."""
        if not results:
            return
        with self._write() as conn:
            if keys is not None:
                results, run_ids = as_carried(conn, results, run_ids, keys)
            outcomes.write_outcomes(
                conn,
                results,
                run_ids,
                now=self.clock(),
                max_attempts=max_attempts,
                backoff=backoff or Backoff(),
            )
        failpoints.reach("after-record")

    def pending_count(self, audience_ids: Sequence[int]) -> int:
        """Changes owed to Gleap and not parked (those waiting out a backoff included).

        From the counters the triggers keep (migration 0008): a row per audience read."""
        with self._read() as conn:
            return int(conn.execute(_kept_pending(audience_ids)).scalar_one())

    def due_count(self, audience_ids: Sequence[int]) -> int:
        """Changes a delivery pass would send now (pending, not parked, past their backoff),
        and events it would send now (up to 1,000 of them).

        The pending counter less the rows still waiting out a backoff, counted in the index
        that holds only those: one statement, so both are read from one snapshot."""
        if not audience_ids:
            return 0
        outbox = events_mod.Outbox(self.engine, clock=self.clock)
        waiting = (
            sa.select(sa.func.count())
            .select_from(memberships)
            .where(
                memberships.c.audience_id.in_(audience_ids),
                DELIVERABLE,
                memberships.c.next_attempt_at.is_not(None),
                memberships.c.next_attempt_at > self.clock(),
            )
            .scalar_subquery()
        )
        with self._read() as conn:
            changes = int(
                conn.execute(sa.select(_kept_pending(audience_ids).scalar_subquery() - waiting)).scalar_one()
            )
        return changes + outbox.due_count(audience_ids)

    def event_counts(self, audience_id: int) -> tuple[int, int]:
        """(events pending, events parked) of one audience."""
        with self._read() as conn:
            return events_mod.counts_by_audience(conn, [audience_id]).get(audience_id, (0, 0))


def _kept_pending(audience_ids: Sequence[int]) -> sa.Select[Any]:
    return sa.select(sa.func.coalesce(sa.func.sum(audience_counts.c.pending), 0)).where(
        audience_counts.c.audience_id.in_(audience_ids)
    )


def _set_unknown(conn: Connection, keys: list[tuple[int, str]], mark: bool) -> None:
    """One statement per 500 rows, not one per row: each fires the counters' trigger once."""
    for i in range(0, len(keys), 500):
        conn.execute(
            sa.update(memberships)
            .where(sa.tuple_(memberships.c.audience_id, memberships.c.user_id).in_(padded(keys[i : i + 500])))
            .values(unknown=mark)
        )
