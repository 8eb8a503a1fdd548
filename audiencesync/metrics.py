"""Prometheus metrics of the daemon, in a registry of its own.

Counters and the cycle-duration histogram are updated as things happen.
Per-audience gauges (members, pending, failed, last success) are read from
the store at scrape time, so they are right whichever process changed them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from audiencesync.store import AudienceStatus, Outcome


class Metrics:
    def __init__(self, status: Callable[[], Sequence[AudienceStatus]]) -> None:
        self.registry = CollectorRegistry()
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
        self.retries = Counter("audiencesync_retries", "Retried identify attempts.", registry=self.registry)
        self.rate_limited = Counter(
            "audiencesync_rate_limited", "Identify attempts Gleap answered 429.", registry=self.registry
        )
        self.cycle_duration = Histogram(
            "audiencesync_cycle_duration_seconds",
            "Time to refresh an audience from its source.",
            ["audience"],
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(status))

    def outcomes(self, outcomes: Iterable[Outcome]) -> None:
        for outcome in outcomes:
            self.identify_calls.labels(str(outcome.status)).inc()
            self.retries.inc(outcome.retries)
            self.rate_limited.inc(outcome.rate_limited)


class _StoreCollector(Collector):
    def __init__(self, status: Callable[[], Sequence[AudienceStatus]]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        rows = self._status()
        gauges = {
            "members": GaugeMetricFamily("audiencesync_members", "Current members.", labels=["audience"]),
            "pending": GaugeMetricFamily(
                "audiencesync_pending_changes", "Changes not yet acknowledged by Gleap.", labels=["audience"]
            ),
            "parked": GaugeMetricFamily(
                "audiencesync_failed_changes",
                "Changes parked after repeated rejections.",
                labels=["audience"],
            ),
        }
        last_success = GaugeMetricFamily(
            "audiencesync_last_success_timestamp_seconds",
            "When the audience was last refreshed successfully (Unix time).",
            labels=["audience"],
        )
        for row in rows:
            gauges["members"].add_metric([row.key], row.members)
            gauges["pending"].add_metric([row.key], row.pending)
            gauges["parked"].add_metric([row.key], row.parked)
            if row.refreshed_at is not None:
                last_success.add_metric([row.key], row.refreshed_at.timestamp())
        yield from gauges.values()
        yield last_success

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: don't query the store at registration
