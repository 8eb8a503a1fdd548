"""Events parked together: an owed event behind a parked one of its user and audience is parked

Revision ID: 0011_events_parked_together
Revises: 0010_web
Create Date: 2026-12-06

From this revision on, a user's events in an audience go out in order even past
a parked one: the later events are parked with it (events.py, HELD_BEHIND_PARKED)
and ``retry`` releases them together. Before, a parked event held nothing back,
so a store may hold owed events behind a parked one that are not parked: they
would now wait, unseen by ``failures``. This parks them, with the same error, at
the time the event before them was parked. Data only; the counters' triggers
follow. The downgrade leaves them parked (``retry`` releases them).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_events_parked_together"
down_revision = "0010_web"
branch_labels = None
depends_on = None

HELD_BEHIND_PARKED = "held: an earlier event of this user in this audience is parked"


def upgrade() -> None:
    earlier_parked = (
        "FROM events p WHERE p.audience_id = events.audience_id AND p.user_id = events.user_id "
        "AND p.id < events.id AND p.parked_at IS NOT NULL AND p.acked_at IS NULL"
    )
    op.get_bind().execute(
        sa.text(
            f"UPDATE events SET parked_at = (SELECT min(p.parked_at) {earlier_parked}), last_error = :why "
            f"WHERE acked_at IS NULL AND parked_at IS NULL AND EXISTS (SELECT 1 {earlier_parked})"
        ),
        {"why": HELD_BEHIND_PARKED},
    )


def downgrade() -> None:
    pass
