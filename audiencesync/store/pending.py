"""The delivery's reading of what is owed: the next page of users with a due change, as PendingChanges."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync import values
from audiencesync.store.database import utc_now
from audiencesync.store.outcomes import PendingChange
from audiencesync.store.schema import audiences, due, memberships
from audiencesync.store.utc_time import UtcDateTime


def pending_page_query(
    audience_id: int,
    audience_ids: Sequence[int],
    after: str,
    limit: int,
    now: datetime | None = None,
    passed: Mapping[int, str | None] | None = None,
) -> sa.Select[Any]:
    """Users after ``after`` with a due change in ``audience_id``, with all their due
    changes in ``audience_ids``; the primary key serves both the filter and the order.

    ``passed``: how far each other audience's cursor has gone in this pass (None:
    to the end). A row its cursor passed comes back ``carried``. It is compared in
    SQL, so that the database's collation, which ordered the pages, decides.
    """
    statement, params = _statement(audience_id, audience_ids, after, limit, now or utc_now(), passed)
    return statement.params(params)


def _statement(
    audience_id: int,
    audience_ids: Sequence[int],
    after: str,
    limit: int,
    now: datetime,
    passed: Mapping[int, str | None] | None,
) -> tuple[sa.Select[Any], dict[str, Any]]:
    """The page's statement, built once per set of audiences (a pass reads thousands of pages
    of one set: building it each time cost more than running it), and its parameters.

    How far each cursor has gone is a parameter, not a part of the statement: when it was
    (a CASE branch for each cursor started, one shape for each cursor done), a pass over three
    audiences came in dozens of shapes, each met for the first time hours into a run and each
    kept, ~100 KB, here and in the engine's compiled cache, a slow rise of the daemon's memory
    (issue 22). Now there is one statement for each set of audiences.
    """
    ids = tuple(sorted(set(audience_ids)))
    cursors = passed or {}
    params: dict[str, Any] = {"audience_id": audience_id, "after": after, "now": now}
    for other in ids:
        cursor = "" if other == audience_id else cursors.get(other, "")
        # NOT_PASSED: a page's own audience, or a cursor not started; TO_CURSOR: passed the
        # users up to the cursor; PASSED_ALL: passed every user.
        state = NOT_PASSED if cursor == "" else PASSED_ALL if cursor is None else TO_CURSOR
        params[f"state_{other}"] = state
        params[f"passed_{other}"] = cursor or None
    return _page_statement(ids, limit), params


NOT_PASSED, TO_CURSOR, PASSED_ALL = 0, 1, 2


@functools.lru_cache(maxsize=64)
def _page_statement(audience_ids: tuple[int, ...], limit: int) -> sa.Select[Any]:
    now = sa.bindparam("now", type_=UtcDateTime)
    users = (
        sa.select(memberships.c.user_id)
        .where(
            memberships.c.audience_id == sa.bindparam("audience_id"),
            memberships.c.user_id > sa.bindparam("after"),
            due(memberships, now),
        )
        .order_by(memberships.c.user_id)
        .limit(limit)
        .subquery("next_users")
    )
    m = memberships.alias("m")

    def carried_in(audience: int) -> sa.ColumnElement[bool]:
        state = sa.bindparam(f"state_{audience}", type_=sa.Integer)
        # The cursor compared in SQL, so that the database's collation, which ordered the pages,
        # decides; NULL (no cursor) makes the AND false, not unknown, as state is then not 1.
        return sa.or_(
            state == PASSED_ALL,
            sa.and_(state == TO_CURSOR, m.c.user_id <= sa.bindparam(f"passed_{audience}")),
        )

    carried = sa.case(*[(m.c.audience_id == a, carried_in(a)) for a in audience_ids], else_=sa.false())
    return (
        sa.select(
            m.c.audience_id,
            m.c.user_id,
            m.c.desired,
            m.c.unknown,
            m.c.failures,
            audiences.c.kind,
            # What the call carries: the row's value while desired; a trait's missing value otherwise.
            sa.case((m.c.desired, m.c.value), else_=audiences.c.missing).label("value"),
            carried.label("carried"),
        )
        .join(audiences, audiences.c.id == m.c.audience_id)
        .where(
            due(m, now),
            m.c.audience_id.in_(audience_ids),
            m.c.user_id.in_(sa.select(users.c.user_id)),
        )
        .order_by(m.c.user_id, m.c.audience_id)
    )


def pending_page(
    conn: Connection,
    audience_id: int,
    audience_ids: Sequence[int],
    after: str,
    limit: int,
    now: datetime,
    passed: Mapping[int, str | None] | None = None,
) -> list[PendingChange]:
    """``pending_page_query``'s rows as the changes one call carries (values decoded)."""
    statement, params = _statement(audience_id, audience_ids, after, limit, now, passed)
    rows = conn.execute(statement, params).all()
    return [
        PendingChange(
            audience_id,
            user_id,
            desired,
            unknown,
            failures,
            kind=kind,
            value=values.decode(value),
            carried=bool(carried),
        )
        for audience_id, user_id, desired, unknown, failures, kind, value, carried in rows
    ]
