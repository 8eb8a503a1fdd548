"""What needs a person: one reading of the daemon's state and each property's, for every surface.

`/healthz`, `status`, the web page and `/metrics` all show what ``assess`` returns, and the
alerts are its conditions: each one an alert opens (``alerts.py``) is kept in the store's
``alert_conditions`` until the alert that ends it, whether or not any webhook is set, so
another process (``status``, ``serve``, a later ``sync``) reads the same conditions the
daemon saw. To those ``assess`` adds what the store says by itself (parked changes, what
is pending, whether a daemon holds the store) and, in the daemon, what only it knows (a
loop gone, the circuit breaker's next probe).

Each state has a severity, the colour of its badge: ``ok``; ``progress`` (delivering);
``neutral`` (paused, retired, standby); ``action`` (a person must act: held, parked,
overdue); ``failing`` (nothing gets through: the token refused, Gleap down, stalled, a
dead loop, the store unwritable, the lease lost). Each concern says what happened and what
to do, with the exact command where there is one.

A daemon-wide concern (``subject`` None) of severity ``failing`` makes the daemon
unhealthy (`/healthz` 503); a property's own concerns (held, a failing source, parked)
never do: a restart would cure none of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync.alerts import store_unwritable
from audiencesync.alerts.attention_states import (
    ACTIONS,
    BLOCKING,
    DAEMON_CONDITIONS,
    DEAD,
    DELIVERING,
    FROM_CONDITION,
    GLEAP_DOWN,
    HELD,
    LEASE_LOST,
    NO_DAEMON,
    OK,
    OVERDUE,
    PARKED,
    PAUSED,
    PROPERTY_CONDITIONS,
    RETIRED,
    SEVERITY,
    SOURCE_FAILING,
    STALLED,
    STANDBY,
    STORE_UNWRITABLE,
    TOKEN_REFUSED,
    Concern,
    Verdict,
    label,
)
from audiencesync.alerts.conditions import Condition
from audiencesync.config.sections import SyncConfig
from audiencesync.errors import iso_time
from audiencesync.lifecycle import states as lifecycle
from audiencesync.store.lease_renewal import Failing
from audiencesync.store.schema import alert_conditions, leases
from audiencesync.store.status import AudienceStatus, audience_status

# The states and records live in attention_states.py; everything a surface needs is here.
__all__ = [
    "ACTIONS",
    "BLOCKING",
    "DAEMON_CONDITIONS",
    "DEAD",
    "DELIVERING",
    "FROM_CONDITION",
    "GLEAP_DOWN",
    "HELD",
    "LEASE_LOST",
    "NO_DAEMON",
    "OK",
    "OVERDUE",
    "PARKED",
    "PAUSED",
    "PROPERTY_CONDITIONS",
    "RETIRED",
    "SEVERITY",
    "SOURCE_FAILING",
    "STALLED",
    "STANDBY",
    "STORE_UNWRITABLE",
    "TOKEN_REFUSED",
    "Attention",
    "Concern",
    "Local",
    "Verdict",
    "assess",
    "label",
    "read",
]


@dataclass(frozen=True)
class Local:
    """What only the running daemon knows of itself; None from any other process."""

    active: bool
    stopping: bool = False
    dead: str | None = None  # why a loop is gone
    outage: str | None = None  # the circuit breaker is open: why, and the next probe
    outage_since: datetime | None = None
    stalled: str | None = None
    started_at: datetime | None = None
    intervals: Mapping[str, float] = field(default_factory=dict)  # seconds, of the active properties
    unrenewed: Failing | None = None  # the lease's renewals failing (a copy of the heartbeat's)
    lease_seconds: float = SyncConfig.lease_seconds  # its TTL: a third of it is their grace


@dataclass(frozen=True)
class Attention:
    daemon: Verdict
    concerns: tuple[Concern, ...]  # daemon-wide first, then by property
    properties: Mapping[str, Verdict]

    @property
    def failing(self) -> Concern | None:
        """The first condition of the whole daemon that is failing: why it is unhealthy."""
        return next((c for c in self.concerns if c.subject is None and c.severity == "failing"), None)

    @property
    def healthy(self) -> bool:
        return self.failing is None

    def health(self) -> tuple[bool, str]:
        """/healthz: the first line says ok, standby or why not; each open concern follows."""
        failing = self.failing
        first = failing.reason if failing is not None else STANDBY if self.daemon.state == STANDBY else OK
        return failing is None, "\n".join([first, *(c.line() for c in self.concerns)])

    def open(self) -> set[tuple[str, str | None]]:
        """(state, subject) of each open concern: /metrics' gauges."""
        return {(c.state, c.subject) for c in self.concerns}


def read(conn: Connection, known: Mapping[str, str], now: datetime, local: Local | None = None) -> Attention:
    """``assess`` on what the store holds now: one read, as every surface makes it."""
    conditions = [Condition(*row) for row in conn.execute(sa.select(alert_conditions))]
    holder = conn.execute(sa.select(leases).where(leases.c.name == "writer")).one_or_none()
    return assess(
        audience_status(conn), conditions, known, holder._asdict() if holder is not None else None, now, local
    )


def assess(
    rows: Sequence[AudienceStatus],
    conditions: Iterable[Condition],
    known: Mapping[str, str],
    holder: Mapping[str, Any] | None,
    now: datetime,
    local: Local | None = None,
) -> Attention:
    """The state of the daemon and of each property in ``rows`` (``status.audience_status``),
    from the open alert ``conditions``, the lifecycle states the config gives (``known``), the
    writer lease's row (``holder``) and, in the daemon, its own facts (``local``)."""
    conditions = list(conditions)
    # A daemon holds the store: this one (active), or another whose lease has not expired.
    daemon_live = (local is not None and local.active) or _holder_live(holder, now)
    wide = _daemon_concerns(conditions, holder, now, local, daemon_live)
    overdue = [] if daemon_live else _overdue(rows, known, now)
    if overdue:
        wide.append(
            Concern(
                OVERDUE,
                None,
                f"no daemon holds the store, and {len(overdue)} run(s) are past due "
                f"({', '.join(overdue[:5])})",
                ACTIONS[OVERDUE],
            )
        )
    blocking = next((c for c in wide if c.state in BLOCKING), None)
    by_key = {(c.kind, c.subject): c for c in conditions}
    late = _late(rows, known, now, local) if local is not None and local.active else []
    properties: dict[str, Verdict] = {}
    own: list[Concern] = []
    for row in rows:
        concerns = _property_concerns(row, known, by_key, overdue)
        own += concerns
        properties[row.key] = _verdict(row, known, concerns, blocking)
    if late:
        lagging = [k for k in late if properties[k].severity not in ("action", "failing")]
        if lagging:
            wide.append(
                Concern(
                    STALLED,
                    None,
                    "no successful cycle within twice the interval: " + ", ".join(lagging),
                    ACTIONS[STALLED],
                )
            )
    return Attention(_daemon_verdict(wide, local, daemon_live, holder), (*wide, *own), properties)


# What the daemon's heartbeat writes into the lease row when unhealthy (daemon_health.py):
# "unhealthy (STATE): REASON"; an older daemon wrote "unhealthy: REASON".
HEARTBEAT = re.compile(r"unhealthy(?: \((?P<state>\w+)\))?: (?P<reason>.*)", re.DOTALL)


def _holder_live(holder: Mapping[str, Any] | None, now: datetime) -> bool:
    return holder is not None and holder["expires_at"] >= now


def _daemon_concerns(
    conditions: list[Condition],
    holder: Mapping[str, Any] | None,
    now: datetime,
    local: Local | None,
    daemon_live: bool,
) -> list[Concern]:
    out: list[Concern] = []
    if local is not None and local.dead:
        out.append(Concern(DEAD, None, local.dead, ACTIONS[DEAD]))
    if local is not None and local.outage:
        out.append(Concern(GLEAP_DOWN, None, local.outage, ACTIONS[GLEAP_DOWN], local.outage_since))
    if local is not None and local.stalled:
        out.append(Concern(STALLED, None, local.stalled, ACTIONS[STALLED]))
    if local is not None and local.active:
        # The row is this daemon's own, which its failing renewals can't update: its expiry stands.
        expires = holder["expires_at"] if holder is not None else None
        unwritable = store_unwritable.of_daemon(local.unrenewed, local.lease_seconds, expires, now)
        if unwritable is not None:
            out.append(unwritable)
    seen = {c.state for c in out}
    for condition in conditions:
        state = FROM_CONDITION.get(condition.kind)
        if state is None or state in (HELD, SOURCE_FAILING) or state in seen:
            continue
        if state == LEASE_LOST and daemon_live:
            # Held again (by this process, whose row ends at its next heartbeat, or by another
            # daemon that serves meanwhile): only a store no daemon can hold fails everything.
            continue
        if state == GLEAP_DOWN and any(c.state == TOKEN_REFUSED for c in out):
            continue
        seen.add(state)
        out.append(Concern(state, None, condition.summary, ACTIONS[state], condition.opened_at))
    if local is None and daemon_live and holder is not None:
        # Another process's daemon. A store it can't write stops its renewals, and with them
        # the heartbeat's word on its health (store_unwritable.py): its row says so by standing still.
        unwritable = store_unwritable.of_holder(holder, now)
        if unwritable is not None:
            out.append(unwritable)
        # What its heartbeat last said of itself, when nothing above does.
        said = HEARTBEAT.fullmatch(str(holder.get("health") or ""))
        if said is not None and not any(c.severity == "failing" for c in out):
            state = said["state"] if said["state"] in DAEMON_CONDITIONS else DEAD
            out.append(Concern(state, None, said["reason"], ACTIONS[state]))
    # In the order of DAEMON_CONDITIONS (attention_states.py): why, there.
    return sorted(out, key=lambda c: DAEMON_CONDITIONS.index(c.state))


def _overdue(rows: Sequence[AudienceStatus], known: Mapping[str, str], now: datetime) -> list[str]:
    return [
        row.key
        for row in rows
        if known.get(row.key) == lifecycle.LIVE and row.next_run_at is not None and row.next_run_at < now
    ]


def _late(rows: Sequence[AudienceStatus], known: Mapping[str, str], now: datetime, local: Local) -> list[str]:
    """Active properties with no successful refresh within twice their interval (counted from
    the daemon's start at the earliest): the scheduler is not getting them done."""
    started = local.started_at or now
    late = []
    for row in rows:
        interval = local.intervals.get(row.key)
        if interval is None or known.get(row.key) != lifecycle.LIVE:
            continue
        last = max(row.refreshed_at or started, started)
        if now - last > timedelta(seconds=2 * interval):
            late.append(row.key)
    return late


def _property_concerns(
    row: AudienceStatus,
    known: Mapping[str, str],
    by_key: Mapping[tuple[str, str], Condition],
    overdue: Sequence[str],
) -> list[Concern]:
    state = lifecycle.state_of(row.key, known)
    key = row.key
    if state == lifecycle.PAUSED:
        return []  # nothing runs it: nothing to act on until it is resumed
    if state == lifecycle.RETIRED:
        owed = row.pending + row.parked
        if not owed or row.members:
            return []
        return [
            Concern(
                RETIRED,
                key,
                f"retired, and Gleap is still owed {key}: false for {owed} user(s)",
                f"audiencesync retire {key} --unset-in-gleap",
            )
        ]
    out = []
    held = by_key.get(("held", key))
    last = row.last_run or {}
    if held is not None or last.get("status") == "held":
        reason = held.summary if held is not None else f"{row.kind} {key!r} is held: {last.get('error')}"
        out.append(
            Concern(
                HELD,
                key,
                reason,
                f"audiencesync sync --audience {key} --allow-removals (if the removals are right)",
                held.opened_at if held is not None else last.get("started_at"),
            )
        )
    failing = by_key.get(("source_failed", key))
    if failing is not None:
        out.append(Concern(SOURCE_FAILING, key, failing.summary, ACTIONS[SOURCE_FAILING], failing.opened_at))
    parked = row.parked + row.events_parked
    if parked:
        out.append(
            Concern(
                PARKED,
                key,
                f"{parked} change(s) parked after repeated rejections by Gleap",
                f"audiencesync failures --audience {key}, fix the cause, then "
                f"audiencesync retry --audience {key}",
            )
        )
    if key in overdue and row.next_run_at is not None:
        due = iso_time(row.next_run_at)
        out.append(Concern(OVERDUE, key, f"its next run was due at {due}", ACTIONS[OVERDUE]))
    return out


def _verdict(
    row: AudienceStatus, known: Mapping[str, str], concerns: list[Concern], blocking: Concern | None
) -> Verdict:
    state = lifecycle.state_of(row.key, known)
    if state == lifecycle.PAUSED:
        return Verdict(PAUSED, "enabled = false: neither refreshed nor delivered", "set enabled = true")
    if state == lifecycle.RETIRED:
        if concerns:
            return Verdict(RETIRED, concerns[0].reason, concerns[0].action)
        return Verdict(RETIRED, "in no config", f"audiencesync retire {row.key} removes its state")
    first = {c.state: c for c in concerns}
    for name in (HELD, SOURCE_FAILING):
        if name in first:
            return Verdict(name, first[name].reason, first[name].action)
    owed = row.pending + row.events_pending
    if owed and blocking is not None:
        return Verdict(blocking.state, f"{owed} change(s) wait: {blocking.reason}", blocking.action)
    if PARKED in first:
        return Verdict(PARKED, first[PARKED].reason, first[PARKED].action)
    if OVERDUE in first:
        return Verdict(OVERDUE, first[OVERDUE].reason, first[OVERDUE].action)
    if owed:
        return Verdict(DELIVERING, f"{owed} change(s) pending")
    return Verdict(OK)


def _daemon_verdict(
    wide: list[Concern], local: Local | None, daemon_live: bool, holder: Mapping[str, Any] | None
) -> Verdict:
    if local is not None and local.stopping:
        return Verdict(DEAD, "stopping")
    if wide:
        return Verdict(wide[0].state, wide[0].reason, wide[0].action)
    if local is not None and not local.active:
        return Verdict(STANDBY, "waiting for the store's writer lease")
    if not daemon_live:
        return Verdict(NO_DAEMON, "no daemon holds the store", ACTIONS[OVERDUE])
    if holder is not None and local is None:
        return Verdict(OK, f"{holder.get('host')} pid {holder.get('pid')} holds the store")
    return Verdict(OK)
