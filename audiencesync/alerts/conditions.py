"""The store's open alert conditions: opened once, closed once, across processes.

Not fenced by the writer lease: a daemon that has just lost the lease must
still record that it did, and no membership data is written here. Opening and
closing each decide in one statement (an insert that does nothing on conflict,
a delete), so two processes observing the same change never both alert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Engine

from audiencesync.store.schema import alert_conditions
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.store.writes import write_connection

Clock = Callable[[], datetime]

_OPEN = sa.text(
    "INSERT INTO alert_conditions (kind, subject, opened_at, notified_at, summary) "
    "VALUES (:kind, :subject, :opened_at, :notified_at, :summary) ON CONFLICT (kind, subject) DO NOTHING"
).bindparams(sa.bindparam("opened_at", type_=UtcDateTime), sa.bindparam("notified_at", type_=UtcDateTime))


@dataclass(frozen=True)
class Condition:
    kind: str
    subject: str
    opened_at: datetime
    notified_at: datetime
    summary: str


class Conditions:
    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock

    def get(self, kind: str, subject: str) -> Condition | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(alert_conditions).where(
                    alert_conditions.c.kind == kind, alert_conditions.c.subject == subject
                )
            ).one_or_none()
        return Condition(*row) if row is not None else None

    def all(self) -> list[Condition]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(alert_conditions).order_by(alert_conditions.c.kind, alert_conditions.c.subject)
            )
            return [Condition(*row) for row in rows]

    def open(self, kind: str, subject: str, summary: str) -> Condition | None:
        """The condition, when this call opened it; None when it was open already."""
        now = self.clock()
        values = {"kind": kind, "subject": subject, "opened_at": now, "notified_at": now, "summary": summary}
        with write_connection(self.engine) as conn, conn.begin():
            opened = conn.execute(_OPEN, values).rowcount
        return Condition(kind, subject, now, now, summary) if opened else None

    def close(self, kind: str, subject: str) -> Condition | None:
        """The condition, when this call closed it; None when it was not open."""
        if self.get(kind, subject) is None:
            return None  # the common case, read without taking SQLite's write lock
        where = (alert_conditions.c.kind == kind, alert_conditions.c.subject == subject)
        with write_connection(self.engine) as conn, conn.begin():
            row = conn.execute(sa.select(alert_conditions).where(*where)).one_or_none()
            if row is None or not conn.execute(sa.delete(alert_conditions).where(*where)).rowcount:
                return None
        return Condition(*row)

    def notified(self, kind: str, subject: str, at: datetime) -> None:
        with write_connection(self.engine) as conn, conn.begin():
            conn.execute(
                sa.update(alert_conditions)
                .where(alert_conditions.c.kind == kind, alert_conditions.c.subject == subject)
                .values(notified_at=at)
            )
