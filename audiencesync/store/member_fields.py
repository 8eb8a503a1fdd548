"""The store's read of a page of users' contact fields, across every audience they are in.

A call carries the fields that win for the user (first audience in the
config), so the delivery needs each user's member rows in all configured
audiences, not only the ones it drains, and what Gleap acknowledged per field
(``contact_fields``), to send each winning value it does not hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync import values
from audiencesync.store.in_lists import padded
from audiencesync.store.schema import audiences, contact_fields, memberships


@dataclass
class PageFields:
    """Per user, (audience key, fields) of their member rows in config order, and per field the
    canonical JSON of the value Gleap acknowledged (only for users who have fields now)."""

    members: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    held: dict[str, dict[str, str]] = field(default_factory=dict)


def read_page_fields(conn: Connection, user_ids: Sequence[str], order: Sequence[str]) -> PageFields:
    """The contact fields of these users in the audiences ``order`` names (config order)."""
    page = PageFields()
    if not user_ids or not order:
        return page
    rank = {key: index for index, key in enumerate(order)}
    m = memberships
    rows = conn.execute(
        sa.select(audiences.c.key, m.c.user_id, m.c.value)
        .join(audiences, audiences.c.id == m.c.audience_id)
        .where(
            audiences.c.kind == "audience",
            audiences.c.key.in_(list(order)),
            m.c.user_id.in_(padded(user_ids)),
            m.c.desired == sa.true(),
            m.c.value.is_not(None),
        )
    ).all()
    for row in sorted(rows, key=lambda r: (r.user_id, rank[r.key])):
        page.members.setdefault(row.user_id, []).append((row.key, values.decode(row.value)))
    # Only users with a winning value can be owed one: a page of ids-only audiences reads nothing more.
    page.held = held_fields(conn, list(page.members))
    return page


def held_fields(conn: Connection, user_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per user, per field, the canonical JSON Gleap acknowledged (the primary key leads with the user)."""
    held: dict[str, dict[str, str]] = {}
    for i in range(0, len(user_ids), 500):
        rows = conn.execute(
            sa.select(contact_fields.c.user_id, contact_fields.c.field, contact_fields.c.value).where(
                contact_fields.c.user_id.in_(padded(user_ids[i : i + 500]))
            )
        )
        for user_id, name, value in rows:
            held.setdefault(user_id, {})[name] = value
    return held


def holds_fields(conn: Connection, audience_id: int) -> bool:
    """Whether any member row of the audience still holds contact fields."""
    m = memberships
    found = conn.execute(
        sa.select(sa.literal(1)).where(m.c.audience_id == audience_id, m.c.value.is_not(None)).limit(1)
    ).first()
    return found is not None
