"""Key renames (``previous_keys``): what the store does when a property's key changes.

A rename keeps the property's ``audiences`` row (its id, so its history: changes,
calls, runs, events) and gives it the new key. The old key gets a row of its own,
the *retired* row, holding one membership per user whom Gleap may hold the old
key for (acknowledged ``true``, or a call with no verdict): ``desired = false``,
which the generalised pending rule delivers as ``old_key: false`` (a trait: its
``missing`` value, or ``null``). The renamed property's members are owed their
value under the new key (``acked`` back to NULL). Delivery then carries both in
one call per user (``delivery.plan_calls`` groups a user's due rows across the
ids it is given), under the same at-least-once, unknown-outcome, backoff and
parking rules as any other property row.

Each retired membership is deleted once Gleap acknowledges its ``false``, as for
any ex-member (``outcomes.record``): when the retired row holds none, the old key
is retired. The retired ``audiences`` row itself stays, with no current state, as
the anchor of the calls that carried the old key (``call_log`` under the old key).

Everything here is one transaction per property, and idempotent: a crash before
it commits leaves the store as it was, after it the next run delivers what is
owed, and running it again changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync.errors import StoreError
from audiencesync.store.database import utc_now
from audiencesync.store.pending_since import since
from audiencesync.store.schema import audiences, memberships
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.store.writes import fenced_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retired:
    """An old key still owed to Gleap: its row, and the row it was renamed into."""

    id: int
    key: str
    renamed_id: int
    owed: int  # retired memberships left (users Gleap may still hold the old key for)


@dataclass
class RenameReport:
    """What one property's ``previous_keys`` came to in this run."""

    key: str
    renamed_from: str | None = None  # the old key whose row this run re-keyed
    retired: list[Retired] = field(default_factory=list)  # old keys still owed
    notes: list[str] = field(default_factory=list)


class Renames:
    """Applies ``previous_keys``. Seams: the store's engine, clock and the lease's fence."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = utc_now,
        fence: Callable[[Connection], None] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.fence = fence  # raises when this process no longer holds the store

    def apply(self, key: str, previous_keys: Sequence[str], *, kind: str = "audience") -> RenameReport:
        """Bring the store's rows for ``key`` and its ``previous_keys`` to the rename's state.

        Before the property's own refresh: the refresh then finds its row under the new key.
        """
        report = RenameReport(key=key)
        # BEGIN IMMEDIATE on SQLite, as every write of the store: a deferred transaction that
        # read before another connection's write committed fails at once ("database is locked")
        # when it then writes, and the refresh behind it would be skipped.
        with fenced_write(self.engine, self.fence) as conn:
            for old in _in_order(conn, key, previous_keys):
                self._apply_one(conn, key, old, kind, report)
        for note in report.notes:
            log.info("%s: %s", key, note)
        return report

    def _apply_one(self, conn: Connection, key: str, old: str, kind: str, report: RenameReport) -> None:
        now = self.clock()
        old_row = _row(conn, old)
        if old_row is None:
            report.notes.append(f"previous key {old!r}: the store never had it, nothing to retire")
            return
        if old_row.kind != kind:
            raise StoreError(
                f"the previous key {old!r} of {key!r} is a{'n' if old_row.kind == 'audience' else ''} "
                f"{old_row.kind} in the store, and {key!r} a{'n' if kind == 'audience' else ''} {kind}. "
                f"Fix: remove {old!r} from previous_keys (a rename keeps a property's kind)"
            )
        new_row = _row(conn, key)
        if new_row is None:
            retired_id = _rename(conn, old_row.id, key, old, now)
            report.renamed_from = old
            renamed_id = old_row.id
        else:
            # Renamed earlier (this is the retired row), or two store rows merged into one
            # property: whatever the old key's row still says, Gleap is owed its retirement.
            retired_id, renamed_id = old_row.id, new_row.id
            _retire(conn, retired_id, now)
        owed = _owed(conn, retired_id)
        if owed:
            report.retired.append(Retired(retired_id, old, renamed_id, owed))
            if report.renamed_from == old:
                report.notes.append(f"renamed from {old!r}: {owed} user(s) are owed {old!r} retired")
        elif report.renamed_from == old:
            report.notes.append(f"renamed from {old!r}: Gleap never held {old!r}, nothing to retire")


@dataclass(frozen=True)
class Preview:
    """What a rename would do, read without writing (the dry run).

    ``stored_id``: the row holding the property's history (the old key's until the rename
    is applied): its changes and events are planned against it. ``renamed``: the row under
    the new key exists; until then every source user is owed the new key, as on a first
    sync. ``owed``: (old key, its row id, whether that row is already the retired one).
    """

    stored_id: int | None
    renamed: bool
    owed: tuple[tuple[str, int, bool], ...]


def preview(conn: Connection, key: str, previous_keys: Sequence[str]) -> Preview:
    """``Renames.apply``'s outcome as the dry run plans it; reads only."""
    new = _row(conn, key)
    stored_id = new.id if new is not None else None
    owed: list[tuple[str, int, bool]] = []
    for old in _in_order(conn, key, previous_keys):
        row = _row(conn, old)
        if row is None:
            continue
        if new is None and stored_id is None:
            stored_id = row.id  # the one apply re-keys
            owed.append((old, row.id, False))
        else:
            owed.append((old, row.id, True))
    return Preview(stored_id, new is not None, tuple(owed))


def _in_order(conn: Connection, key: str, previous_keys: Sequence[str]) -> list[str]:
    """The previous keys, the one to re-key first when the new key has no row yet: the row
    refreshed last. A retired row is never refreshed, so after a second rename (a -> b -> c,
    ``previous_keys = ["a", "b"]``) it is b's row, with the history, that becomes c."""
    if _row(conn, key) is not None or len(previous_keys) < 2:
        return list(previous_keys)
    refreshed = dict(
        conn.execute(
            sa.select(audiences.c.key, audiences.c.refreshed_at).where(audiences.c.key.in_(previous_keys))
        ).all()
    )
    never = datetime.min.replace(tzinfo=UTC)
    first = max(
        (k for k in previous_keys if k in refreshed),
        key=lambda k: refreshed[k] or never,
        default=None,
    )
    return list(previous_keys) if first is None else [first, *(k for k in previous_keys if k != first)]


def _row(conn: Connection, key: str) -> _KeyRow | None:
    row = conn.execute(
        sa.select(audiences.c.id, audiences.c.kind).where(audiences.c.key == key)
    ).one_or_none()
    return None if row is None else _KeyRow(int(row.id), str(row.kind))


@dataclass(frozen=True)
class _KeyRow:
    id: int
    kind: str


def _rename(conn: Connection, audience_id: int, key: str, old: str, now: datetime) -> int:
    """Re-key the row (its id, so its history, stays), make the old key's retired row, and
    owe every member the value under the new key (Gleap never had it); returns the retired id.

    The ex-members' rows go: the new key was never set for them, and the old key's ``false``
    is the retired row's to deliver.
    """
    conn.execute(sa.update(audiences).where(audiences.c.id == audience_id).values(key=key))
    # The retired row copies what Gleap may hold before these rows are reset.
    conn.execute(
        sa.text(
            "INSERT INTO audiences (key, name, kind, missing, created_at) "
            "SELECT :old, :name, kind, missing, :t FROM audiences WHERE id = :a"
        ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
        # `status` and `audit` then tell the old key's row for what it is.
        {"old": old, "name": f"{key} before its rename", "t": now, "a": audience_id},
    )
    retired = _row(conn, old)
    assert retired is not None
    conn.execute(
        sa.text(
            "INSERT INTO memberships (audience_id, user_id, desired, acked, value, acked_value, resend, "
            "unknown, changed_at, pending_since, attempts, failures) "
            "SELECT :r, user_id, false, acked, NULL, acked_value, false, unknown, :t, :t, 0, 0 "
            "FROM memberships WHERE audience_id = :a AND (acked = true OR unknown)"
        ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
        {"r": retired.id, "a": audience_id, "t": now},
    )
    conn.execute(
        sa.delete(memberships).where(
            memberships.c.audience_id == audience_id, memberships.c.desired == sa.false()
        )
    )
    conn.execute(
        sa.update(memberships)
        .where(memberships.c.audience_id == audience_id)
        .values(
            pending_since=since(now),  # the new key is owed from now on
            acked=None,
            acked_value=None,
            acked_at=None,
            resend=False,
            unknown=False,
            attempts=0,
            failures=0,
            next_attempt_at=None,
            last_status=None,
            last_error=None,
            parked_at=None,
        )
    )
    return retired.id


def _retire(conn: Connection, retired_id: int, now: datetime) -> None:
    """Every row of the old key says "not a member", and those Gleap can't hold it for go."""
    conn.execute(
        sa.update(memberships)
        .where(memberships.c.audience_id == retired_id, memberships.c.desired == sa.true())
        .values(desired=False, value=None, changed_at=now, pending_since=since(now))
    )
    conn.execute(
        sa.delete(memberships).where(
            memberships.c.audience_id == retired_id,
            memberships.c.desired == sa.false(),
            memberships.c.pending == sa.false(),
        )
    )


def _owed(conn: Connection, retired_id: int) -> int:
    count = conn.execute(
        sa.select(sa.func.count()).select_from(memberships).where(memberships.c.audience_id == retired_id)
    ).scalar_one()
    return int(count)
