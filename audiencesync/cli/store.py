"""The commands that look at or tend the store: status, failures, retry, check, db."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from audiencesync.alerts import attention as attention_mod
from audiencesync.alerts.attention import Verdict
from audiencesync.cli.formats import write_rows
from audiencesync.cli.output import EXIT_INCOMPLETE, EXIT_OK, iso, open_store, when
from audiencesync.cli.prune import prune_status
from audiencesync.cli.tables import Layout
from audiencesync.config.loading import Config, Secret, display_url
from audiencesync.errors import (
    AudienceSyncError,
    ConfigError,
    MissingTokenError,
)
from audiencesync.gleap.client import GleapClient
from audiencesync.lifecycle import states as lifecycle
from audiencesync.lifecycle.prune import Pruner
from audiencesync.refresh.sources import Sources
from audiencesync.store import store


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    """Each part an admin sets up, checked on its own: one line each, all of them even if one fails."""
    results: list[tuple[str, str | None]] = [(f"config {config.path}", None)]
    try:
        # Never create=True: a check must leave no new store file behind.
        engine = store.engine_for(config.store)
    except AudienceSyncError as exc:
        results.append((f"store {display_url(config.store.url)}", str(exc)))
    else:
        try:
            current, head = store.schema_revisions(engine)
            state = (
                "up to date"
                if current == head
                else f"at {current or 'no schema'}; `sync` migrates it to {head}"
            )
            results.append((f"store {display_url(config.store.url)} ({state})", None))
        except AudienceSyncError as exc:
            results.append((f"store {display_url(config.store.url)}", str(exc)))
        finally:
            engine.dispose()
    sources = Sources(config.sources)
    for audience in config.properties:
        paused = "" if audience.enabled else "; paused"
        what = f"{audience.kind} {audience.key} (source {audience.source}{paused})"
        try:
            sources.check(audience)
            results.append((what, None))
        except AudienceSyncError as exc:
            results.append((what, str(exc)))
    sources.dispose()
    token = config.gleap.api_token
    if token is None:
        results.append(("gleap token", str(MissingTokenError(MissingTokenError.SYNC_DRY_RUN))))
    else:
        try:
            asyncio.run(_check_token(config, token))
            results.append((f"gleap token at {config.gleap.base_url}", None))
        except AudienceSyncError as exc:
            results.append((f"gleap token at {config.gleap.base_url}", str(exc)))
    for what, problem in results:
        print(f"{'FAIL' if problem else 'ok':4}  {what}" + (f"\n      {problem}" if problem else ""))
    return EXIT_INCOMPLETE if any(problem for _, problem in results) else EXIT_OK


async def _check_token(config: Config, token: Secret) -> None:
    async with GleapClient(config.gleap, token) as client:
        await client.check_token()


STATUS_COLUMNS = (
    "audience", "condition", "members", "pending", "parked", "unknown", "oldest_pending", "last_run",
    "result", "entered", "left", "sent", "next_run", "configured", "events_pending", "events_parked",
    "kind",
    "fields_pending", "field_warnings", "field_conflicts", "state",
)  # fmt: skip
# The table shows the state as its sections instead (live, then paused, then retired).
TABLE_COLUMNS = STATUS_COLUMNS[:-1]
RETIRED_COLUMNS = ("audience", "kind", "members", "pending", "parked", "unknown", "last_run", "result")
# On a terminal too narrow for every column: the audience, its condition and its last run's
# result always, then the last run's time (whole), then the counts.
STATUS_LAYOUT = Layout(
    keep=("audience", "condition", "result"), first=("last_run", "members", "pending", "parked")
)
RETIRED_LAYOUT = Layout(keep=("audience", "result"), first=("last_run", "pending", "parked"))


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    target = open_store(config)
    current, head = store.schema_revisions(target.engine)
    rows: list[store.AudienceStatus] = []
    holder = None
    attention = attention_mod.assess([], [], {}, None, store.utc_now())
    if current is None:
        print("the store is empty: no sync has run yet", file=sys.stderr)
    else:
        with target.engine.connect() as conn:
            # One read: what the table counts and what the conditions say agree.
            attention = attention_mod.read(conn, lifecycle.states(config), store.utc_now())
        rows = target.status()
        holder = target.lease_holder()
    configured = {a.key for a in config.properties}
    known = lifecycle.states(config)
    # Retired keys (in no config) are listed apart, after the rest: nothing refreshes or delivers them.
    retired = [row for row in rows if lifecycle.state_of(row.key, known) == lifecycle.RETIRED]
    rows = [row for row in rows if lifecycle.state_of(row.key, known) != lifecycle.RETIRED]
    # A store not yet migrated has no prunes table; the next sync migrates it.
    last_prune = Pruner(target.engine, store.utc_now).last() if current == head else None
    if args.format == "json":
        # The one shape that is not a list of rows: the lease and the last prune ride along.
        data = _status_json(rows, holder, configured, known, attention) | {
            "retired": _status_json(retired, None, configured, known, attention)["audiences"],
            "last_prune": last_prune and vars(last_prune),
            "daemon": attention.daemon.as_dict(),
            "concerns": [c.as_dict() for c in attention.concerns],
        }
        print(json.dumps(data, default=iso, indent=2))
        return EXIT_OK
    verdicts = attention.properties
    if args.format == "table":
        _status_tables(rows, retired, configured, known, verdicts)
    else:
        every = [*rows, *retired]
        write_rows(
            sys.stdout,
            args.format,
            STATUS_COLUMNS,
            (_status_row(r, configured, known, verdicts) for r in every),
        )
    # The lease is not an audience: in csv and jsonl it goes aside, so stdout stays rows only.
    out = sys.stdout if args.format == "table" else sys.stderr
    if holder is None:
        print("daemon: none holds the store", file=out)
    else:
        print(
            f"{holder.get('role') or 'holder'}: {holder['host']} pid {holder['pid']}, active since "
            f"{when(holder['acquired_at'])}, last heartbeat {when(holder['renewed_at'])}, "
            f"lease to {when(holder['expires_at'])}",
            file=out,
        )
        if holder.get("health"):
            print(
                f"health: {holder['health']}; last acknowledged call {when(holder.get('progress_at'))}",
                file=out,
            )
    print(prune_status(last_prune), file=out)
    # What needs a person, each with its fix: the same conditions as /healthz, the web page,
    # /metrics and the alerts (attention.py).
    if attention.concerns:
        print("needs attention:", file=out)
        for concern in attention.concerns:
            print(f"  {concern.line()}", file=out)
    return EXIT_OK


def _status_tables(
    rows: list[store.AudienceStatus],
    retired: list[store.AudienceStatus],
    configured: set[str],
    known: dict[str, str],
    verdicts: Mapping[str, Verdict],
) -> None:
    """For people: the live properties, then a section for the paused and one for the retired."""
    paused = [row for row in rows if known.get(row.key) == lifecycle.PAUSED]
    live = [row for row in rows if known.get(row.key) != lifecycle.PAUSED]

    def table_rows(of: list[store.AudienceStatus]) -> Iterator[tuple[object, ...]]:
        return (_status_row(r, configured, known, verdicts)[:-1] for r in of)

    write_rows(sys.stdout, "table", TABLE_COLUMNS, table_rows(live), layout=STATUS_LAYOUT)
    if paused:
        print("\npaused (enabled = false: neither refreshed nor delivered; enabled = true resumes them):")
        write_rows(sys.stdout, "table", TABLE_COLUMNS, table_rows(paused), layout=STATUS_LAYOUT)
    if retired:
        print(
            "\nretired (in the store, in no config; `audiencesync retire KEY` removes the state, "
            "with --unset-in-gleap setting KEY false in Gleap first):"
        )
        write_rows(
            sys.stdout, "table", RETIRED_COLUMNS, (_retired_row(r) for r in retired), layout=RETIRED_LAYOUT
        )
        for row in retired:
            owed = row.pending + row.parked
            if row.members == 0 and owed:
                print(
                    f"{row.key}: Gleap is still owed {row.key}: false for {owed} user(s); "
                    f"`audiencesync retire {row.key} --unset-in-gleap` carries on"
                )


def _retired_row(row: store.AudienceStatus) -> tuple[object, ...]:
    last = row.last_run or {}
    return (
        row.key,
        row.kind,
        row.members,
        row.pending,
        row.parked,
        row.unknown,
        last.get("started_at"),
        last.get("status"),
    )


def _status_row(
    row: store.AudienceStatus, configured: set[str], known: dict[str, str], verdicts: Mapping[str, Verdict]
) -> tuple[object, ...]:
    last = row.last_run or {}
    paused = known.get(row.key) == lifecycle.PAUSED
    verdict = verdicts.get(row.key)
    return (
        row.key,
        attention_mod.label(verdict.state) if verdict is not None else None,
        row.members,
        row.pending,
        row.parked,
        row.unknown,
        _age(row.oldest_pending_at),
        last.get("started_at"),
        last.get("status"),
        last.get("entered"),
        last.get("left"),
        last.get("sent"),
        None if paused else row.next_run_at,  # as the daemon last planned it: not while paused
        row.key in configured,
        row.events_pending,
        row.events_parked,
        row.kind,
        row.fields_pending,
        last.get("field_warnings"),  # of the last run, as entered, left and sent are
        last.get("field_conflicts"),
        lifecycle.state_of(row.key, known),
    )


def _status_json(
    rows: list[store.AudienceStatus],
    holder: dict[str, Any] | None,
    configured: set[str],
    known: dict[str, str],
    attention: attention_mod.Attention,
) -> dict[str, Any]:
    return {
        "audiences": [
            {
                "key": row.key,
                "kind": row.kind,
                "configured": row.key in configured,
                "state": lifecycle.state_of(row.key, known),
                "condition": verdict.as_dict() if (verdict := attention.properties.get(row.key)) else None,
                "members": row.members,
                "pending": row.pending,
                "parked": row.parked,
                "unknown": row.unknown,
                "events_pending": row.events_pending,
                "events_parked": row.events_parked,
                # Deprecated aliases of parked and events_parked, for scripts written before (README).
                "failed": row.parked,
                "events_failed": row.events_parked,
                "fields_pending": row.fields_pending,
                "oldest_pending_at": row.oldest_pending_at,
                "oldest_pending_age_seconds": _age_seconds(row.oldest_pending_at),
                "refreshed_at": row.refreshed_at,
                "next_run_at": None if known.get(row.key) == lifecycle.PAUSED else row.next_run_at,
                "last_run": row.last_run,
            }
            for row in rows
        ],
        "lease": holder,
    }


def _age(since: datetime | None) -> timedelta | None:
    """How long ago ``since`` was; None when nothing is pending."""
    return None if since is None else max(timedelta(0), store.utc_now() - since)


def _age_seconds(since: datetime | None) -> float | None:
    age = _age(since)
    return None if age is None else age.total_seconds()


FAILURE_COLUMNS = ("audience", "user_id", "value", "attempts", "parked_at", "last_error")
# Gleap's answer is what a person reads the list for: a narrow terminal loses the rest first.
FAILURE_LAYOUT = Layout(keep=("audience", "user_id", "last_error"))


def cmd_failures(args: argparse.Namespace, config: Config) -> int:
    if args.audience:
        config.audience(args.audience)
    target = open_store(config)
    # It only reads: a store of another schema (none yet, older, newer) is named, not read.
    store.require_head(target.engine, "failures")
    parked = target.parked(args.audience)
    # Programs get the value itself (608.44, null, true); people the one way every surface shows it.
    machine = args.format in ("json", "jsonl")
    rows = (
        (c.audience, c.user_id, c.value if machine else c.shown, c.attempts, c.parked_at, c.last_error)
        for c in parked
    )
    write_rows(sys.stdout, args.format, FAILURE_COLUMNS, rows, layout=FAILURE_LAYOUT)
    print(
        f"{len(parked)} parked change(s)" + ("; re-queue with `audiencesync retry`" if parked else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_retry(args: argparse.Namespace, config: Config) -> int:
    if not (args.audience or args.user or args.all):
        raise ConfigError(
            "retry needs a selection", fix="pass --audience KEY, --user ID, or --all for every parked change"
        )
    if args.audience:
        config.audience(args.audience)
    target = open_store(config)
    store.schema_revisions(target.engine)
    count = target.requeue(args.audience, args.user)
    print(f"re-queued {count} change(s); the next sync sends them")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace, config: Config) -> int:
    # The one command that may create a new store.
    target = store.Store(store.engine_for(config.store, create=True))
    applied = store.upgrade(target.engine)
    _, head = store.schema_revisions(target.engine)
    where = display_url(config.store.url)
    print(f"{where}: {'upgraded to' if applied else 'already at'} schema revision {head}")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace, config: Config) -> int:
    target = open_store(config)
    current, head = store.schema_revisions(target.engine)
    state = "up to date" if current == head else f"behind; run `audiencesync db upgrade` to reach {head}"
    print(f"{display_url(config.store.url)}: schema revision {current or 'none'} ({state})")
    return EXIT_OK
