"""When a membership's pending change was made: ``memberships.pending_since`` (migration 0013).

The oldest pending age (`status`, /metrics) counts from it, not from ``changed_at`` (the time
the user entered or left, which the audit reads as the membership's change time): an email
or trait change of a long-standing member is as old as the change, not as the membership.

Every write that can make a row pending sets it with ``SINCE`` (SQL text) or ``since`` (Core):
a row already owed (pending, not parked) keeps its time, since Gleap has been behind for it
since then, whatever changed meanwhile; any other row (not pending, or parked: a new change
replaces the parked one) gets the write's time. `retry` (un-parking) leaves it: that change has
been owed since it was made. A row that stops being pending keeps its stale value, which
nothing reads: every reader filters on pending and not parked.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from audiencesync.store.schema import memberships
from audiencesync.store.utc_time import UtcDateTime


def since_sql(new: str = ":t", table: str = "memberships", *, stays_parked: bool = False) -> str:
    """The SET clause for SQL text: ``new`` (a bind or ``excluded.pending_since``) unless owed already.

    ``stays_parked``: the write does not unpark (a resend): a parked change keeps its time too."""
    parked = "" if stays_parked else f"AND {table}.parked_at IS NULL "
    return (
        f"pending_since = CASE WHEN {table}.pending {parked}"
        f"AND {table}.pending_since IS NOT NULL THEN {table}.pending_since ELSE {new} END"
    )


SINCE = since_sql()


def since(
    now: datetime | sa.BindParameter[datetime], *, stays_parked: bool = False
) -> sa.ColumnElement[datetime]:
    """The same for Core updates of ``memberships``: its value for ``.values(pending_since=...)``."""
    m = memberships.c
    owed = sa.and_(m.pending == sa.true(), m.pending_since.is_not(None))
    if not stays_parked:
        owed = sa.and_(owed, m.parked_at.is_(None))
    new = now if isinstance(now, sa.BindParameter) else sa.literal(now, type_=UtcDateTime)
    return sa.case((owed, m.pending_since), else_=new)
