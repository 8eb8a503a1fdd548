"""The exception tree. Every expected failure is an ``AudienceSyncError``.

The CLI maps each class to an exit status in one place (``cli.EXIT_STATUS``),
and prints ``str(error)`` without a traceback, so every message here says what
went wrong, which thing it concerns, and how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError


def iso_time(value: datetime) -> str:
    """How every message shows a time: ISO 8601 to the second with its offset (naive means UTC)."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return aware.isoformat(timespec="seconds")


def with_fix(message: str, fix: str) -> str:
    """``message`` then its ``fix``, as every message writes them: a full stop before "Fix:"."""
    message = message.rstrip()
    return (message if message.endswith(".") else message + ".") + " Fix: " + fix


E = TypeVar("E", bound=BaseException)


def detached(exc: E) -> E:
    """``exc`` without its traceback and the errors it was raised from: what to keep of an error
    past its ``except`` block. Its frames hold the whole failed pass (its pages of changes, its
    calls, its connections), and an outage's error is kept for minutes; only its class and its
    message are read later."""
    exc.__traceback__ = None
    exc.__cause__ = exc.__context__ = None
    return exc


class AudienceSyncError(Exception):
    """Root of every error audiencesync raises on purpose."""


class ConfigError(AudienceSyncError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        where: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.path = path
        self.where = where
        self.fix = fix
        parts = []
        if path:
            parts.append(f"{path}:")
        if where:
            parts.append(f"{where}:")
        parts.append(message)
        text = " ".join(parts)
        super().__init__(with_fix(text, fix) if fix else text)


class AudiencePausedError(ConfigError):
    """A command asked to sync an audience or trait whose config says enabled = false."""

    def __init__(self, kind: str, key: str, *, path: str) -> None:
        self.key = key
        super().__init__(
            f"{kind} {key!r} is paused (enabled = false): it is neither refreshed nor delivered, "
            "and its store state waits as it is.",
            path=path,
            fix=f"set enabled = true on {key!r} to resume it (the daemon picks it up on its reload, "
            f"SIGHUP), or leave --audience {key} out",
        )


class BadTimeError(ConfigError):
    """A TIME on the command line (``--at``...) is neither ISO 8601 nor a span before now."""

    def __init__(self, text: str, option: str | None = None) -> None:
        self.text = text
        self.option = option
        super().__init__(
            f"{option + ' ' if option else ''}{text!r} is not a time.",
            fix="write ISO 8601 (2026-11-01, 2026-11-01T12:00:00Z; no offset means UTC), "
            "a span before now (90m, 12h, 3d, 2w), or now",
        )


class StoreError(AudienceSyncError):
    """The membership store cannot be used (unreachable, wrong schema version...)."""


class StoreBusyError(StoreError):
    """Another audiencesync process holds the store's writer lease."""

    def __init__(
        self, *, holder: str, since: datetime, expires: datetime, waited: float, daemon: bool = False
    ) -> None:
        self.holder = holder
        self.since = since
        self.expires = expires
        waited_text = f" after waiting {waited:g} s" if waited else ""
        # A daemon never finishes: waiting for it is no fix.
        fix = (
            "Fix: it is a daemon (`audiencesync run`), which never finishes: `sync --audience KEY` "
            "(repeatable) and `sync --full` are handed to it; for anything else, stop it."
            if daemon
            else "Fix: let it finish, pass --wait SECONDS to queue behind it, or stop that process."
        )
        super().__init__(
            f"the store is in use by another audiencesync ({holder}, since {iso_time(since)}; "
            f"its lease runs to {iso_time(expires)} unless renewed){waited_text}. "
            f"{fix} If it crashed, its lease expires by itself."
        )


class LeaseLostError(StoreError):
    """This process no longer holds the writer lease, so it must not write."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "this process no longer holds the store's writer lease (it expired unrenewed, or "
            "another process holds it now). Nothing more was written; the next run carries on. "
            "Fix: check for long pauses (swap, suspended VM), a clock jump on this host, or a store "
            "locked for longer than [sync] lease_seconds."
        )


class ListenError(AudienceSyncError):
    """The HTTP endpoint can't listen on its address: in use, not this host's, or not allowed."""

    def __init__(self, address: str, reason: str, fix: str, *, in_use: bool = False) -> None:
        self.address = address
        self.in_use = in_use
        super().__init__(f"can't listen on {address}: {reason}. Fix: {fix}")


class SourceError(AudienceSyncError):
    """An audience's (or a trait's) source query failed; its snapshot is left untouched."""

    def __init__(self, message: str, *, audience: str, source: str, kind: str = "audience") -> None:
        self.audience = audience
        self.source = source
        self.kind = kind
        super().__init__(f"{kind} {audience!r} (source {source!r}): {message}")


class DriverMissingError(ConfigError):
    """A database URL's driver (its DBAPI module, or SQLAlchemy's dialect) is not installed.

    A setup mistake, found before anything is read: ``problem`` is the message
    without the ``where`` it concerns, for a caller that names that itself.
    """

    def __init__(
        self,
        *,
        scheme: str,
        module: str | None,
        install: str,
        where: str | None = None,
        broken: str | None = None,
    ) -> None:
        self.scheme = scheme
        self.module = module
        self.install = install
        self.broken = broken  # the import's own message, when the module is there but fails to load
        if module is None:
            message = f"SQLAlchemy has no dialect for {scheme} URLs."
        elif broken is not None:
            message = f"the driver {module} (for {scheme} URLs) cannot be loaded: {broken.rstrip('.')}."
        else:
            message = f"the driver {module} (for {scheme} URLs) is not installed."
        self.problem = with_fix(message, install)
        super().__init__(message, where=where, fix=install)


class GleapError(AudienceSyncError):
    """Talking to Gleap failed in a way that concerns the whole cycle."""


class GleapAuthError(GleapError):
    """Gleap refused the token (401/403): nothing more can be delivered this cycle."""

    # What became of the changes: a refused delivery marked nothing; a check (`check`) sent none.
    PENDING = "Nothing was marked delivered; the next run sends the pending changes."
    CHECKED = "Only the token was checked: nothing was sent."

    def __init__(
        self,
        status: int,
        *,
        maybe_applied: bool = False,
        tries: tuple[Any, ...] = (),
        outcome: str = PENDING,
    ) -> None:
        self.status = status
        # An earlier attempt of the same call got no verdict (a lost answer, a 5xx): Gleap may
        # have applied it, so the call's outcome is unknown, not "not sent".
        self.maybe_applied = maybe_applied
        self.tries = tries  # every request of the call (``gleap.Try``), the refused one last
        reason = "is wrong or was revoked" if status == 401 else "lacks the rights for this call"
        super().__init__(
            f"Gleap answered {status}: the API token {reason}. "
            "Fix: copy the secret API token from Gleap (Project > Settings > Security) "
            f"into the GLEAP_API_TOKEN environment variable. {outcome}"
        )


class MissingTokenError(GleapError):
    """No Gleap token is configured and the command needs one."""

    # What a command can do without a token, for one that has --dry-run (sync, retire).
    DRY_RUN = "pass --dry-run to see the calls without sending them"
    # For one that has none (check, run): the command that shows the calls without a token.
    SYNC_DRY_RUN = "`audiencesync sync --dry-run` shows the calls a sync would make without one"

    # For `forget --in-gleap`: what it does without one.
    STORE_ONLY = "leave out --in-gleap to forget the users in the store only"

    def __init__(self, instead: str | None = DRY_RUN) -> None:
        super().__init__(
            "no Gleap API token is set. Fix: export GLEAP_API_TOKEN=<secret token> "
            "(Gleap: Project > Settings > Security), or set api_token under [gleap] in the "
            f"config file{'; or ' + instead if instead else ''}."
        )


class StoreMissingError(StoreError):
    """The SQLite store file does not exist, and this command must not create it."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"the store file {path} does not exist. Fix: check [store] url (a typo would start a new, "
            "empty store and re-send every member); to create a new store there, run "
            "`audiencesync db upgrade`."
        )


class GleapUnavailableError(GleapError):
    """The circuit breaker opened: Gleap failed for many users in a row (unreachable or 5xx)."""

    def __init__(
        self, *, base_url: str, failures: int, users: int, last_error: str, trials: int | None = None
    ) -> None:
        self.base_url = base_url
        self.failures = failures
        self.users = users
        self.last_error = last_error
        self.trials = trials  # the half-open breaker's trial calls answered, when it reopened
        failed = (
            f"{failures} of {trials} trial calls after an outage, for {users} different users,"
            if trials
            else f"{failures} calls in a row for {users} different users"
        )
        super().__init__(
            f"Gleap at {base_url} is failing: {failed} got no answer or a 5xx (last: {last_error}). "
            "Delivery stopped; every change is still pending. Fix: check the network and Gleap's "
            "status page, or [gleap] base_url; the next run carries on."
        )


class UnknownAudienceError(AudienceSyncError):
    """An audit named an audience key that neither the config nor the store knows."""

    def __init__(self, key: str, *, configured: Sequence[str], stored_only: Sequence[str]) -> None:
        self.key = key
        known = ", ".join(configured) or "none"
        if stored_only:
            known += "; in the store only (no longer configured): " + ", ".join(stored_only)
        super().__init__(
            f"no audience or trait has the key {key!r}, in the config or in the store. "
            f"Fix: use one of the keys: {known}"
        )


class HistoryPrunedError(AudienceSyncError):
    """An audit asked about a time before the horizon: `audiencesync prune` deleted what came before."""

    def __init__(
        self, *, asked: datetime, before: datetime, prune_id: int, pruned_at: datetime, by: str
    ) -> None:
        self.asked = asked
        self.before = before
        # To the microsecond when it has them: a horizon shown rounded down would be refused again.
        horizon = before.astimezone(UTC).isoformat()
        super().__init__(
            f"cannot rebuild the history at {iso_time(asked)}: prune #{prune_id} (by {by}, "
            f"{iso_time(pruned_at)}) deleted everything before {horizon}, the horizon. "
            f"Fix: ask for {horizon} or later."
        )


class PruneTimeError(ConfigError):
    """`prune --before` (or the daemon's retention) names a time too recent to prune up to."""

    def __init__(self, before: datetime, now: datetime, option: str = "--before") -> None:
        self.before = before
        when = "is in the future" if before > now else "is less than a day ago"
        super().__init__(
            f"{option} {iso_time(before)} {when} (now {iso_time(now)}). Prune keeps at least the "
            "last day, so that runs still going and answers still arriving keep their history.",
            fix="pass a time at least a day ago, e.g. --before 90d or --before 2026-01-01",
        )


def foreseen(exc: BaseException) -> bool:
    """Whether a loop's failure was foreseen, its one-line ``brief`` saying all there is: the
    project's own errors, and the store's operational ones (locked, connection lost). Only the
    rest is worth a traceback in the log."""
    return isinstance(exc, (AudienceSyncError, OperationalError))


def brief(exc: BaseException) -> str:
    """An exception in one line for a log: its class, and the database's own message when it has one."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {detail[0] if detail else ''}"


class ForgetIncompleteError(AudienceSyncError):
    """`forget` kept some users' rows: Gleap did not acknowledge their deletion (or it was not tried)."""

    SHOWN = 20  # ids in the message; the command lists every one before it

    def __init__(self, kept: Sequence[tuple[str, str]]) -> None:
        self.kept = list(kept)  # (user id, outcome)
        shown = ", ".join(user for user, _ in self.kept[: self.SHOWN])
        more = f" and {len(self.kept) - self.SHOWN} more" if len(self.kept) > self.SHOWN else ""
        outcomes = ", ".join(sorted({outcome for _, outcome in self.kept}))
        super().__init__(
            f"{len(self.kept)} user(s) not forgotten ({outcomes}): {shown}{more}. Their store rows were "
            "kept. Fix: run the same `audiencesync forget --in-gleap` again for them (safe to repeat: a "
            "contact already deleted answers 404, which counts as done); for 'refused', read Gleap's "
            "answer above first."
        )


class DaemonHoldsStoreError(StoreBusyError):
    """A command that needs the writer lease found a daemon (`audiencesync run`) holding it."""

    def __init__(self, *, command: str, holder: str, since: datetime) -> None:
        self.holder = holder
        self.since = since
        StoreError.__init__(
            self,
            f"a daemon ({holder}, since {iso_time(since)}) holds the store, and `{command}` needs its "
            "writer lease. Fix: stop the daemon (systemctl stop audiencesync), run the command, then "
            "start the daemon again; a key in no config is left alone by the daemon meanwhile.",
        )


class RetireIncompleteError(AudienceSyncError):
    """`retire --unset-in-gleap` ended with users still owed the key's false: the state stays."""

    def __init__(self, key: str, *, remaining: int, parked: int, unknown: int) -> None:
        self.key = key
        self.remaining = remaining
        parked_text = (
            f"; {parked} parked after repeated rejections (`audiencesync failures` lists them with "
            "Gleap's answer)"
            if parked
            else ""
        )
        super().__init__(
            f"{key!r} is not retired yet: {remaining} user(s) are still owed {key}: false "
            f"({unknown} with an unknown outcome{parked_text}). Its state is kept. Fix: run "
            f"`audiencesync retire {key} --unset-in-gleap` again: it carries on with what is left "
            f"(parked users get a fresh attempt budget); or `audiencesync retire {key}` to drop "
            "them and leave Gleap as it is."
        )
