"""Soak test: the real daemon for hours against a flaky Gleap, with outages, churn and checks.

Run from the repository root::

    python bench/soak.py --minutes 120                        # SQLite store, 2 hours
    python bench/soak.py --minutes 120 --store postgresql     # PostgreSQL (a SCRATCH db: wiped)
    python bench/soak.py --minutes 20 --json /tmp/soak.json   # shorter; the outages scale with it

It starts ``audiencesync run`` as a subprocess, with a generated config (refresh every 2 min, 600
calls a minute, ``[server] listen`` on a free port), against the Gleap stand-in
(tests/gleap_standin/) in this process, whose background faults are 10% 5xx, 5% 429 with
Retry-After, 2% answers lost after applying, and 20 ms of latency. The source is a SQLite file:
3 audiences over 5,000 users, 2% of each audience's memberships moved every 2 minutes.

Outages, spread over the run after a warm-up (10 min, or a sixth of a shorter run): Gleap down (all
503) for 3 min, connections refused for 2 min (the stand-in's listener stopped, then restarted on
the same port), the store locked for 40 s (SQLite: BEGIN EXCLUSIVE on another connection;
PostgreSQL: LOCK TABLE ... IN EXCLUSIVE MODE on every table of the store), a SIGHUP, and a SIGTERM
followed by a restart. An outage starts in its slot, but not before the one before it recovered
(or ``--recovery-wait`` passed), so that one recovery is never read across the next outage.

Every ``--sample-seconds`` it reads the daemon's RSS (/proc), ``/healthz`` and the pending changes
(``/metrics``). After the run, churn stops and the daemon is given ``--drain-seconds`` to deliver
everything; then every user's audience booleans in Gleap must be the source's, and the daemon's
logs must hold no traceback.

It prints the recovery after each outage (from its end until /healthz is 200 ``ok``, delivery goes
on: a call acknowledged, or nothing pending, and /healthz stays ok ``--stable-seconds``), the RSS at
the start, after the warm-up and at the end, the RSS slope after the warm-up (MB/h, least squares,
per daemon process), the mismatches and the tracebacks; ``--json FILE`` writes it all. The exit
status is 1 when a target is missed: each recovery <= 60 s, 0 mismatches, 0 tracebacks, the daemon
never dying on its own and exiting 0 on SIGTERM, and (with ``--minutes`` >= 60, or
``--enforce-rss``) a slope <= 1 MB/h. tests/test_soak.py runs the same harness for ~3 minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import os
import tempfile

from bench.soak_plan import Settings
from bench.soak_run import Summary, run
from tests import postgres_guard

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/soak_test"


def print_summary(summary: Summary) -> None:
    s = summary.settings
    print(
        f"\nsoak: {summary.seconds / 60:.1f} min on {s.store}, {s.users:,} users x {s.audiences} audiences, "
        f"{s.churn_share:.0%} moved every {s.churn_seconds:.0f} s; Gleap faults {s.server_error:.0%} 5xx, "
        f"{s.rate_limited:.0%} 429, {s.lost:.0%} lost, {s.latency * 1000:.0f} ms; "
        f"{s.requests_per_minute}/min; work dir {summary.workdir}\n"
    )
    print(f"{'outage':<28} {'start s':>8} {'end s':>8} {'recovery':>10}  notes")
    for outage in summary.outages:
        recovery = outage.recovery
        shown = f"{recovery:.1f} s" if recovery is not None else "none"
        verdict = "ok" if recovery is not None and recovery <= s.recovery_target else "MISSED"
        start = f"{outage.start:.0f}" if outage.start is not None else "-"
        end = f"{outage.end:.0f}" if outage.end is not None else "-"
        notes = "; ".join([*outage.notes, *([f"{outage.relapses} relapses"] if outage.relapses else [])])
        print(f"{outage.name:<28} {start:>8} {end:>8} {shown:>10}  {verdict} {notes}")
    rss = summary.rss
    print(
        f"\nRSS MB: start {rss['start']}, after warm-up ({s.warmup / 60:.1f} min) {rss['warm']}, "
        f"end {rss['end']}; "
        f"slope after warm-up {rss['slope_mb_per_hour']} MB/h over {rss['samples']} samples "
        f"(target <= {s.rss_target} MB/h, {'enforced' if s.enforce_rss else 'reported only'})"
    )
    levels = "; ".join(f"{label} {level}" for label, level in rss.get("levels", []))
    print(f"RSS MB, the median of each stretch from its start to the next one's: {levels}")
    print(f"identify answers at the stand-in: {summary.answers}")
    print(f"churn: {summary.churns} rounds, {summary.moved:,} memberships moved")
    print(
        f"mismatches: {summary.mismatches} (drain {summary.drain_seconds:.0f} s"
        f"{'' if summary.drained else ', deadline reached'})"
        + (f"; e.g. {summary.mismatch_examples}" if summary.mismatches else "")
    )
    for event in summary.daemon_events:
        print(event)
    print(f"tracebacks: {len(summary.tracebacks)}")
    for line in summary.tracebacks[:10]:
        print(f"  {line}")
    print("\nresult: " + ("PASS" if not summary.problems else "FAIL"))
    for problem in summary.problems:
        print(f"MISSED: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    d = Settings()
    parser.add_argument("--minutes", type=float, default=d.minutes, help="churn and outages this long")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default=d.store)
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("AUDIENCESYNC_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="with --store postgresql: a scratch database, wiped (default: "
        "$AUDIENCESYNC_TEST_POSTGRES_URL, else %(default)s)",
    )
    parser.add_argument("--users", type=int, default=d.users)
    parser.add_argument("--audiences", type=int, default=d.audiences)
    parser.add_argument("--churn-share", type=float, default=d.churn_share)
    parser.add_argument("--churn-seconds", type=float, default=d.churn_seconds)
    parser.add_argument("--interval", default=d.interval, help="the daemon's [schedule] interval")
    parser.add_argument("--jitter", default=d.jitter)
    parser.add_argument("--requests-per-minute", type=int, default=d.requests_per_minute)
    parser.add_argument("--server-error", type=float, default=d.server_error, help="share answered 5xx")
    parser.add_argument("--rate-limited", type=float, default=d.rate_limited, help="share answered 429")
    parser.add_argument("--lost", type=float, default=d.lost, help="share applied with the answer lost")
    parser.add_argument("--latency", type=float, default=d.latency, help="seconds per identify answer")
    parser.add_argument("--down-seconds", type=float, default=d.down_seconds)
    parser.add_argument("--refused-seconds", type=float, default=d.refused_seconds)
    parser.add_argument("--lock-seconds", type=float, default=d.lock_seconds)
    parser.add_argument("--lease-seconds", type=int, default=d.lease_seconds)
    parser.add_argument("--retry-backoff", default=d.retry_backoff, help="the daemon's [sync] retry_backoff")
    parser.add_argument("--retry-backoff-max", default=d.retry_backoff_max)
    parser.add_argument("--shutdown-grace-seconds", type=int, default=d.shutdown_grace_seconds)
    parser.add_argument("--sample-seconds", type=float, default=d.sample_seconds)
    parser.add_argument("--warmup-seconds", type=float, help="default: 10 min, or a sixth of a shorter run")
    parser.add_argument("--recovery-target", type=float, default=d.recovery_target)
    parser.add_argument("--recovery-wait", type=float, default=d.recovery_wait)
    parser.add_argument("--stable-seconds", type=float, default=d.stable_seconds)
    parser.add_argument("--drain-seconds", type=float, default=d.drain_seconds)
    parser.add_argument("--enforce-rss", action="store_true", help="enforce the RSS slope on a short run too")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workdir", type=Path, help="default: a new directory under $TMPDIR, kept")
    parser.add_argument("--json", type=Path, help="write the summary there")
    args = parser.parse_args(argv)
    if args.store == "postgresql" and (refusal := postgres_guard.refusal(args.postgres_url)):
        parser.error(refusal)
    settings = dataclasses.replace(
        d,
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(Settings)
            if getattr(args, f.name, None) is not None
        },
        enforce_rss_flag=args.enforce_rss,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary = run(settings, workdir, progress=lambda line: print(line, flush=True))
    print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary.as_json(), indent=2))
    return 1 if summary.problems else 0


if __name__ == "__main__":
    sys.exit(main())
