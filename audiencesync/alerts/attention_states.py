"""The states of what needs a person (``attention.py``): each one's severity, the fix shown
with it, and the two records every surface shows: a ``Concern`` (one open condition) and a
``Verdict`` (the one state of the daemon or of a property)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from audiencesync.errors import iso_time
from audiencesync.store.lease_renewal import LOCK_CULPRITS

OK = "ok"
DELIVERING = "delivering"
PAUSED = "paused"
RETIRED = "retired"
STANDBY = "standby"
NO_DAEMON = "no_daemon"
HELD = "held"
SOURCE_FAILING = "source_failing"
PARKED = "parked"
OVERDUE = "overdue"
TOKEN_REFUSED = "token_refused"  # noqa: S105 (a state, not a secret)
GLEAP_DOWN = "gleap_down"
STALLED = "stalled"
DEAD = "dead"
LEASE_LOST = "lease_lost"
STORE_UNWRITABLE = "store_unwritable"

SEVERITY = {
    OK: "ok",
    DELIVERING: "progress",
    PAUSED: "neutral",
    RETIRED: "neutral",
    STANDBY: "neutral",
    NO_DAEMON: "neutral",
    HELD: "action",
    PARKED: "action",
    OVERDUE: "action",
    SOURCE_FAILING: "failing",
    TOKEN_REFUSED: "failing",
    GLEAP_DOWN: "failing",
    STALLED: "failing",
    DEAD: "failing",
    LEASE_LOST: "failing",
    STORE_UNWRITABLE: "failing",
}


def label(state: str) -> str:
    """The words a person reads for a state: ``token_refused`` -> "token refused"."""
    return state.replace("_", " ")


# The alert conditions (``config_alerts.EVENTS``) each state comes from.
FROM_CONDITION = {
    "token_refused": TOKEN_REFUSED,
    "gleap_down": GLEAP_DOWN,
    "stalled": STALLED,
    "lease": LEASE_LOST,
    "held": HELD,
    "source_failed": SOURCE_FAILING,
}
# Every condition a gauge of /metrics reports, open (1) or not (0): daemon-wide, then a property's.
# The daemon-wide ones in the order they are listed, the first failing one being why /healthz
# fails: a loop gone first (whatever else that daemon says of itself may be stale, and a restart
# cures it); then the store it can't write (its lease is at stake within the TTL); the refused
# token, a cause a person can fix, before Gleap down, which only waiting cures; stalled, a
# symptom of any of those or of none; then no daemon working the store at all.
DAEMON_CONDITIONS = (DEAD, STORE_UNWRITABLE, TOKEN_REFUSED, GLEAP_DOWN, STALLED, LEASE_LOST, OVERDUE)
PROPERTY_CONDITIONS = (HELD, SOURCE_FAILING, PARKED, OVERDUE)
# Gleap refuses everything, or the store takes no write (not even a call's outcome): what
# waits is blocked, not delivering.
BLOCKING = (STORE_UNWRITABLE, TOKEN_REFUSED, GLEAP_DOWN)

ACTIONS = {
    TOKEN_REFUSED: "set a valid token in GLEAP_API_TOKEN (or [gleap] api_token), then `audiencesync check`",
    GLEAP_DOWN: "check the network and Gleap's status page, or [gleap] base_url; delivery resumes by itself",
    STALLED: "see the daemon's log; `audiencesync status` shows what is pending",
    DEAD: "restart the service (systemd's watchdog does after WatchdogSec); the log says why the loop ended",
    LEASE_LOST: "check that the store answers (`audiencesync check`); the daemon takes the lease back "
    "when it can",
    STORE_UNWRITABLE: f"find what keeps the store from being written ({LOCK_CULPRITS}; or a full "
    "disk), or raise [sync] lease_seconds above the longest such lock; delivery resumes by itself "
    "once a renewal goes through",
    OVERDUE: "start the daemon (`audiencesync run`, or its service), or run `audiencesync sync`",
    SOURCE_FAILING: "check the source and the query, then `audiencesync check`",
}


@dataclass(frozen=True)
class Concern:
    """One open condition: what happened, since when, and what a person should do."""

    state: str
    subject: str | None  # a property's key; None: the daemon, everything
    reason: str
    action: str
    since: datetime | None = None

    @property
    def severity(self) -> str:
        return SEVERITY[self.state]

    @property
    def label(self) -> str:
        return label(self.state)

    def line(self) -> str:
        """``status``'s and /healthz's line for it."""
        where = f"{self.subject}: " if self.subject is not None else ""
        since = f" (since {iso_time(self.since)})" if self.since is not None else ""
        # Some reasons are a whole alert message with its own "Fix:" (the guard's): the line gives
        # one fix, the action, which every surface shows alike, not the message's and then a second.
        reason = self.reason.partition(" Fix: ")[0].rstrip(".")
        return f"{self.label}: {where}{reason}{since}. Fix: {self.action}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "severity": self.severity,
            "subject": self.subject,
            "reason": self.reason,
            "action": self.action,
            "since": self.since,
        }


@dataclass(frozen=True)
class Verdict:
    """The one state a badge shows (the daemon's, or a property's), with its reason and action."""

    state: str
    reason: str = ""
    action: str | None = None

    @property
    def severity(self) -> str:
        return SEVERITY[self.state]

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "severity": self.severity, "reason": self.reason, "action": self.action}
