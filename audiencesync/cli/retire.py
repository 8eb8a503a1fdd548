"""`audiencesync retire KEY`: remove a key the config no longer has from the store (retire.py),
setting it false in Gleap first with --unset-in-gleap.

It only wires: refuse a key the config still uses, take the writer lease (a daemon
holding it is named, with the fix), then ``Retirer``; or, with --dry-run, only read.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from audiencesync.alerts.alerts import Alerts
from audiencesync.cli.formats import add_format_option, write_rows
from audiencesync.cli.output import (
    EXIT_GLEAP_DOWN,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    daemon_holding,
)
from audiencesync.cli.sync import Interrupt, progress_bar
from audiencesync.config.loading import Config
from audiencesync.delivery.field_winners import reconcile
from audiencesync.errors import (
    ConfigError,
    DaemonHoldsStoreError,
    GleapAuthError,
    GleapError,
    GleapUnavailableError,
    MissingTokenError,
    RetireIncompleteError,
)
from audiencesync.lifecycle import states as lifecycle
from audiencesync.lifecycle.retire import Counts, Key, Owed, Retirer
from audiencesync.refresh.sources import Sources
from audiencesync.store import store
from audiencesync.store.lease import WriterLease
from audiencesync.sync.cycle import Syncer

EPILOG = """\
The key must be in no config any more: remove its [[audiences]] or [[traits]] table first
(to stop syncing a key for a while instead, set enabled = false on it: that pauses it).

example:
  audiencesync retire churn_risk --dry-run --unset-in-gleap  # what it would send and delete
  audiencesync retire churn_risk --unset-in-gleap   # churn_risk: false in Gleap, then drop the state
  audiencesync retire churn_risk --purge            # drop state and history; Gleap keeps its values

An interrupted --unset-in-gleap (a kill, Ctrl-C, Gleap down) keeps what is still owed:
run the same command again to carry on. Exit statuses as for sync: 0 retired, 1 users
still owed the false (named in the message), 2 bad key, 4 the store is held, 5 Gleap down.
"""


def add_retire_command(commands: Any) -> None:
    retire = commands.add_parser(
        "retire",
        help="remove a key no config has from the store (--unset-in-gleap: set it false in Gleap first)",
        description="Remove the store's state of an audience or trait that is in no config any more: its "
        "memberships, pending and parked changes, and events still owed. Its history (runs, changes, calls) "
        "is kept unless --purge.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retire.add_argument("key", metavar="KEY", help="the audience's or trait's key, as `status` lists it")
    retire.add_argument(
        "--unset-in-gleap",
        action="store_true",
        help="first send KEY: false (a trait: its missing value, or null) to every user Gleap may hold it "
        "for, through the normal delivery (rate limit, retries, at least once); the state goes once "
        "Gleap acknowledged them all (default: off, Gleap keeps what it was told)",
    )
    retire.add_argument(
        "--purge",
        action="store_true",
        help="also delete the key's history: its changes, events, runs, the calls that carried it, and "
        "its row (default: off, the history stays for `audit`)",
    )
    retire.add_argument(
        "--dry-run",
        action="store_true",
        help="count what would be sent and deleted; change nothing (default: off)",
    )
    retire.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if a sync holds the store, wait this long for it (default: 0: exit 4 at once)",
    )
    add_format_option(retire)
    retire.set_defaults(handler=cmd_retire)


@dataclass
class _Outcome:
    key: Key
    deleted: Counts
    owed: int = 0  # users the unset was for
    sent: int = 0  # of them, acknowledged
    left: Owed | None = None  # still owed after the pass, when the state had to stay
    held: int = 0  # without the unset: users Gleap may still hold the key for, left as they are
    aborted: GleapError | None = None


def cmd_retire(args: argparse.Namespace, config: Config) -> int:
    _refuse_in_config(config, args.key)
    if args.unset_in_gleap and not args.dry_run and config.gleap.api_token is None:
        raise MissingTokenError()
    notes = sys.stdout if args.format == "table" else sys.stderr
    engine = store.engine_for(config.store)
    try:
        if args.dry_run:
            return _dry_run(args, engine, notes)
        store.upgrade(engine)
        daemon = daemon_holding(engine)
        if daemon is not None:
            raise DaemonHoldsStoreError(
                command=f"audiencesync retire {args.key}",
                holder=f"{daemon['host']} pid {daemon['pid']}",
                since=daemon["acquired_at"],
            )
        lease = WriterLease(engine, store.utc_now, ttl_seconds=config.sync.lease_seconds, role="sync")
        interrupt = Interrupt(Sources({}))
        with interrupt, lease.held(args.wait):
            outcome = interrupt.run(lambda: _retire(args, config, engine, lease, interrupt.stop, notes))
        if outcome.left is None:
            with contextlib.closing(Alerts.of(config, engine)) as alerts:
                alerts.retired(outcome.key.key)
    finally:
        engine.dispose()
    write_rows(sys.stdout, args.format, ("table", "deleted"), outcome.deleted.per_table())
    key = outcome.key
    if args.unset_in_gleap:
        remaining = outcome.left.rows if outcome.left is not None else 0
        print(
            f"{key.key}: {outcome.sent} of {outcome.owed} user(s) acknowledged {key.key}: {key.unset}; "
            f"{remaining} remaining",
            file=notes,
        )
    if outcome.aborted is not None:
        print(f"audiencesync: error: {outcome.aborted}", file=sys.stderr)
    if interrupt.signum is not None:
        print(
            f"audiencesync: stopped; `audiencesync retire {key.key} --unset-in-gleap` carries on",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED if interrupt.signum == signal.SIGINT else EXIT_TERMINATED
    if isinstance(outcome.aborted, GleapUnavailableError):
        return EXIT_GLEAP_DOWN
    if isinstance(outcome.aborted, GleapAuthError):
        raise outcome.aborted
    if outcome.left is not None:
        left = outcome.left
        raise RetireIncompleteError(key.key, remaining=left.rows, parked=left.parked, unknown=left.unknown)
    if outcome.held:
        print(
            f"{key.key}: Gleap keeps what it was told: {outcome.held} user(s) may still hold {key.key} "
            "there (--unset-in-gleap would have sent them the false first)",
            file=notes,
        )
    history = (
        "its history is deleted (--purge)" if args.purge else "its history is kept (`--purge` deletes it)"
    )
    print(f"retired {key.key}: its state is removed from the store; {history}", file=notes)
    return EXIT_OK


def _retire(
    args: argparse.Namespace,
    config: Config,
    engine: Engine,
    lease: WriterLease,
    stop: threading.Event,
    notes: Any,
) -> _Outcome:
    retirer = Retirer(engine, fence=lease.check)
    key = _find(retirer, args.key)
    target = store.Store(engine, fence=lease.check)
    target.mark_interrupted()  # a run a killed retire (or sync) left open
    # Before its rows go: its users whose contact fields it won are owed the next winner
    # (the key left the config, so it no longer counts), which the next sync sends. Without
    # --unset-in-gleap its rows go unacknowledged, unknown marks included: compare them all.
    order = [a.key for a in config.audiences]
    reconcile(engine, lease.check, order, dropping=() if args.unset_in_gleap else [key.id])
    outcome = _Outcome(key, Counts())
    if args.unset_in_gleap:
        outcome.owed = retirer.prepare_unset(key)
        print(
            f"{key.key}: sending {key.key}: {key.unset} to {outcome.owed} user(s) Gleap may hold it for",
            file=notes,
            flush=True,
        )
        if outcome.owed:
            syncer = Syncer(config, target)
            tick = progress_bar(outcome.owed) if sys.stderr.isatty() else None
            try:
                run = retirer.unset(key, syncer.deliverer(), target, stop=stop, tick=tick)
                outcome.sent = int(run["sent"])
            except (GleapAuthError, GleapUnavailableError) as exc:
                outcome.aborted = exc
            finally:
                syncer.sources.dispose()
        left = retirer.owed(key)
        if left.rows or stop.is_set():
            outcome.left = left
            return outcome
    else:
        outcome.held = retirer.plan(key, unset=True, purge=False)[1]
    outcome.deleted = retirer.remove_state(key)
    if args.purge:
        for table, n in retirer.purge(key).per_table():
            outcome.deleted.add(table, n)
    return outcome


def _dry_run(args: argparse.Namespace, engine: Engine, notes: Any) -> int:
    """Counts only: no lease, no write (like `sync --dry-run`)."""
    store.require_head(engine, "a dry run")
    retirer = Retirer(engine)
    key = _find(retirer, args.key)
    counts, owed = retirer.plan(key, unset=args.unset_in_gleap, purge=args.purge)
    write_rows(sys.stdout, args.format, ("table", "would_delete"), counts.per_table())
    if args.unset_in_gleap:
        print(
            f"{key.key}: would send {key.key}: {key.unset} to {owed} user(s) Gleap may hold it for, "
            "then delete the rows above once Gleap acknowledged them all",
            file=notes,
        )
    print("dry run: nothing was sent or deleted", file=notes)
    return EXIT_OK


def _refuse_in_config(config: Config, key: str) -> None:
    """A key the config still uses is never retired: the next cycle would only bring it back."""
    configured = {p.key: p for p in config.properties}
    if key in configured:
        prop = configured[key]
        raise ConfigError(
            f"{prop.kind} {key!r} is still in the config, so it can't be retired",
            path=str(config.path),
            fix=f"remove its [[{prop.kind}s]] table from the config first (and reload the daemon), "
            f"or set enabled = false on it to pause it instead",
        )
    owner = lifecycle.owner_of(config, key)
    if owner is not None:
        raise ConfigError(
            f"{key!r} is a previous key of {owner!r}: its rename retires it in Gleap",
            path=str(config.path),
            fix=f"let {owner!r}'s rename finish (`status` shows what {key!r} still owes), "
            f"or remove {key!r} from previous_keys first",
        )


def _find(retirer: Retirer, key: str) -> Key:
    found = retirer.find(key)
    if found is not None:
        return found
    known = ", ".join(retirer.stored_keys()) or "none"
    raise ConfigError(
        f"the store has no key {key!r}: nothing to retire",
        fix=f"name a key the store holds and no config does (the store's keys: {known}); "
        "`audiencesync status` lists them under 'retired'",
    )
