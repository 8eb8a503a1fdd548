"""Prometheus metrics of the daemon, in a registry of its own.

Counters and the cycle-duration histogram are updated as things happen.
Per-audience gauges (members, pending, parked, last success) are read from
the store at scrape time, so they are right whichever process changed them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from audiencesync.alerts import attention as attention_mod
from audiencesync.gleap.breaker import CLOSED, STATE_VALUES
from audiencesync.gleap.client import Answer
from audiencesync.lifecycle import states as lifecycle
from audiencesync.lifecycle.prune import PruneRecord
from audiencesync.store.store import AudienceStatus, Clock, Outcome, utc_now

# The last prune that finished, and the latest `before` of any prune (history is whole from there).
Prunes = Callable[[], tuple[PruneRecord | None, datetime | None]]
# Each configured key's state (lifecycle.states): read at each scrape, so a reload shows at once.
States = Callable[[], Mapping[str, str]]
# What needs a person now (attention.py): the same reading as /healthz, `status` and the web page.
Attentions = Callable[[], attention_mod.Attention]


class Metrics:
    def __init__(
        self,
        status: Callable[[], Sequence[AudienceStatus]],
        clock: Clock = utc_now,
        prunes: Prunes = lambda: (None, None),
        states: States | None = None,
        attention: Attentions | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.breaker_open = Gauge(
            "audiencesync_gleap_breaker_open",
            "1 while delivery is paused because Gleap is unavailable (circuit breaker open or "
            "half-open, probing), else 0.",
            registry=self.registry,
        )
        self.breaker_state = Gauge(
            "audiencesync_gleap_breaker_state",
            "Gleap's circuit breaker: 0 closed, 1 open, 2 half-open (trial calls after an outage).",
            registry=self.registry,
        )
        self.cycles = Counter(
            "audiencesync_cycles",
            "Audience refresh cycles, by audience and result.",
            ["audience", "result"],
            registry=self.registry,
        )
        self.identify_calls = Counter(
            "audiencesync_identify_calls",
            "Identify calls answered by Gleap, by HTTP status (0: no answer).",
            ["status"],
            registry=self.registry,
        )
        self.track_calls = Counter(
            "audiencesync_track_calls",
            "Track calls (event batches) answered by Gleap, by HTTP status (0: no answer).",
            ["status"],
            registry=self.registry,
        )
        self.track_events = Counter(
            "audiencesync_track_events",
            "Audience Entered/Exited events carried by the track calls answered, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "audiencesync_retries", "Retried identify and track attempts.", registry=self.registry
        )
        self.rate_limited = Counter(
            "audiencesync_rate_limited",
            "Identify and track attempts Gleap answered 429.",
            registry=self.registry,
        )
        self.cycle_duration = Histogram(
            "audiencesync_cycle_duration_seconds",
            "Time to refresh an audience from its source.",
            ["audience"],
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
            registry=self.registry,
        )
        self.pruned_rows = Counter(
            "audiencesync_pruned_rows",
            "Rows this daemon's retention deleted, by table.",
            ["table"],
            registry=self.registry,
        )
        self.prune_failures = Counter(
            "audiencesync_prune_failures",
            "Prunes of this daemon's retention that failed (tried again after a backoff).",
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(status, clock, states))
        self.registry.register(_PruneCollector(prunes))
        if attention is not None:
            self.registry.register(_AttentionCollector(attention))

    def breaker(self, state: str) -> None:
        """The daemon's circuit breaker changed state (breaker.CLOSED, OPEN or HALF_OPEN)."""
        self.breaker_open.set(0 if state == CLOSED else 1)
        self.breaker_state.set(STATE_VALUES[state])

    def outcomes(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.identify_calls.labels(str(outcome.status)).inc()
            self.retries.inc(outcome.retries)
            self.rate_limited.inc(outcome.rate_limited)

    def track(self, answer: Answer, events: int) -> None:
        """One track call's answer (a batch refused whole, then split, counts each request)."""
        self.track_calls.labels(str(answer.status)).inc()
        self.track_events.labels(str(answer.status)).inc(events)
        self.retries.inc(answer.retries)
        self.rate_limited.inc(answer.rate_limited)


class _StoreCollector(Collector):
    def __init__(
        self, status: Callable[[], Sequence[AudienceStatus]], clock: Clock, states: States | None
    ) -> None:
        self._status = status
        self._clock = clock
        self._states = states

    def collect(self) -> Iterable[Metric]:
        rows = self._status()
        now = self._clock()
        known = self._states() if self._states is not None else None
        retired = GaugeMetricFamily(
            "audiencesync_retired_members",
            "Members a retired key (in the store, in no config) still holds; `audiencesync retire` "
            "clears them.",
            labels=["audience"],
        )
        retired_pending = GaugeMetricFamily(
            "audiencesync_retired_pending_changes",
            "Changes a retired key still owes Gleap; nothing delivers them but `audiencesync retire`.",
            labels=["audience"],
        )
        gauges = {
            "members": GaugeMetricFamily("audiencesync_members", "Current members.", labels=["audience"]),
            "pending": GaugeMetricFamily(
                "audiencesync_pending_changes", "Changes not yet acknowledged by Gleap.", labels=["audience"]
            ),
            "parked": GaugeMetricFamily(
                "audiencesync_parked_changes",
                "Changes parked after repeated rejections (`audiencesync failures` lists them).",
                labels=["audience"],
            ),
            # The old names of the two parked gauges, kept while dashboards move (README: deprecated).
            "parked_old": GaugeMetricFamily(
                "audiencesync_failed_changes",
                "Deprecated: the same as audiencesync_parked_changes.",
                labels=["audience"],
            ),
            "unknown": GaugeMetricFamily(
                "audiencesync_unknown_outcome_changes",
                "Changes whose last call got no verdict (pending until one comes).",
                labels=["audience"],
            ),
            "fields_pending": GaugeMetricFamily(
                "audiencesync_pending_field_changes",
                "Members owed a call because Gleap has not acknowledged their contact fields.",
                labels=["audience"],
            ),
            "events_pending": GaugeMetricFamily(
                "audiencesync_pending_events",
                "Audience Entered/Exited events owed to Gleap (not parked).",
                labels=["audience"],
            ),
            "events_parked": GaugeMetricFamily(
                "audiencesync_parked_events",
                "Audience Entered/Exited events parked after repeated rejections.",
                labels=["audience"],
            ),
            "events_parked_old": GaugeMetricFamily(
                "audiencesync_failed_events",
                "Deprecated: the same as audiencesync_parked_events.",
                labels=["audience"],
            ),
        }
        oldest = GaugeMetricFamily(
            "audiencesync_oldest_pending_change_age_seconds",
            "Age of the oldest change not yet acknowledged (0 when none is pending).",
            labels=["audience"],
        )
        last_success = GaugeMetricFamily(
            "audiencesync_last_success_timestamp_seconds",
            "When the audience was last refreshed successfully (Unix time).",
            labels=["audience"],
        )
        last_run = {
            "field_warnings": GaugeMetricFamily(
                "audiencesync_last_run_field_warnings",
                "Contact fields the audience's last run skipped for a value of the wrong type.",
                labels=["audience"],
            ),
            "field_conflicts": GaugeMetricFamily(
                "audiencesync_last_run_field_conflicts",
                "Fields the audience's last run sent with the value of an audience listed before it.",
                labels=["audience"],
            ),
        }
        kinds = GaugeMetricFamily(
            "audiencesync_property_info",
            "1 per synced key: whether it is an audience or a trait (the other gauges' audience label), "
            "and its state: live, paused (enabled = false), or renamed (an old key still owed).",
            labels=["audience", "kind", "state"],
        )
        for row in rows:
            state = lifecycle.LIVE if known is None else lifecycle.state_of(row.key, known)
            if state == lifecycle.RETIRED:
                # Not live: no gauge of the live ones (an alert on pending or age must not fire for it).
                retired.add_metric([row.key], row.members)
                retired_pending.add_metric([row.key], row.pending)
                continue
            kinds.add_metric([row.key, row.kind, state], 1)
            gauges["members"].add_metric([row.key], row.members)
            gauges["pending"].add_metric([row.key], row.pending)
            gauges["parked"].add_metric([row.key], row.parked)
            gauges["parked_old"].add_metric([row.key], row.parked)
            gauges["unknown"].add_metric([row.key], row.unknown)
            gauges["fields_pending"].add_metric([row.key], row.fields_pending)
            gauges["events_pending"].add_metric([row.key], row.events_pending)
            gauges["events_parked"].add_metric([row.key], row.events_parked)
            gauges["events_parked_old"].add_metric([row.key], row.events_parked)
            age = (now - row.oldest_pending_at).total_seconds() if row.oldest_pending_at else 0.0
            oldest.add_metric([row.key], max(0.0, age))
            if row.refreshed_at is not None:
                last_success.add_metric([row.key], row.refreshed_at.timestamp())
            for name, gauge in last_run.items():
                if row.last_run is not None and row.kind == "audience":
                    gauge.add_metric([row.key], row.last_run.get(name) or 0)
        yield from gauges.values()
        yield from last_run.values()
        yield oldest
        yield last_success
        yield kinds
        yield retired
        yield retired_pending

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: don't query the store at registration


class _AttentionCollector(Collector):
    """A gauge per condition and audience, 0 or 1, from the one reading every surface shows
    (attention.py): an alert rule on it fires for exactly what the alerts and /healthz report."""

    def __init__(self, attention: Attentions) -> None:
        self._attention = attention

    def collect(self) -> Iterable[Metric]:
        seen = self._attention()
        condition = GaugeMetricFamily(
            "audiencesync_condition",
            "1 while a condition that needs a person is open, else 0 (attention.py): per audience "
            f'({", ".join(attention_mod.PROPERTY_CONDITIONS)}), and with audience="" for the whole '
            f"daemon ({', '.join(attention_mod.DAEMON_CONDITIONS)}).",
            labels=["condition", "audience"],
        )
        open_ = seen.open()
        for state in attention_mod.DAEMON_CONDITIONS:
            condition.add_metric([state, ""], 1 if (state, None) in open_ else 0)
        for key, verdict in seen.properties.items():
            if verdict.state in (attention_mod.PAUSED, attention_mod.RETIRED):
                continue  # nothing runs it: no condition can open or end
            for state in attention_mod.PROPERTY_CONDITIONS:
                condition.add_metric([state, key], 1 if (state, key) in open_ else 0)
        healthy = GaugeMetricFamily(
            "audiencesync_healthy",
            "1 while /healthz answers 200 (no condition of the whole daemon is failing), else 0.",
        )
        healthy.add_metric([], 1 if seen.healthy else 0)
        yield condition
        yield healthy

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: don't query the store at registration


class _PruneCollector(Collector):
    """When the store was last pruned, by whichever process: read from the store at scrape time."""

    def __init__(self, prunes: Prunes) -> None:
        self._prunes = prunes

    def collect(self) -> Iterable[Metric]:
        last, exact_from = self._prunes()
        finished = GaugeMetricFamily(
            "audiencesync_last_prune_timestamp_seconds",
            "When the last prune that finished ended (Unix time); absent if the store was never pruned.",
        )
        before = GaugeMetricFamily(
            "audiencesync_pruned_before_timestamp_seconds",
            "History before this time may have been pruned (Unix time): members at earlier times "
            "can't be rebuilt.",
        )
        if last is not None and last.finished_at is not None:
            finished.add_metric([], last.finished_at.timestamp())
        if exact_from is not None:
            before.add_metric([], exact_from.timestamp())
        yield finished
        yield before

    def describe(self) -> Iterable[Metric]:
        return []
