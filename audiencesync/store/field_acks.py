"""What Gleap holds per user and contact field: written as Gleap acknowledges the calls that carried them.

``contact_fields`` keeps, per (user, field), the canonical JSON of the value
the last call answered 2xx carried. It is written in the transaction that
records the answer (``outcomes.write_outcomes``), so it never says more than
Gleap acknowledged. What the user is owed is the difference between it and the
values that win for them now (``identify_calls.owed_fields``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync.store.utc_time import UtcDateTime

UPSERT = (
    "INSERT INTO contact_fields (user_id, field, value, acked_at) {rows} "
    "ON CONFLICT (user_id, field) DO UPDATE SET value = excluded.value, acked_at = excluded.acked_at"
)


def acknowledge_fields(
    conn: Connection, acked: Iterable[tuple[str, Iterable[tuple[str, str]]]], now: datetime
) -> None:
    """Record the fields of these acknowledged calls, (user id, ((field, JSON), ...)) in answer order.

    A field given twice in one batch keeps the later answer's value (one upsert may not touch a
    row twice on PostgreSQL). Arrays unnested on PostgreSQL: one statement, not one per row.
    """
    latest: dict[tuple[str, str], str] = {}
    for user_id, fields in acked:
        for name, value in fields:
            latest[(user_id, name)] = value
    if not latest:
        return
    at = sa.bindparam("t", type_=UtcDateTime)
    if conn.dialect.name != "postgresql":
        conn.execute(
            sa.text(UPSERT.format(rows="VALUES (:u, :f, :v, :t)")).bindparams(at),
            [{"u": u, "f": f, "v": v, "t": now} for (u, f), v in latest.items()],
        )
        return
    conn.execute(
        sa.text(
            UPSERT.format(
                rows="SELECT x.u, x.f, x.v, :t FROM unnest(CAST(:u AS text[]), CAST(:f AS text[]), "
                "CAST(:v AS text[])) AS x(u, f, v)"
            )
        ).bindparams(at),
        {
            "u": [u for u, _ in latest],
            "f": [f for _, f in latest],
            "v": list(latest.values()),
            "t": now,
        },
    )
