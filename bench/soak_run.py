"""The soak run itself (``bench/soak.py`` is its command line, tests/test_soak.py its short form):
the daemon, the stand-in, churn and sampling threads, the outages in their slots, the drain and the
checks."""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import soak_world as world
from bench.soak_analysis import (
    Outage,
    Sample,
    first_signs,
    mb,
    recovery,
    rss_at,
    rss_levels,
    rss_slope,
    write_samples,
)
from bench.soak_plan import Settings, plan
from tests.gleap_standin import BackgroundFaults, GleapStandIn


@dataclass
class Summary:
    settings: Settings
    workdir: Path
    seconds: float = 0.0
    outages: list[Outage] = field(default_factory=list)
    rss: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)
    churns: int = 0
    moved: int = 0
    mismatches: int = -1
    mismatch_examples: list[Any] = field(default_factory=list)
    drained: bool = False
    drain_seconds: float = 0.0
    tracebacks: list[str] = field(default_factory=list)
    daemon_events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["settings"] = dataclasses.asdict(self.settings) | {
            "warmup": self.settings.warmup,
            "enforce_rss": self.settings.enforce_rss,
            # A password in the URL stays out of a file that may be shared.
            "postgres_url": self.settings.postgres_url
            and sa.make_url(self.settings.postgres_url).render_as_string(hide_password=True),
        }
        data["workdir"] = str(self.workdir)
        data["passed"] = not self.problems
        for outage, raw in zip(self.outages, data["outages"], strict=True):
            raw["recovery"] = outage.recovery
        return data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Soak:
    def __init__(self, settings: Settings, workdir: Path, progress: Callable[[str], None]) -> None:
        self.s = settings
        self.workdir = workdir
        self.say = progress
        self.summary = Summary(settings, workdir)
        self.t0 = time.monotonic()
        self.wall0 = time.time()  # to place the daemon's log lines on the run's clock
        self.samples: list[Sample] = []
        self.stop = threading.Event()  # the samplers and the churn
        self.churning = threading.Event()
        self._daemon_lock = threading.Lock()
        self.daemon: world.Daemon | None = None
        self.daemons: list[world.Daemon] = []
        self.stopping_daemon = False  # set while the harness itself stops the daemon
        self.port = free_port()
        self.standin = GleapStandIn(
            world.TOKEN, rate_limit_per_minute=1000, latency_seconds=settings.latency, keep_log=False
        )

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- set-up ---------------------------------------------------------------------------------

    def prepare(self) -> Path:
        s = self.s
        self.source = world.Source(self.workdir / "source.db", s.users, s.audiences, s.seed)
        if s.store == "sqlite":
            store_url = f"sqlite:///{self.workdir / 'store.db'}"
        else:
            store_url = s.postgres_url
            world.reset_postgres(store_url)
        self.store_url = store_url
        self.standin.start()
        self.standin.set_background_faults(
            BackgroundFaults(
                server_error=s.server_error, rate_limited=s.rate_limited, lost=s.lost, seed=s.seed
            )
        )
        config = world.write_config(
            self.workdir / "soak.toml",
            world.DaemonConfig(
                store_url=store_url,
                gleap_url=self.standin.base_url,
                listen_port=self.port,
                requests_per_minute=s.requests_per_minute,
                interval=s.interval,
                jitter=s.jitter,
                lease_seconds=s.lease_seconds,
                retry_backoff=s.retry_backoff,
                retry_backoff_max=s.retry_backoff_max,
                shutdown_grace_seconds=s.shutdown_grace_seconds,
                timeout_seconds=10,
            ),
            self.source,
        )
        upgraded = world.cli(config, "db", "upgrade")
        if upgraded.returncode != 0:
            raise RuntimeError(f"db upgrade failed: {upgraded.stderr}")
        return config

    def start_daemon(self) -> world.Daemon:
        daemon = world.Daemon(self.config, self.workdir / f"daemon{len(self.daemons)}.log")
        with self._daemon_lock:
            self.daemon = daemon
            self.daemons.append(daemon)
        self.say(f"{self.now():7.1f} s  daemon started, pid {daemon.pid}")
        return daemon

    # -- background threads ---------------------------------------------------------------------

    def sample_loop(self) -> None:
        while not self.stop.is_set():
            with self._daemon_lock:
                daemon = self.daemon
            rss = daemon.rss_mb() if daemon is not None else None
            status, health = world.healthz(self.port)
            pending = world.pending(self.port) if status is not None else None
            acked = sum(
                n
                for (kind, code), n in self.standin.answer_counts().items()
                if kind == "identify" and 200 <= code < 300
            )
            pid = daemon.pid if daemon is not None else None
            self.samples.append(Sample(self.now(), pid, rss, status, health, pending, acked))
            with self._daemon_lock:
                # Not the harness's own SIGTERM, nor a daemon already replaced since it was read.
                died = (
                    daemon is not None
                    and daemon is self.daemon
                    and not self.stopping_daemon
                    and daemon.process.poll() is not None
                )
            if died and daemon is not None:
                code = daemon.process.returncode
                self.summary.problems.append(
                    f"the daemon exited on its own (status {code}) at {self.now():.0f} s"
                )
                self.say(f"{self.now():7.1f} s  the daemon exited on its own, status {code}; restarting it")
                self.start_daemon()
            self.stop.wait(self.s.sample_seconds)

    def churn_loop(self) -> None:
        while not self.stop.wait(self.s.churn_seconds) and self.churning.is_set():
            moved = self.source.churn(self.s.churn_share)
            self.summary.churns += 1
            self.summary.moved += moved

    # -- outages --------------------------------------------------------------------------------

    def wait_until(self, at: float) -> None:
        self.stop.wait(max(0.0, at - self.now()))

    def run_outage(self, outage: Outage) -> None:
        label = outage.name
        self.say(f"{self.now():7.1f} s  outage: {label}")
        outage.start = self.now()
        if label.startswith("gleap down"):
            self.standin.set_down(503)
            self.wait_until(outage.start + outage.seconds)
            self.standin.set_down(None)
        elif label.startswith("connections refused"):
            self.standin.stop()
            self.wait_until(outage.start + outage.seconds)
            self.restart_standin(outage)
        elif label.startswith("store locked"):
            acquired = threading.Event()
            holder = threading.Thread(
                target=world.StoreLock(self.store_url).hold, args=(outage.seconds, acquired), daemon=True
            )
            holder.start()
            if not acquired.wait(120):
                outage.notes.append("the lock was not acquired within 120 s")
            outage.start = self.now()
            holder.join()
        elif label == "SIGHUP":
            assert self.daemon is not None
            self.daemon.process.send_signal(signal.SIGHUP)
        elif label.startswith("SIGTERM"):
            assert self.daemon is not None
            with self._daemon_lock:
                self.stopping_daemon = True
            status, seconds = self.daemon.terminate(self.s.shutdown_grace_seconds + 60)
            outage.notes.append(f"exit status {status} after {seconds:.1f} s")
            if status != 0:
                self.summary.problems.append(f"the daemon's SIGTERM exit status was {status}, not 0")
            self.start_daemon()
            with self._daemon_lock:
                self.stopping_daemon = False
        outage.end = self.now()
        self.say(f"{self.now():7.1f} s  outage over: {label}")

    def restart_standin(self, outage: Outage) -> None:
        """Listen on the same port again; another process may have taken it meanwhile (rare: it is
        an ephemeral port), so try for a while before giving up on the run."""
        deadline = time.monotonic() + 60
        while True:
            try:
                self.standin.start()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise
                outage.notes.append(f"the stand-in could not listen again at once: {exc}")
                self.stop.wait(1)

    def await_recovery(self, outage: Outage, until: float) -> None:
        """Wait for the outage's recovery (poll the samples), until ``until`` at the latest."""
        assert outage.end is not None
        while self.now() < until:
            found, _ = recovery(self.samples, outage.end, self.now(), self.s.stable_seconds, accept_cut=False)
            if found is not None:
                return
            self.stop.wait(self.s.sample_seconds)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> Summary:
        s = self.s
        self.config = self.prepare()
        self.say(f"work dir {self.workdir}; stand-in {self.standin.base_url}; /healthz on port {self.port}")
        self.start_daemon()
        threads = [threading.Thread(target=f, daemon=True) for f in (self.sample_loop, self.churn_loop)]
        self.churning.set()
        for thread in threads:
            thread.start()
        outages = plan(s)
        self.summary.outages = outages
        for outage in outages:
            self.wait_until(outage.planned)
            self.run_outage(outage)
            assert outage.end is not None
            # The next outage waits for this one's recovery, but no longer than recovery_wait.
            self.await_recovery(outage, outage.end + s.recovery_wait)
        self.wait_until(s.minutes * 60)
        self.churning.clear()
        self.drain()
        self.stop.set()
        for thread in threads:
            thread.join(timeout=30)
        self.finish(outages)
        return self.summary

    def drain(self) -> None:
        started = self.now()
        self.say(f"{started:7.1f} s  churn stopped; draining (at most {self.s.drain_seconds:.0f} s)")
        wrong = self.source.mismatches(self.standin.contacts)
        while wrong and self.now() - started < self.s.drain_seconds:
            self.stop.wait(max(self.s.sample_seconds, 2.0))
            wrong = self.source.mismatches(self.standin.contacts)
        self.summary.drained = not wrong
        self.summary.drain_seconds = self.now() - started
        self.summary.mismatches = len(wrong)
        self.summary.mismatch_examples = wrong[:5]
        self.say(f"{self.now():7.1f} s  drained: {len(wrong)} mismatches")

    def finish(self, outages: list[Outage]) -> None:
        s, summary = self.s, self.summary
        summary.seconds = self.now()
        if self.daemon is not None:
            with self._daemon_lock:
                self.stopping_daemon = True
            status, seconds = self.daemon.terminate(s.shutdown_grace_seconds + 60)
            summary.daemon_events.append(f"final SIGTERM: exit status {status} after {seconds:.1f} s")
            if status != 0:
                summary.problems.append(f"the daemon's final SIGTERM exit status was {status}, not 0")
        self.standin.stop()
        samples = self.samples
        write_samples(self.workdir / "samples.csv", samples)
        logged = [
            (at - self.wall0, line) for at, line in world.problems_logged([d.log for d in self.daemons])
        ]
        for n, outage in enumerate(outages):
            if outage.end is None:
                continue
            following = outages[n + 1].start if n + 1 < len(outages) else None
            until = following if following is not None else summary.seconds
            outage.recovered, outage.relapses = recovery(samples, outage.end, until, s.stable_seconds)
            outage.notes += first_signs(samples, outage.end, until)
            during = [line for at, line in logged if (outage.start or outage.end) <= at <= until]
            if during:
                outage.notes.append(f"{len(during)} warnings/errors logged, first: {during[0][:160]}")
            if outage.recovery is None or outage.recovery > s.recovery_target:
                shown = (
                    f"{outage.recovery:.0f} s"
                    if outage.recovery is not None
                    else f"none within {until - outage.end:.0f} s"
                )
                summary.problems.append(
                    f"recovery after '{outage.name}': {shown} (target <= {s.recovery_target:.0f} s)"
                )
        slope, count = rss_slope(samples, s.warmup)
        last = next((x.rss_mb for x in reversed(samples) if x.rss_mb is not None), None)
        # The start: once the daemon serves (before, the interpreter is still importing).
        serving = next((x.at for x in samples if x.healthz is not None), 0.0)
        summary.rss = {
            "start": mb(rss_at(samples, serving)),
            "warm": mb(rss_at(samples, s.warmup)),
            "end": mb(last),
            "slope_mb_per_hour": None if slope is None else round(slope, 2),
            "samples": count,
            # The median of each stretch: the warm-up, then from each outage's start to the next's.
            "levels": [
                (label, mb(level))
                for label, level in rss_levels(
                    samples,
                    [("warm-up", 0.0)] + [(o.name, o.start) for o in outages if o.start is not None],
                )
            ],
        }
        if s.enforce_rss and (slope is None or slope > s.rss_target):
            summary.problems.append(f"RSS slope {slope} MB/h after warm-up (target <= {s.rss_target})")
        answers = self.standin.answer_counts()
        summary.answers = {f"{kind} {code}": n for (kind, code), n in sorted(answers.items())}
        if summary.mismatches:
            summary.problems.append(
                f"{summary.mismatches} mismatches between Gleap and the source after the drain"
            )
        for daemon in self.daemons:
            summary.tracebacks += [f"{daemon.log.name}: {line}" for line in world.tracebacks(daemon.log)]
        if summary.tracebacks:
            summary.problems.append(f"{len(summary.tracebacks)} tracebacks in the daemon's logs")

    def cleanup(self) -> None:
        self.stop.set()
        for daemon in self.daemons:
            daemon.kill()
        self.standin.stop()


def run(settings: Settings, workdir: Path, progress: Callable[[str], None] = lambda _: None) -> Summary:
    soak = Soak(settings, workdir, progress)
    try:
        return soak.run()
    finally:
        soak.cleanup()
