"""The soak run's settings (bench/soak.py's options; tests/test_soak.py's shorter ones) and the
outages' slots over the run."""

from __future__ import annotations

from dataclasses import dataclass

from bench.soak_analysis import Outage

# The outages, in their order, and how long each lasts (Settings' field; None: a signal).
OUTAGES = (
    ("gleap down (503)", "down_seconds"),
    ("connections refused", "refused_seconds"),
    ("store locked", "lock_seconds"),
    ("SIGHUP", None),
    ("SIGTERM + restart", None),
)


@dataclass(frozen=True)
class Settings:
    minutes: float = 120.0
    store: str = "sqlite"
    postgres_url: str = ""
    users: int = 5000
    audiences: int = 3
    churn_share: float = 0.02
    churn_seconds: float = 120.0
    interval: str = "2m"
    jitter: str = "15s"
    requests_per_minute: int = 600
    server_error: float = 0.10
    rate_limited: float = 0.05
    lost: float = 0.02
    latency: float = 0.020
    down_seconds: float = 180.0
    refused_seconds: float = 120.0
    lock_seconds: float = 40.0
    lease_seconds: int = 60
    retry_backoff: str = "30s"
    retry_backoff_max: str = "10m"
    shutdown_grace_seconds: int = 10
    sample_seconds: float = 2.0
    warmup_seconds: float | None = None
    recovery_target: float = 60.0
    recovery_wait: float = 600.0  # the next outage waits this long at most for this one's recovery
    stable_seconds: float = 30.0
    drain_seconds: float = 1800.0  # ends as soon as Gleap equals the source
    enforce_rss_flag: bool = False
    rss_target: float = 1.0
    seed: int = 1

    @property
    def warmup(self) -> float:
        if self.warmup_seconds is not None:
            return self.warmup_seconds
        return min(600.0, self.minutes * 60 / 6)

    @property
    def enforce_rss(self) -> bool:
        return self.enforce_rss_flag or self.minutes >= 60


def plan(settings: Settings) -> list[Outage]:
    """The outages' slots: after the warm-up, each followed by the same gap, to the run's end."""
    durations = [getattr(settings, name) if name else 0.0 for _, name in OUTAGES]
    gap = max(0.0, settings.minutes * 60 - settings.warmup - sum(durations)) / len(OUTAGES)
    outages, at = [], settings.warmup
    for (label, _), seconds in zip(OUTAGES, durations, strict=True):
        name = f"{label} {seconds:.0f} s" if seconds else label
        outages.append(Outage(name, at, seconds))
        at += seconds + gap
    return outages
