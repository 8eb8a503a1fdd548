"""Alerts: tell the [[alerts]] webhooks once when a condition starts, and once when it ends.

Callers report what they observe (``source_failed``, ``refreshed``, ``parked``,
``gleap``, ``stalled``, the lease's); this module decides whether that opens a
condition, ends one, or is a reminder, from the open conditions kept in the
store (``alert_conditions``), so `sync` run from cron alerts once, not each run.
Each condition has a subject (an audience key, "gleap", a host): one audience's
recovery never ends another's condition.

The conditions are recorded whether or not any webhook is set: they are what
`status`, /healthz, the web page and /metrics show (``attention.py``).

Best-effort by design: the condition's state is recorded whatever the webhook
does, sending happens on the senders' threads (``alert_sender``), and a failure
here is logged, never raised into a sync.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from sqlalchemy import Engine

from audiencesync.alerts.conditions import Condition, Conditions
from audiencesync.alerts.messages import FIRING, NOTICE, RESOLVED, Alert, render
from audiencesync.alerts.sender import BACKOFF, WebhookSender
from audiencesync.config.alerts import AlertConfig
from audiencesync.config.loading import Config
from audiencesync.errors import brief
from audiencesync.store.database import utc_now
from audiencesync.store.diff import DiffCounts
from audiencesync.store.status import ParkedChange

log = logging.getLogger(__name__)

# How long a one-shot `sync` waits at exit for its queued alerts to go out.
EXIT_GRACE_SECONDS = 5.0
PARKED_EXAMPLES = 5  # the user ids a parked alert names
GLEAP, DELIVERY = "gleap", "delivery"  # the subjects of the conditions that concern everything

Clock = Callable[[], Any]


def subscribed(event: str, events: Sequence[str]) -> bool:
    """Whether a webhook listening to ``events`` gets ``event``. A refused token was a kind of
    gleap_down until token_refused had its own name: a webhook that lists gleap_down still gets it."""
    return event in events or (event == "token_refused" and "gleap_down" in events)


class Alerts:
    """Seams: the webhooks, the store's engine (None: nothing is recorded), a clock, a transport."""

    def __init__(
        self,
        webhooks: Sequence[AlertConfig],
        engine: Engine | None,
        *,
        clock: Clock = utc_now,
        host: str | None = None,
        secrets: Sequence[str] = (),
        transport: httpx.BaseTransport | None = None,
        backoff: tuple[float, float] | None = None,
    ) -> None:
        self.clock = clock
        self.host = host or socket.gethostname()
        self.conditions = Conditions(engine, clock) if engine is not None else None
        self._secrets = [s for s in secrets if s]
        self._transport = transport
        self._backoff = backoff
        self._lock = threading.Lock()
        self._clear: set[tuple[str, str]] = set()  # seen clear in the store, and not opened since
        self.configure(webhooks)

    @classmethod
    def of(cls, config: Config, engine: Engine | None, **kwargs: Any) -> Alerts:
        """The config's webhooks; the Gleap token is scrubbed from anything sent."""
        return cls(config.alerts, engine, secrets=cls.secrets_of(config), **kwargs)

    @staticmethod
    def secrets_of(config: Config) -> list[str]:
        token = config.gleap.api_token
        return [token.reveal()] if token else []

    def configure(self, webhooks: Sequence[AlertConfig], secrets: Sequence[str] | None = None) -> None:
        """(Re)load the webhooks, as on a SIGHUP; queued messages of the old ones still go out."""
        if secrets is not None:
            # A rotated token: scrub both. The same one again (every reload) is not added again.
            self._secrets = list(dict.fromkeys([*self._secrets, *(s for s in secrets if s)]))
        backoff = self._backoff or BACKOFF
        senders = [WebhookSender(w, transport=self._transport, backoff=backoff) for w in webhooks]
        old, self._senders = getattr(self, "_senders", []), senders
        for sender in old:
            sender.retire()

    @property
    def enabled(self) -> bool:
        """Conditions are recorded (a store is given): every surface shows them, webhook or not."""
        return self.conditions is not None

    def forget_cache(self) -> None:
        """Read the store again before the next recovery: another process may have opened conditions."""
        with self._lock:
            self._clear.clear()

    def close(self, grace: float | None = None) -> None:
        """Give queued alerts ``grace`` seconds (default EXIT_GRACE_SECONDS) to go out; the rest
        are dropped, and counted in the log."""
        grace = EXIT_GRACE_SECONDS if grace is None else grace
        deadline = time.monotonic() + grace
        dropped = sum(sender.close(deadline) for sender in self._senders)
        if dropped:
            log.warning("%d alert(s) not sent within %g s of exiting; dropped", dropped, grace)

    # --- what callers observe ------------------------------------------------------

    def source_failed(self, key: str, kind: str, source: str, error: str) -> None:
        self._firing(
            "source_failed",
            key,
            f"the source {source!r} of {kind} {key!r} failed; its snapshot is unchanged and "
            f"nothing of it was applied: {error}",
            audience=key,
            details={"source": source, "error": error},
            fix="check the source and the query, then `audiencesync check`",
        )

    def refreshed(self, key: str, kind: str, counts: DiffCounts, held: str | None) -> None:
        """A refresh read its source: it ends a source failure, and opens or ends a hold."""
        self._resolved("source_failed", key, f"the source of {kind} {key!r} reads fine again", audience=key)
        if held is None:
            self._resolved(
                "held", key, f"{kind} {key!r} is no longer held by the mass-removal guard", audience=key
            )
            return
        self._firing(
            "held",
            key,
            f"{kind} {key!r} is held by the mass-removal guard: {held}",
            audience=key,
            details={
                "members": counts.members,
                "previous": counts.previous,
                "left": counts.left,
                "entered": counts.entered,
            },
            fix=f"audiencesync sync --audience {key} --allow-removals",
        )

    def parked(self, key: str, kind: str, count: int, examples: Callable[[], list[ParkedChange]]) -> None:
        """After a delivery: ``count`` changes (and events) of the audience are parked."""
        if not count:
            self._resolved("parked", key, f"no change of {kind} {key!r} is parked any more", audience=key)
            return
        fix = f"audiencesync failures --audience {key}"
        stored = (
            f"{count} change(s) of {kind} {key!r} are parked after repeated rejections by Gleap and "
            f"will not be sent again until retried. Fix: see `{fix}`, fix the cause, then "
            f"`audiencesync retry --audience {key}`"
        )

        def detail() -> tuple[str, dict[str, Any]]:
            # User ids go out in the message only: the store's row holds none.
            shown = examples()[:PARKED_EXAMPLES]
            answers = [{"user_id": p.user_id, "status": p.last_status, "error": p.last_error} for p in shown]
            said = "; ".join(f"{p.user_id} ({p.last_status}: {p.last_error})" for p in shown)
            text = f"{stored}. For example: {said}" if said else stored
            return text, {"parked": count, "examples": answers}

        self._firing("parked", key, stored, audience=key, fix=fix, detail=detail)

    def retired(self, key: str) -> None:
        """``retire`` removed the key's state: what was open about it ends, one "resolved" each
        (nothing would ever end it otherwise: no refresh or delivery runs the key again)."""
        for kind in ("held", "source_failed", "parked"):
            self._resolved(kind, key, f"{key!r} is retired: audiencesync syncs it no more", audience=key)

    def gleap(self, error: str | None) -> None:
        """Gleap's circuit breaker: ``error`` when it is open, None after calls went through."""
        if error is None:
            self._resolved("gleap_down", GLEAP, "Gleap answers again; delivery resumed")
            self._resolved("token_refused", GLEAP, "Gleap accepts the API token again; delivery resumed")
            return
        self._firing(
            "gleap_down",
            GLEAP,
            f"Gleap is unavailable and the circuit breaker is open; delivery is paused and every change "
            f"stays pending: {error}",
            details={"error": error},
            fix="check the network and Gleap's status page, or [gleap] base_url",
        )

    def refused(self, error: str) -> None:
        """Gleap refuses the token (401/403): every call would be, so nothing is delivered. A
        condition of its own (a person must fix the token; an outage ends by itself), ended the
        same way: calls go through."""
        self._firing(
            "token_refused",
            GLEAP,
            f"Gleap refuses the API token; nothing is delivered and every change stays pending: {error}",
            details={"error": error},
            fix="set a valid token in GLEAP_API_TOKEN (or [gleap] api_token), then `audiencesync check`",
        )

    def stalled(self, reason: str | None) -> None:
        if reason is None:
            self._resolved("stalled", DELIVERY, "delivery moves again")
            return
        self._firing(
            "stalled",
            DELIVERY,
            reason,
            details={"reason": reason},
            fix="see the daemon's log and /healthz; `audiencesync status` shows what is pending",
        )

    def lease_lost(self, error: str) -> None:
        self._firing(
            "lease",
            self.host,
            f"the daemon on {self.host} lost the store's writer lease and stopped writing; it stands by "
            f"until it can take it again. {error}",
            details={"host": self.host},
        )

    def lease_held(self, took_over_from: str | None) -> None:
        """The daemon holds the lease (again); ``took_over_from`` names a holder it replaced."""
        if took_over_from is not None:
            self._notice(
                "lease",
                self.host,
                f"the daemon on {self.host} took over the store's writer lease from {took_over_from}: "
                "that process stopped renewing it (crashed, hung or cut off from the store)",
                details={"host": self.host, "previous": took_over_from},
                fix="find out why the previous holder stopped; its unacknowledged changes go out from here",
            )
        self._resolved("lease", self.host, f"the daemon on {self.host} holds the store's writer lease again")

    # --- conditions ------------------------------------------------------------------

    def _firing(
        self,
        event: str,
        subject: str,
        summary: str,
        *,
        audience: str | None = None,
        details: Mapping[str, Any] | None = None,
        fix: str | None = None,
        detail: Callable[[], tuple[str, dict[str, Any]]] | None = None,
    ) -> None:
        if not self.enabled:
            return
        assert self.conditions is not None
        try:
            with self._lock:
                self._clear.discard((event, subject))
                # Read first: a condition seen again each cycle takes no write lock.
                existing = self.conditions.get(event, subject)
                opened = None if existing else self.conditions.open(event, subject, summary)
                condition = existing or opened or self.conditions.get(event, subject)
                if condition is None:
                    return  # ended by another process this instant
                reminded = [] if opened else self._reminders(event, condition)
                if not opened and not reminded:
                    return
                if detail is not None:
                    summary, details = detail()
                alert = self._alert(event, FIRING, subject, summary, audience, details, fix, condition)
                if opened:
                    log.info("alert: %s", summary)
                    self._send(alert)
                else:
                    self._send(dataclasses.replace(alert, reminder=True), reminded)
                    self.conditions.notified(event, subject, self.clock())
        except Exception as exc:
            log.warning("alerts: could not record or send %s for %s: %s", event, subject, brief(exc))

    def _resolved(self, kind: str, subject: str, summary: str, *, audience: str | None = None) -> None:
        if not self.enabled or (kind, subject) in self._clear:
            return
        assert self.conditions is not None
        try:
            with self._lock:
                closed = self.conditions.close(kind, subject)
                self._clear.add((kind, subject))
            if closed is not None:
                log.info("alert resolved: %s", summary)
                self._send(self._alert(kind, RESOLVED, subject, summary, audience, None, None, closed))
        except Exception as exc:
            log.warning("alerts: could not record the end of %s for %s: %s", kind, subject, brief(exc))

    def _notice(self, event: str, subject: str, summary: str, **kwargs: Any) -> None:
        if self.enabled:
            log.info("alert: %s", summary)
            self._send(Alert(event, NOTICE, subject, summary, self.clock(), self.host, **kwargs))

    def _reminders(self, event: str, condition: Condition) -> list[WebhookSender]:
        """The webhooks whose reminder is due: a multiple of remind_every since the condition
        opened has passed since the last message about it."""
        now = self.clock()
        due = []
        for sender in self._senders:
            every = sender.webhook.remind_every_seconds
            if every is None or not subscribed(event, sender.webhook.events):
                continue
            before = (condition.notified_at - condition.opened_at).total_seconds() // every
            if (now - condition.opened_at).total_seconds() // every > before:
                due.append(sender)
        return due

    def _alert(
        self,
        event: str,
        state: str,
        subject: str,
        summary: str,
        audience: str | None,
        details: Mapping[str, Any] | None,
        fix: str | None,
        condition: Condition,
    ) -> Alert:
        return Alert(
            event, state, subject, summary, self.clock(), self.host, audience=audience,
            details=details or {}, fix=fix, opened_at=condition.opened_at,
        )  # fmt: skip

    def _send(self, alert: Alert, senders: Sequence[WebhookSender] | None = None) -> None:
        for sender in self._senders if senders is None else senders:
            if not subscribed(alert.event, sender.webhook.events):
                continue
            body = render(alert, sender.webhook.format, self._secrets)  # never the Gleap token
            sender.put(body)
