"""What Gleap was told: one call's changes, its outcome, and how outcomes are written to the store.

Each answer moves the rows it concerns along: acknowledged, rejected (a
verdict), or unknown (no verdict; Gleap may have applied it). Failures push
the user's next attempt back, per user, across runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync import values
from audiencesync.backoff import doubling
from audiencesync.gleap.client import Try
from audiencesync.store.field_acks import acknowledge_fields
from audiencesync.store.pending_since import SINCE, since_sql
from audiencesync.store.schema import call_values, calls, sync_runs
from audiencesync.store.utc_time import UtcDateTime


@dataclass(frozen=True)
class PendingChange:
    """What one call must carry for one row: the membership, and the value while a member."""

    audience_id: int
    user_id: str
    desired: bool  # a member of the audience; for a trait: the user has a value
    unknown: bool = False  # an earlier call's outcome is unknown (as read, before this call)
    failures: int = 0  # failed deliveries of this value so far
    kind: str = "audience"  # audience | trait (the row of ``audiences``)
    value: Any = None  # decoded JSON: a trait's value, an audience member's contact fields
    # As read in a delivery pass: this row's audience's cursor has already passed the user,
    # so the user's call in that turn carried it (``call_turns.plan_calls``).
    carried: bool = False

    @property
    def value_json(self) -> str | None:
        """The value as the store keeps it (canonical JSON), for compare-and-set."""
        return None if self.value is None else values.encode(self.value)


@dataclass(frozen=True)
class Outcome:
    """Gleap's answer to one call, which carried one or more audiences' values."""

    changes: tuple[PendingChange, ...]
    status: int  # 0 when no answer came
    error: str | None = None
    permanent: bool = False  # Gleap rejected the call itself (400/404/422...), not a passing fault
    retries: int = 0
    rate_limited: int = 0
    # Some request of the call got no verdict, and may have been applied. None: as the final
    # answer says (no verdict, unless it is one).
    maybe_applied: bool | None = None
    tries: tuple[Try, ...] = ()  # each request sent, for the call log
    # The contact fields the call carried, (name, canonical JSON): a 2xx records them as what
    # Gleap holds for the user (``contact_fields``).
    fields: tuple[tuple[str, str], ...] = ()
    # The losing audiences (keys) of the contact fields the call carried with another audience's
    # value: a 2xx counts them into those audiences' runs (``sync_runs.field_conflicts``).
    conflicts: tuple[str, ...] = ()

    @property
    def acknowledged(self) -> bool:
        return 200 <= self.status < 300

    @property
    def outcome(self) -> str:
        """The call log's word for the final answer."""
        if self.acknowledged:
            return "acknowledged"
        if self.permanent:
            return "rejected"
        return "unknown" if self.may_have_applied else "not_sent"

    def logged_tries(self, now: datetime) -> tuple[Try, ...]:
        # An outcome made without a client (a test, a replay) is logged as one request.
        return self.tries or (Try(now, self.status, self.outcome, self.error),)

    @property
    def unknown(self) -> bool:
        """Gleap may or may not have applied this call.

        A verdict (a 4xx, a refused token) on a retry says nothing of the attempts before it:
        one that got no answer, or a 5xx, may have been applied all the same.
        """
        return not self.acknowledged and self.may_have_applied

    @property
    def may_have_applied(self) -> bool:
        return not self.permanent if self.maybe_applied is None else self.maybe_applied


@dataclass(frozen=True)
class Backoff:
    """How long a user whose delivery failed waits before the next try: doubling, capped."""

    seconds: float = 60.0
    max_seconds: float = 3600.0

    def delay(self, failures: int) -> float:
        """The wait after the ``failures``-th failure in a row (1 for the first)."""
        return doubling(self.seconds, self.max_seconds, failures)


def write_outcomes(
    conn: Connection,
    results: Sequence[Outcome],
    run_ids: dict[int, int],
    *,
    now: datetime,
    max_attempts: int,
    backoff: Backoff,
) -> None:
    """Store Gleap's answers in one transaction: acknowledged values, failures, the delivery log.

    - 2xx: the value sent is acknowledged, and the outcome is known again.
    - A verdict (a 4xx but 408/429): that request was not applied; it counts
      towards ``max_attempts``, and at the limit the change is parked. The
      row's unknown mark is what it was before, unless an earlier attempt of
      the same call got no verdict: that one may have been applied.
    - No verdict (timeout, dropped answer, 5xx, retries used up): Gleap may
      have applied it, so the row stays marked unknown (and pending).
    An unknown mark is only ever cleared by a 2xx.
    Every failure pushes the user's next attempt back (``backoff``).
    """
    acked: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    tallies: dict[int, dict[str, int]] = {}
    log_calls(conn, results, run_ids, now)
    for result in results:
        for change in result.changes:
            row = {
                "a": change.audience_id,
                "u": change.user_id,
                "v": change.desired,
                "j": change.value_json,
                "s": result.status,
            }
            tally = tallies.setdefault(
                change.audience_id, dict.fromkeys(("sent", "failed", "unknown", "retries", "rl"), 0)
            )
            tally["retries"] += result.retries
            tally["rl"] += result.rate_limited
            if result.acknowledged:
                acked.append(row | {"t": now})
                tally["sent"] += 1
                continue
            tally["failed"] += 1
            tally["unknown"] += result.unknown
            failed.append(
                row
                | {
                    "e": result.error,
                    "t": now,
                    "k": change.unknown or result.unknown,
                    "verdict": result.permanent,
                    "next": now + timedelta(seconds=backoff.delay(change.failures + 1)),
                    "max": max_attempts,
                }
            )
    same = "IS" if conn.dialect.name == "sqlite" else "IS NOT DISTINCT FROM"
    if acked:
        # The value sent, not the current desired one, becomes acknowledged:
        # if the source changed meanwhile (membership or value), the row stays
        # pending. If the user left and the row was dropped while the call was
        # in flight, it comes back as a non-member that Gleap has a value for.
        latest = list({(row["a"], row["u"]): row for row in acked}.values())  # as upserts in turn
        _acknowledge(conn, latest, now)
        acknowledge_fields(conn, [(r.changes[0].user_id, r.fields) for r in results if r.acknowledged], now)
    if failed:
        # A failure is about the value sent: if the source changed it meanwhile,
        # the new value starts with a clean slate (only the mark is kept).
        current = f"desired = :v AND (NOT desired OR value {same} :j)"  # still what was sent
        conn.execute(
            sa.text(
                # Marked unknown, a row whose source went back to what Gleap held owes again.
                f"UPDATE memberships SET unknown = :k, last_status = :s, last_error = :e, {SINCE}, "
                f"failures = CASE WHEN {current} THEN failures + 1 ELSE failures END, "
                f"next_attempt_at = CASE WHEN {current} THEN :next ELSE next_attempt_at END, "
                f"attempts = CASE WHEN {current} AND :verdict THEN attempts + 1 ELSE attempts END, "
                f"parked_at = CASE WHEN {current} AND :verdict AND attempts + 1 >= :max THEN :t "
                "ELSE parked_at END "
                "WHERE audience_id = :a AND user_id = :u"
            ).bindparams(
                sa.bindparam("t", type_=UtcDateTime),
                sa.bindparam("next", type_=UtcDateTime),
                sa.bindparam("verdict", type_=sa.Boolean),
                sa.bindparam("k", type_=sa.Boolean),
                sa.bindparam("v", type_=sa.Boolean),
                sa.bindparam("j", type_=sa.Text),
            ),
            failed,
        )
    for audience_id, tally in tallies.items():
        conn.execute(
            sa.update(sync_runs)
            .where(sync_runs.c.id == run_ids[audience_id])
            .values(
                sent=sync_runs.c.sent + tally["sent"],
                failed=sync_runs.c.failed + tally["failed"],
                unknown=sync_runs.c.unknown + tally["unknown"],
                retries=sync_runs.c.retries + tally["retries"],
                rate_limited=sync_runs.c.rate_limited + tally["rl"],
            )
        )


UPSERT = (
    "INSERT INTO memberships (audience_id, user_id, desired, acked, acked_value, resend, "
    "unknown, changed_at, pending_since, acked_at, attempts, failures, last_status) {rows} "
    "ON CONFLICT (audience_id, user_id) DO UPDATE SET acked = excluded.acked, "
    # An answer for a value the source has left makes the row owe again, from now.
    f"{since_sql('excluded.pending_since')}, "
    "acked_value = excluded.acked_value, "
    "resend = false, unknown = false, acked_at = excluded.acked_at, attempts = 0, "
    "failures = 0, next_attempt_at = NULL, last_status = excluded.last_status, "
    "last_error = NULL, parked_at = NULL"
)
LEAVERS = "DELETE FROM memberships {rows} AND desired = false AND pending = false"


def _acknowledge(conn: Connection, acked: list[dict[str, Any]], now: datetime) -> None:
    """Record these 2xx answers, then drop the rows of leavers whose false Gleap acknowledged.

    On PostgreSQL one statement for all the rows (arrays unnested), not one per row: each
    statement fires the counters' statement trigger (~0.1 ms a firing). SQLite's row triggers
    cost the same either way.
    """
    leavers = [row for row in acked if not row["v"]]
    if conn.dialect.name != "postgresql":
        values = "VALUES (:a, :u, false, :v, :j, false, false, :t, :t, :t, 0, 0, :s)"
        timed = sa.bindparam("t", type_=UtcDateTime)
        conn.execute(sa.text(UPSERT.format(rows=values)).bindparams(timed), acked)
        if leavers:
            where = "WHERE audience_id = :a AND user_id = :u"
            conn.execute(sa.text(LEAVERS.format(rows=where)), [{"a": r["a"], "u": r["u"]} for r in leavers])
        return
    arrays = {
        "a": [r["a"] for r in acked],
        "u": [r["u"] for r in acked],
        "v": [r["v"] for r in acked],
        "j": [r["j"] for r in acked],
        "s": [r["s"] for r in acked],
    }
    unnested = (
        "SELECT x.a, x.u, false, x.v, x.j, false, false, :t, :t, :t, 0, 0, x.s FROM unnest("
        "CAST(:a AS integer[]), CAST(:u AS text[]), CAST(:v AS boolean[]), CAST(:j AS text[]), "
        "CAST(:s AS integer[])) "
        "AS x(a, u, v, j, s)"
    )
    conn.execute(
        sa.text(UPSERT.format(rows=unnested)).bindparams(sa.bindparam("t", type_=UtcDateTime)),
        arrays | {"t": now},
    )
    if leavers:
        keys = "m USING unnest(CAST(:a AS integer[]), CAST(:u AS text[])) AS x(a, u) "
        conn.execute(
            sa.text(LEAVERS.format(rows=keys + "WHERE m.audience_id = x.a AND m.user_id = x.u")),
            {"a": [r["a"] for r in leavers], "u": [r["u"] for r in leavers]},
        )


def log_calls(conn: Connection, results: Sequence[Outcome], run_ids: dict[int, int], now: datetime) -> None:
    """The call log: every request of these calls, with the keys and values each one carried."""
    requests: list[dict[str, Any]] = []
    carried: list[tuple[PendingChange, ...]] = []
    for result in results:
        for number, attempt in enumerate(result.logged_tries(now), start=1):
            requests.append(
                {
                    "user_id": result.changes[0].user_id,
                    "attempt": number,
                    "at": attempt.at,
                    "elapsed_ms": attempt.elapsed_ms,
                    "status": attempt.status,
                    "outcome": attempt.outcome,
                    "error": attempt.error,
                }
            )
            carried.append(result.changes)
    if not requests:
        return
    ids = conn.execute(
        sa.insert(calls).returning(calls.c.id, sort_by_parameter_order=True), requests
    ).scalars()
    conn.execute(
        sa.insert(call_values),
        [
            {
                "call_id": call_id,
                "audience_id": change.audience_id,
                "run_id": run_ids[change.audience_id],
                "value": change.desired,
                "data": change.value_json,
            }
            for call_id, changes in zip(ids, carried, strict=True)
            for change in changes
        ],
    )
