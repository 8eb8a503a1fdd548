"""When the config's order of audiences changes, which users' winning contact fields Gleap no longer holds.

A user's field is the value of the first audience in the config that gives it
(``fields.merge_fields``). A source change, an entry or an exit makes a row of
the user pending, and their call carries whatever winning field Gleap does not
hold (``identify_calls.owed_fields`` against ``contact_fields``). Moving an
audience, or removing one from the config (before or by ``retire``), makes no
row pending, yet it can change the winner. So the store keeps each audience's
place in the config when this was last reconciled (``audiences.field_rank``),
and when the configured order differs, ``reconcile`` compares, for the users of
the audiences whose precedence changed, the winning values with what Gleap
acknowledged, and makes one row of each user who is owed a field pending
(``resend``): the normal delivery, with all its guarantees, then sends it.

The ranks are stored only once every user was compared, so a kill midway
leaves the old ranks and the next pass compares again (the flags are
idempotent). Users are read a batch at a time, by user id, each batch its own
transaction; their rows through the primary key and indexes leading with the
user id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from itertools import combinations
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from audiencesync import values
from audiencesync.delivery.identify_calls import owed_fields
from audiencesync.fields import merge_fields
from audiencesync.store.database import utc_now
from audiencesync.store.member_fields import held_fields
from audiencesync.store.pending_since import since
from audiencesync.store.schema import audiences, contact_fields, memberships
from audiencesync.store.writes import fenced_write

log = logging.getLogger(__name__)

BATCH = 1_000

Fence = Callable[[Connection], None] | None


def moved(stored: Sequence[int], configured: Sequence[int]) -> set[int]:
    """The audiences whose precedence over another changed: added, removed, or either side of
    a pair now in the other order. Ranks that only shift (one added before them) change nothing."""
    changed = set(stored) ^ set(configured)
    common = [a for a in configured if a in set(stored)]
    before = {a: i for i, a in enumerate(a for a in stored if a in set(configured))}
    for first, second in combinations(common, 2):
        if before[first] > before[second]:
            changed |= {first, second}
    return changed


def _ranks(conn: Connection, order: Sequence[str]) -> tuple[list[int], list[int], dict[int, int]]:
    """(stored order, configured order, configured rank by id) of the store's audiences."""
    rows = conn.execute(
        sa.select(audiences.c.id, audiences.c.key, audiences.c.field_rank).where(
            audiences.c.kind == "audience"
        )
    ).all()
    ids = {row.key: int(row.id) for row in rows}
    stored = [
        int(r.id) for r in sorted((r for r in rows if r.field_rank is not None), key=lambda r: r.field_rank)
    ]
    configured = [ids[key] for key in order if key in ids]
    return stored, configured, {a: rank for rank, a in enumerate(configured)}


def _candidates(
    conn: Connection, audience_id: int, after: str, limit: int, dropping: bool = False
) -> list[str]:
    """The audience's next users, by id, whose row gives or gave fields (or, when it is being
    dropped, whose last call there had no verdict): a range of its primary key."""
    m = memberships.c
    lost = m.unknown == sa.true() if dropping else sa.false()
    return list(
        conn.execute(
            sa.select(m.user_id)
            .where(
                m.audience_id == audience_id,
                m.user_id > after,
                sa.or_(m.value.is_not(None), m.acked_value.is_not(None), lost),
            )
            .order_by(m.user_id)
            .limit(limit)
        ).scalars()
    )


def owed_rows(
    conn: Connection, users: Sequence[str], rank: dict[int, int], deliverable: Collection[int]
) -> list[tuple[int, str]]:
    """(audience id, user id): one member row of each of these users whose winning fields Gleap
    does not hold, to make pending: the winner's row of an owed field when it is deliverable
    and not parked, else another such row of theirs, else the winner's (it waits with its audience)."""
    m = memberships.c
    rows = conn.execute(
        sa.select(m.audience_id, m.user_id, m.value, m.parked_at).where(
            m.user_id.in_(list(users)),
            m.audience_id.in_(list(rank)),
            m.desired == sa.true(),
            m.value.is_not(None),
        )
    ).all()
    by_user: dict[str, list[Any]] = {}
    for row in sorted(rows, key=lambda r: (r.user_id, rank[r.audience_id])):
        by_user.setdefault(row.user_id, []).append(row)
    held = held_fields(conn, list(by_user))
    out: list[tuple[int, str]] = []
    for user_id, theirs in by_user.items():
        decoded = [(row, values.decode(row.value)) for row in theirs]
        merged, _ = merge_fields((str(row.audience_id), fields) for row, fields in decoded)
        owed = owed_fields(merged, held.get(user_id, {}))
        if not owed:
            continue
        winners = [row for row, fields in decoded if isinstance(fields, dict) and owed & set(fields)]
        usable = [row for row in theirs if row.audience_id in deliverable and row.parked_at is None]
        pick = next((row for row in winners if row in usable), usable[0] if usable else winners[0])
        out.append((int(pick.audience_id), user_id))
    return out


def reconcile(
    engine: Engine,
    fence: Fence,
    order: Sequence[str],
    deliverable: Collection[int] = (),
    batch: int = BATCH,
    dropping: Collection[int] = (),
    clock: Callable[[], datetime] = utc_now,
) -> int:
    """When the configured order differs from the stored one, flag a row of each user owed a
    winning field, then store the order; returns the rows newly flagged. Cheap when it did not
    change.

    ``dropping``: audiences (not configured) whose rows are about to be deleted unacknowledged
    (``retire`` without ``--unset-in-gleap``). Their users are compared too, and those whose
    last call there had no verdict count as holding nothing known: that call may have carried
    any of their fields, and its unknown mark goes with the row.
    """
    if not order:
        return 0  # no configured audience (a caller that delivers no contact fields)
    with engine.connect() as conn, conn.begin():
        stored, configured, rank = _ranks(conn, order)
    if stored == configured and not dropping:
        return 0
    changed = (moved(stored, configured) if stored != configured else set()) | set(dropping)
    flagged = 0
    # Audience by audience, each a keyset walk of its primary key: a user in two of them is
    # compared twice (flags are idempotent), and no statement ever sorts them all.
    for audience_id in sorted(changed):
        after = ""
        while True:
            with fenced_write(engine, fence) as conn:
                users = _candidates(conn, audience_id, after, batch, audience_id in dropping)
                if not users:
                    break
                if audience_id in dropping:
                    _forget_held_of_unknown(conn, users, dropping)
                rows = owed_rows(conn, users, rank, deliverable)
                for i in range(0, len(rows), 500):
                    flagged += conn.execute(
                        sa.update(memberships)
                        .where(
                            sa.tuple_(memberships.c.audience_id, memberships.c.user_id).in_(
                                rows[i : i + 500]
                            ),
                            memberships.c.resend == sa.false(),
                        )
                        .values(resend=True, pending_since=since(clock(), stays_parked=True))
                    ).rowcount
                after = users[-1]
    with fenced_write(engine, fence) as conn:
        _store_ranks(conn, rank)
    if flagged:
        log.info("the order of audiences changed: %d member row(s) made pending for a contact field", flagged)
    return flagged


def _forget_held_of_unknown(conn: Connection, users: Sequence[str], dropping: Collection[int]) -> None:
    m = memberships.c
    lost = sa.select(m.user_id).where(
        m.user_id.in_(list(users)), m.audience_id.in_(list(dropping)), m.unknown == sa.true()
    )
    conn.execute(sa.delete(contact_fields).where(contact_fields.c.user_id.in_(lost)))


def _store_ranks(conn: Connection, rank: dict[int, int]) -> None:
    conn.execute(
        sa.update(audiences)
        .where(audiences.c.kind == "audience", audiences.c.field_rank.is_not(None))
        .values(field_rank=None)
    )
    for audience_id, position in rank.items():
        conn.execute(sa.update(audiences).where(audiences.c.id == audience_id).values(field_rank=position))


def planned_rows(
    conn: Connection, order: Sequence[str], deliverable: Collection[int]
) -> list[tuple[int, str]]:
    """What ``reconcile`` would flag now, read only (the dry run)."""
    if not order:
        return []
    stored, configured, rank = _ranks(conn, order)
    if stored == configured:
        return []
    out: dict[tuple[int, str], None] = {}  # ordered, and each row once
    for audience_id in sorted(moved(stored, configured)):
        after = ""
        while users := _candidates(conn, audience_id, after, BATCH):
            out.update(dict.fromkeys(owed_rows(conn, users, rank, deliverable)))
            after = users[-1]
    return list(out)


def add_to_plan(conn: Connection, plan: str, rows: Sequence[tuple[int, str]]) -> int:
    """The dry run's plan (``plan.py``) gets the member rows ``reconcile`` would make pending
    (``planned_rows``), unless it already has the user's row."""
    if not rows:
        return 0
    return int(
        conn.execute(
            sa.text(
                f"INSERT INTO {plan} (key, user_id, value, data, acked_data, unknown) "
                "SELECT a.key, m.user_id, true, m.value, m.acked_value, m.unknown FROM memberships m "
                "JOIN audiences a ON a.id = m.audience_id WHERE m.audience_id = :a AND m.user_id = :u "
                f"AND NOT EXISTS (SELECT 1 FROM {plan} p WHERE p.key = a.key AND p.user_id = m.user_id)"
            ),
            [{"a": audience_id, "u": user_id} for audience_id, user_id in rows],
        ).rowcount
    )
