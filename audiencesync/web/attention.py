"""What needs a person, as the web pages show it: attention.py's concerns as banners, its verdicts
as badges. Nothing here judges anything: the states, reasons and actions are attention.py's, the
ones `status`, /healthz, /metrics and the alerts show.

A badge's colour is its severity's (``attention.SEVERITY``), with the state's words inside, so
no badge is read by its colour alone. Run results have their own words but the same five
colours, so "held" (a person must act) never wears the colour of "running" (in progress).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from audiencesync.alerts import attention

# A run's result, coloured by what it asks of a person.
RUN_SEVERITY: Mapping[str, str] = {
    "succeeded": "ok",
    "running": "progress",
    "partial": "action",  # some calls were refused or unanswered: retried, or parked
    "held": "action",
    "aborted": "failing",
    "failed": "failing",
    "interrupted": "failing",
}
# This process, when the daemon serves the page itself.
PROCESS_SEVERITY: Mapping[str, str] = {"active": "ok", "standby": "neutral"}


@dataclass(frozen=True)
class Piece:
    """Part of an action's text: a command (shown in a ``<code>`` to copy) or words."""

    text: str
    command: bool


def pieces(action: str | None, key: str | None = None) -> list[Piece]:
    """An action split into words and commands: what is between backticks, and a bare
    ``audiencesync SUBCOMMAND`` with its ``--flags`` and the property's ``key`` (the words that
    follow it, "(if the removals are right)" or ", fix the cause", stay words)."""
    if not action:
        return []
    arguments = r"--[a-z][a-z-]*" + (f"|{re.escape(key)}" if key else "")
    command = re.compile(rf"`([^`]+)`|(audiencesync [a-z][a-z-]*(?: (?:{arguments}))*)")
    out: list[Piece] = []
    at = 0
    for found in command.finditer(action):
        if found.start() > at:
            out.append(Piece(action[at : found.start()], False))
        out.append(Piece(found.group(1) or found.group(2), True))
        at = found.end()
    if at < len(action):
        out.append(Piece(action[at:], False))
    return out


def banners(seen: attention.Attention, key: str | None = None) -> list[attention.Concern]:
    """The concerns a page shows at its top: on the overview (``key`` None) every one; on a
    property's page the daemon-wide ones and its own. A property's "overdue" is left out beside
    the daemon-wide one, which names it and says the same fix (its "next run" says overdue)."""
    wide_overdue = any(c.state == attention.OVERDUE and c.subject is None for c in seen.concerns)
    return [
        c
        for c in seen.concerns
        if (key is None or c.subject in (None, key))
        and not (wide_overdue and c.subject is not None and c.state == attention.OVERDUE)
    ]


def said(shown: list[attention.Concern], state: str, key: str | None = None) -> bool:
    """A banner above already gives this state's reason (the property's own, or the daemon's):
    a badge beside it need not repeat it."""
    return any(c.state == state and c.subject in (None, key) for c in shown)


def overdue(seen: attention.Attention, key: str) -> bool:
    """The property's next run is past and no daemon holds the store: nothing will run it."""
    return any(c.state == attention.OVERDUE and c.subject == key for c in seen.concerns)


def verdict(seen: attention.Attention, key: str) -> attention.Verdict:
    # A property the store gained after the attention was read (a sync in between): no word yet.
    return seen.properties.get(key, attention.Verdict(attention.OK))


def blocked(seen: attention.Attention, key: str) -> attention.Verdict | None:
    """What stops a delivery: Gleap refuses everything (the token, or Gleap down), or the store
    takes no write (store_unwritable)."""
    found = seen.properties.get(key)
    return found if found is not None and found.state in attention.BLOCKING else None


GLOBALS = {
    "label": attention.label,
    "severity": attention.SEVERITY,
    "run_severity": RUN_SEVERITY,
    "process_severity": PROCESS_SEVERITY,
    "pieces": pieces,
    "banners": banners,
    "overdue": overdue,
    "said": said,
    "verdict": verdict,
    "blocked": blocked,
}
