"""The outbox of Audience Entered / Exited events: made with the refresh, owed until Gleap's 2xx.

A refresh of an audience with events on turns each ``entered``/``left``
membership change into an event row, in the same transaction (so a crash can
neither lose nor duplicate one). An event is due once the identify call that
set its membership is done: no pending memberships row is left for its
audience and user (acknowledged, or gone). A user's events in one audience go
out in the order they were seen: one waits while an earlier event of the same
user and audience is owed and not due (backing off, or parked). A parked event
parks the later ones of its user and audience with it (``HELD_BEHIND_PARKED``),
those made afterwards included, so ``failures`` lists them and ``retry``, whose
filters always cover a whole user and audience, releases them together, in
order. Nothing of another audience holds an event back, so a paused, removed
or parked audience never stops the others.
The delivery state
follows the memberships' rules: a write-ahead unknown mark, acknowledged only
by a 2xx, rejections counted towards ``max_attempts`` and then parked, and a
per-event backoff after every failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync.backoff import doubling
from audiencesync.store.in_lists import padded
from audiencesync.store.schema import audience_counts, audiences, events, memberships, sync_runs
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.store.writes import fenced_write

Clock = Callable[[], datetime]

# The last_error of an event parked because an earlier one of its user and audience is.
HELD_BEHIND_PARKED = "held: an earlier event of this user in this audience is parked"

# Parked, not yet acknowledged: what holds back the later events of its user and audience.
_PARKED_OWED = "parked_at IS NOT NULL AND acked_at IS NULL"


@dataclass(frozen=True)
class EventNames:
    """What the events of one audience are called (``[gleap] entered_event``/``exited_event``)."""

    entered: str
    exited: str


@dataclass(frozen=True)
class DueEvent:
    id: int
    audience_id: int
    audience_key: str
    user_id: str
    name: str
    audience_name: str
    at: datetime
    unknown: bool = False  # an earlier request's outcome is unknown (as read)
    failures: int = 0


@dataclass(frozen=True)
class EventOutcome:
    """Gleap's final answer about some events: a 2xx, a verdict, or none."""

    events: tuple[DueEvent, ...]
    status: int  # 0: no answer
    error: str | None = None
    permanent: bool = False  # a verdict: not applied
    # A request got no verdict, and may have been applied. None: as the final answer says.
    maybe_applied: bool | None = None
    sends: int = 1  # requests that carried these events (retries and split batches included)
    sent_at: datetime | None = None  # when the last of them went out
    retries: int = 0
    rate_limited: int = 0

    @property
    def acknowledged(self) -> bool:
        return 200 <= self.status < 300

    @property
    def unknown(self) -> bool:
        """Gleap may have these events: a verdict on a retry says nothing of a request before it."""
        may_have_applied = not self.permanent if self.maybe_applied is None else self.maybe_applied
        return not self.acknowledged and may_have_applied


def create_from_changes(conn: Connection, *, audience_id: int, run_id: int, names: EventNames) -> int:
    """One event per entry and exit this run recorded for the audience; in the caller's transaction.

    Read from the run's membership changes, so that the events are exactly the
    changes (any other kind of change is not an event). A new event of a user
    with a parked event in the audience is parked behind it, at once.
    """
    made = conn.execute(
        sa.text(
            "INSERT INTO events (audience_id, user_id, run_id, change, name, audience_name, at) "
            "SELECT c.audience_id, c.user_id, c.run_id, c.change, "
            "CASE WHEN c.change = 'entered' THEN :en ELSE :ex END, a.name, c.at "
            "FROM membership_changes c JOIN audiences a ON a.id = c.audience_id "
            "WHERE c.run_id = :r AND c.audience_id = :a AND c.change IN ('entered', 'left') "
            # By user: the diff's hash joins record a run's changes in no particular order.
            "ORDER BY c.user_id, c.id"
        ),
        {"a": audience_id, "r": run_id, "en": names.entered, "ex": names.exited},
    ).rowcount
    # The usual case, no parked event in the audience, costs one probe of ix_events_parked.
    any_parked = f"SELECT 1 FROM events WHERE audience_id = :a AND {_PARKED_OWED}"
    if made and conn.execute(sa.text(any_parked + " LIMIT 1"), {"a": audience_id}).first() is not None:
        conn.execute(
            sa.text(
                "UPDATE events SET parked_at = at, last_error = :why "
                "WHERE run_id = :r AND audience_id = :a AND acked_at IS NULL AND parked_at IS NULL "
                f"AND user_id IN (SELECT user_id FROM events WHERE audience_id = :a AND {_PARKED_OWED})"
            ),
            {"a": audience_id, "r": run_id, "why": HELD_BEHIND_PARKED},
        )
    return made


def park_behind(conn: Connection, streams: Iterable[tuple[int, str]], now: datetime) -> None:
    """Park the owed events that come after a parked one of their (audience id, user id)."""
    conn.execute(
        sa.text(
            "UPDATE events SET parked_at = :t, last_error = :why "
            "WHERE audience_id = :a AND user_id = :u AND acked_at IS NULL AND parked_at IS NULL "
            "AND id > (SELECT min(p.id) FROM events p "
            "WHERE p.audience_id = :a AND p.user_id = :u AND p.parked_at IS NOT NULL AND p.acked_at IS NULL)"
        ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
        [{"a": a, "u": u, "t": now, "why": HELD_BEHIND_PARKED} for a, u in sorted(set(streams))],
    )


def _unsent(e: sa.FromClause) -> sa.ColumnElement[bool]:
    return sa.and_(e.c.acked_at.is_(None), e.c.parked_at.is_(None))


def _ready(e: sa.FromClause, now: datetime) -> sa.ColumnElement[bool]:
    """Owed, past its backoff, and its membership's identify is done."""
    identify_owed = (
        sa.select(sa.literal(1))
        .where(
            memberships.c.audience_id == e.c.audience_id,
            memberships.c.user_id == e.c.user_id,
            memberships.c.pending == sa.true(),
        )
        .exists()
    )
    return sa.and_(
        _unsent(e),
        sa.or_(e.c.next_attempt_at.is_(None), e.c.next_attempt_at <= now),
        ~identify_owed,
    )


def held_back(e: sa.FromClause, now: datetime) -> sa.Exists:
    """An earlier event of the same user and audience is owed and can't go now: it is backing
    off, or parked. Its identify is the same as ``e``'s, so that needs no check here."""
    earlier = events.alias("p")
    return (
        sa.select(sa.literal(1))
        .where(
            earlier.c.user_id == e.c.user_id,
            earlier.c.audience_id == e.c.audience_id,
            earlier.c.id < e.c.id,
            earlier.c.acked_at.is_(None),
            sa.or_(earlier.c.parked_at.is_not(None), earlier.c.next_attempt_at > now),
        )
        .exists()
    )


def due_query(audience_ids: Sequence[int], after: int, limit: int, now: datetime) -> sa.Select[Any]:
    """The next ``limit`` due events after id ``after``, in id (so time) order."""
    e = events.alias("e")
    return (
        sa.select(
            e.c.id,
            e.c.audience_id,
            audiences.c.key,
            e.c.user_id,
            e.c.name,
            e.c.audience_name,
            e.c.at,
            e.c.unknown,
            e.c.failures,
        )
        .join(audiences, audiences.c.id == e.c.audience_id)
        .where(e.c.id > after, e.c.audience_id.in_(audience_ids), _ready(e, now), ~held_back(e, now))
        .order_by(e.c.id)
        .limit(limit)
    )


def deletable(before: datetime) -> sa.ColumnElement[bool]:
    """What a prune may delete: events Gleap acknowledged before ``before``. Unsent ones stay."""
    return sa.and_(events.c.acked_at.is_not(None), events.c.acked_at < before)


def scanned_counts(audience_ids: Sequence[int] | None = None) -> sa.Select[Any]:
    """Per audience, the events pending and parked read from every row: what the counters of
    ``audience_counts`` must always equal (the tests assert it; the benchmark's baseline)."""
    query = sa.select(
        events.c.audience_id,
        sa.func.count().filter(_unsent(events)).label("pending"),
        sa.func.count().filter(events.c.parked_at.is_not(None)).label("parked"),
    ).where(sa.or_(_unsent(events), events.c.parked_at.is_not(None)))
    if audience_ids is not None:
        query = query.where(events.c.audience_id.in_(audience_ids))
    return query.group_by(events.c.audience_id)


def counts_by_audience(
    conn: Connection, audience_ids: Sequence[int] | None = None, *, scan: bool = False
) -> dict[int, tuple[int, int]]:
    """audience id -> (events pending, events parked), from the counters the triggers keep
    (migration 0008): a row per audience, however long the history. ``scan``: count the rows."""
    c = audience_counts.c
    query = (
        scanned_counts(audience_ids)
        if scan
        else sa.select(c.audience_id, c.events_pending.label("pending"), c.events_parked.label("parked"))
    )
    if audience_ids is not None and not scan:
        query = query.where(c.audience_id.in_(audience_ids))
    return {r.audience_id: (int(r.pending), int(r.parked)) for r in conn.execute(query)}


def requeue(conn: Connection, audience_key: str | None, user_id: str | None) -> int:
    """Un-park events (`audiencesync retry`), with a fresh attempt budget; in the caller's transaction."""
    query = sa.update(events).where(events.c.parked_at.is_not(None), events.c.acked_at.is_(None))
    if audience_key is not None:
        ids = sa.select(audiences.c.id).where(audiences.c.key == audience_key).scalar_subquery()
        query = query.where(events.c.audience_id == ids)
    if user_id is not None:
        query = query.where(events.c.user_id == user_id)
    return conn.execute(query.values(parked_at=None, attempts=0, failures=0, next_attempt_at=None)).rowcount


class Outbox:
    """The events' queries for the delivery pass. Seams: the engine, a clock, the lease's fence."""

    def __init__(
        self, engine: Engine, *, clock: Clock, fence: Callable[[Connection], None] | None = None
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.fence = fence

    def _write(self) -> contextlib.AbstractContextManager[Connection]:
        return fenced_write(self.engine, self.fence)

    def due(self, audience_ids: Sequence[int], after: int, limit: int) -> list[DueEvent]:
        with self.engine.connect() as conn, conn.begin():
            rows = conn.execute(due_query(audience_ids, after, limit, self.clock()))
            return [DueEvent(*row) for row in rows]

    def due_count(self, audience_ids: Sequence[int], cap: int = 1000) -> int:
        """Events a delivery pass would send now, counted up to ``cap``: the callers ask whether
        there is work, and counting every due event of a big first sync would read them all."""
        with self.engine.connect() as conn, conn.begin():
            unsent = sa.select(events.c.id).where(_unsent(events), events.c.audience_id.in_(audience_ids))
            if conn.execute(unsent.limit(1)).first() is None:
                return 0  # the usual case, from the index of what is owed alone
            query = due_query(audience_ids, 0, cap, self.clock()).subquery()
            return int(conn.execute(sa.select(sa.func.count()).select_from(query)).scalar_one())

    def counts(self, audience_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
        with self.engine.connect() as conn, conn.begin():
            return counts_by_audience(conn, audience_ids)

    def mark_unknown(self, batch: Sequence[DueEvent]) -> None:
        """Write-ahead, before a request carrying them goes out: Gleap may have them from then on."""
        with self._write() as conn:
            marked = events.c.id.in_(padded(e.id for e in batch))
            conn.execute(sa.update(events).where(marked).values(unknown=True))

    def restore_unknown(self, batch: Sequence[DueEvent]) -> None:
        """Marked but certainly never sent: the mark they had before."""
        if not batch:
            return
        with self._write() as conn:
            conn.execute(
                sa.text("UPDATE events SET unknown = :k WHERE id = :i"),
                [{"i": e.id, "k": e.unknown} for e in batch],
            )

    def record(
        self,
        outcome: EventOutcome,
        run_ids: Callable[[int], int],
        *,
        max_attempts: int,
        backoff: tuple[float, float],
    ) -> None:
        """Store one answer about these events, and count it in their audiences' runs."""
        with self._write() as conn:
            write_outcome(
                conn, outcome, run_ids, now=self.clock(), max_attempts=max_attempts, backoff=backoff
            )


def write_outcome(
    conn: Connection,
    outcome: EventOutcome,
    run_ids: Callable[[int], int],
    *,
    now: datetime,
    max_attempts: int,
    backoff: tuple[float, float],
) -> None:
    sent_at = outcome.sent_at or now
    common = {"s": outcome.status, "n": outcome.sends, "sent": sent_at, "t": now}
    timed = (
        sa.bindparam("t", type_=UtcDateTime),
        sa.bindparam("sent", type_=UtcDateTime),
    )
    if outcome.acknowledged:
        conn.execute(
            sa.text(
                "UPDATE events SET acked_at = :t, unknown = false, last_status = :s, last_error = NULL, "
                "sends = sends + :n, sent_at = :sent, next_attempt_at = NULL WHERE id = :i"
            ).bindparams(*timed),
            [common | {"i": e.id} for e in outcome.events],
        )
    else:
        conn.execute(
            sa.text(
                "UPDATE events SET unknown = :k, last_status = :s, last_error = :e, sends = sends + :n, "
                "sent_at = :sent, failures = failures + 1, next_attempt_at = :next, "
                "attempts = CASE WHEN :verdict THEN attempts + 1 ELSE attempts END, "
                "parked_at = CASE WHEN :verdict AND attempts + 1 >= :max THEN :t ELSE parked_at END "
                "WHERE id = :i"
            ).bindparams(
                *timed,
                sa.bindparam("next", type_=UtcDateTime),
                sa.bindparam("verdict", type_=sa.Boolean),
                sa.bindparam("k", type_=sa.Boolean),
            ),
            [
                common
                | {
                    "i": e.id,
                    "k": e.unknown or outcome.unknown,
                    "e": outcome.error,
                    "verdict": outcome.permanent,
                    "max": max_attempts,
                    "next": now + timedelta(seconds=doubling(*backoff, e.failures + 1)),
                }
                for e in outcome.events
            ],
        )
        if outcome.permanent:  # a verdict may have parked some: their later events park with them
            park_behind(conn, ((e.audience_id, e.user_id) for e in outcome.events), now)
    tallies: dict[int, int] = {}
    for event in outcome.events:
        tallies[event.audience_id] = tallies.get(event.audience_id, 0) + 1
    for audience_id, count in tallies.items():
        sent, failed = (count, 0) if outcome.acknowledged else (0, count)
        conn.execute(
            sa.update(sync_runs)
            .where(sync_runs.c.id == run_ids(audience_id))
            .values(
                events_sent=sync_runs.c.events_sent + sent,
                events_failed=sync_runs.c.events_failed + failed,
                retries=sync_runs.c.retries + outcome.retries,
                rate_limited=sync_runs.c.rate_limited + outcome.rate_limited,
            )
        )
