"""The store's read of a page of users' contact fields, across every audience they are in.

A call carries the fields that win for the user (first audience in the
config), so the delivery needs each user's member rows in all configured
audiences, not only the ones it drains, and, for the rows it sends, the
fields Gleap last acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync import values
from audiencesync.schema import audiences, memberships


@dataclass
class PageFields:
    """Per user, (audience key, fields) of their member rows in config order; per row, the
    names of the fields Gleap last acknowledged."""

    members: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    gave: dict[str, dict[int, frozenset[str]]] = field(default_factory=dict)


def read_page_fields(conn: Connection, user_ids: Sequence[str], order: Sequence[str]) -> PageFields:
    """The contact fields of these users in the audiences ``order`` names (config order)."""
    page = PageFields()
    if not user_ids or not order:
        return page
    rank = {key: index for index, key in enumerate(order)}
    m = memberships
    rows = conn.execute(
        sa.select(audiences.c.key, m.c.audience_id, m.c.user_id, m.c.desired, m.c.value, m.c.acked_value)
        .join(audiences, audiences.c.id == m.c.audience_id)
        .where(
            audiences.c.kind == "audience",
            audiences.c.key.in_(list(order)),
            m.c.user_id.in_(list(user_ids)),
            sa.or_(m.c.value.is_not(None), m.c.acked_value.is_not(None)),
        )
    ).all()
    for row in sorted(rows, key=lambda r: (r.user_id, rank[r.key])):
        if row.desired and row.value is not None:
            page.members.setdefault(row.user_id, []).append((row.key, values.decode(row.value)))
        acked = values.decode(row.acked_value)
        if isinstance(acked, dict):
            page.gave.setdefault(row.user_id, {})[row.audience_id] = frozenset(acked)
    return page


def holds_fields(conn: Connection, audience_id: int) -> bool:
    """Whether any member row of the audience still holds contact fields."""
    m = memberships
    found = conn.execute(
        sa.select(sa.literal(1)).where(m.c.audience_id == audience_id, m.c.value.is_not(None)).limit(1)
    ).first()
    return found is not None
