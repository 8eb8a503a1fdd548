"""The audit bench's store (bench/audit_bench.py): one audience of members, then cycles of churn,
written in bulk (executemany on SQLite, COPY on PostgreSQL) and shaped exactly like what the sync
writes, with what the answers must be at each checkpoint.

The audience's ``audiences`` row; a ``sync_runs`` row per cycle with its counters; each cycle's
``membership_changes`` (the departures, then the entries, each in user id order, at the cycle's
time, each departure with the time of the entry it closes); one identify call per change in
``calls`` and ``call_values``, one in ``RETRIED`` answered 503 first and retried (attempt 2) at
once; and ``memberships`` as delivery leaves them (members acknowledged, ex-members dropped).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.report import Figures, chunks

KEY = "bench"
AUDIENCE_ID = 1
START = datetime(2026, 10, 1, tzinfo=UTC)
CYCLE = timedelta(hours=2)
CHECKPOINTS = (1, 15, 29)  # members are asked for half an hour after these cycles
RETRIED = 50  # one call in RETRIED is answered 503 first, then retried


def cycle_time(k: int) -> datetime:
    return START + k * CYCLE


def instant(k: int) -> datetime:
    return cycle_time(k) + timedelta(minutes=30)


def text_time(at: datetime) -> str:
    # The store's own text format on SQLite; PostgreSQL's COPY reads it as a timestamptz.
    return at.strftime("%Y-%m-%d %H:%M:%S.%f+00:00")


def user_id(number: int) -> str:
    return f"user-{number:08d}"


def number(user: str) -> int:
    return int(user[5:])


# --- the store, in bulk --------------------------------------------------------------------


class Bulk:
    """Rows into a table through the driver: executemany on SQLite, COPY on PostgreSQL."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.driver = conn.connection.driver_connection
        self.sqlite = conn.dialect.name == "sqlite"

    def load(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
        names = ", ".join(f'"{c}"' for c in columns)
        if self.sqlite:
            cursor = self.driver.cursor()
            marks = ", ".join("?" * len(columns))
            cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)
            cursor.close()
        else:
            with self.driver.cursor() as cursor, cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)


class History:
    """The members cycle by cycle, and the rows each cycle writes."""

    def __init__(self, members: int, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.current = list(range(1, members + 1))  # user numbers
        self.position = [-1, *range(members)]  # user number -> index in current, -1: not a member
        self.former: list[int] = []  # ex-members who may come back
        self.next_number = members + 1
        self.entered_in = [0] * (members + 1)  # user number -> cycle of the last entry
        self.changes = bytearray(members + 1)  # user number -> changes so far
        self.calls = bytearray(members + 1)
        self.change_id = self.call_id = 0

    def _grow(self, user: int) -> None:
        while len(self.position) <= user:
            self.position.append(-1)
            self.entered_in.append(0)
            self.changes.append(0)
            self.calls.append(0)

    def step(self, churn: int) -> tuple[list[int], list[int]]:
        """One cycle: who leaves and who enters (half of them coming back), each sorted."""
        leaving = [self.current[i] for i in self.rng.sample(range(len(self.current)), churn)]
        back = [
            self.former.pop(self.rng.randrange(len(self.former)))
            for _ in range(min(churn // 2, len(self.former)))
        ]
        new = list(range(self.next_number, self.next_number + churn - len(back)))
        self.next_number += len(new)
        for user in leaving:
            index, last = self.position[user], self.current[-1]
            self.current[index], self.position[last] = last, index
            self.current.pop()
            self.position[user] = -1
        self.former.extend(leaving)
        entering = back + new
        for user in entering:
            self._grow(user)
            self.position[user] = len(self.current)
            self.current.append(user)
        return sorted(leaving), sorted(entering)

    def rows(self, k: int, run_id: int, leaving: list[int], entering: list[int]) -> Iterator[tuple[Any, ...]]:
        """(change, [calls], [values]) for each change of cycle ``k``, as the sync writes them."""
        at = text_time(cycle_time(k))
        for index, (user, change) in enumerate(
            [(u, "left") for u in leaving] + [(u, "entered") for u in entering]
        ):
            self.change_id += 1
            self.changes[user] += 1
            # A departure carries the time of the entry it closes (migration 0015).
            entered_at = text_time(cycle_time(self.entered_in[user])) if change == "left" else None
            if change == "entered":
                self.entered_in[user] = k
            sent = text_time(cycle_time(k) + timedelta(seconds=1, milliseconds=index))
            attempts: list[tuple[int, str, str | None]] = []
            if self.change_id % RETRIED == 0:
                attempts.append((503, "unknown", "HTTP 503"))
            attempts.append((200, "acknowledged", None))
            calls, values = [], []
            for attempt, (status, outcome, error) in enumerate(attempts, start=1):
                self.call_id += 1
                self.calls[user] += 1
                calls.append((self.call_id, user_id(user), attempt, sent, 40, status, outcome, error))
                values.append((self.call_id, AUDIENCE_ID, run_id, change == "entered"))
            yield (self.change_id, AUDIENCE_ID, user_id(user), run_id, change, at, entered_at), calls, values

    def memberships(self) -> Iterator[tuple[Any, ...]]:
        """Each member's row as delivery leaves it: the last entry acknowledged a second later."""
        for user in sorted(self.current):
            entered = cycle_time(self.entered_in[user])
            acked = entered + timedelta(seconds=1)
            yield (
                AUDIENCE_ID,
                user_id(user),
                True,
                True,
                False,
                False,
                text_time(entered),
                text_time(acked),
                0,
                0,
                200,
            )


MEMBERSHIP_COLUMNS = (
    "audience_id",
    "user_id",
    "desired",
    "acked",
    "resend",
    "unknown",
    "changed_at",
    "acked_at",
    "attempts",
    "failures",
    "last_status",
)


def build(url: str, members: int, cycles: int, churn: float) -> Figures:
    import sqlalchemy as sa

    from audiencesync.store import store as store_mod
    from audiencesync.store.schema import audiences, sync_runs

    started = time.perf_counter()
    engine = store_mod.create_engine(url, create=True)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    store_mod.upgrade(engine)
    history = History(members)
    per_cycle = round(members * churn)
    checkpoints: dict[str, Figures] = {}
    samples_churned: list[int] = []
    with engine.connect() as conn:
        bulk = Bulk(conn)
        if bulk.sqlite:
            bulk.driver.execute("PRAGMA synchronous=OFF")  # a scratch store: speed over durability
        with conn.begin():
            conn.execute(
                sa.insert(audiences).values(
                    id=AUDIENCE_ID, key=KEY, name=KEY, created_at=START, refreshed_at=cycle_time(cycles)
                )
            )
        for k in range(cycles + 1):
            leaving, entering = ([], list(history.current)) if k == 0 else history.step(per_cycle)
            changes = len(leaving) + len(entering)
            retried_before = history.call_id - history.change_id
            with conn.begin():
                conn.execute(
                    sa.insert(sync_runs).values(
                        id=k + 1,
                        cycle_id=f"cycle-{k:04d}",
                        audience_id=AUDIENCE_ID,
                        mode="initial" if k == 0 else "incremental",
                        status="running",
                        started_at=cycle_time(k),
                    )
                )
                for chunk in chunks(history.rows(k, k + 1, leaving, entering)):
                    bulk.load(
                        "membership_changes",
                        ("id", "audience_id", "user_id", "run_id", "change", "at", "entered_at"),
                        (change for change, _, _ in chunk),
                    )
                    bulk.load(
                        "calls",
                        ("id", "user_id", "attempt", "at", "elapsed_ms", "status", "outcome", "error"),
                        (call for _, calls, _ in chunk for call in calls),
                    )
                    bulk.load(
                        "call_values",
                        ("call_id", "audience_id", "run_id", "value"),
                        (value for _, _, values in chunk for value in values),
                    )
                retries = history.call_id - history.change_id - retried_before
                conn.execute(
                    sa.update(sync_runs)
                    .where(sync_runs.c.id == k + 1)
                    .values(
                        status="succeeded",
                        finished_at=cycle_time(k) + timedelta(seconds=1 + changes / 1000),
                        source_rows=len(history.current),
                        members=len(history.current),
                        entered=len(entering),
                        left=len(leaving),
                        sent=changes,
                        retries=retries,
                    )
                )
            if k in CHECKPOINTS:
                checkpoints[instant(k).isoformat()] = {
                    "count": len(history.current),
                    "sum": sum(history.current),
                }
            if k == cycles - 2:
                samples_churned = [u for u in entering if history.changes[u] >= 3][:10]
        # Delivery acknowledged every member's last entry; Gleap already knows every ex-member.
        with conn.begin():
            bulk.load("memberships", MEMBERSHIP_COLUMNS, history.memberships())
        if not bulk.sqlite:
            with conn.begin():
                for table in ("audiences", "sync_runs", "membership_changes", "calls"):
                    last = f"(SELECT max(id) FROM {table})"
                    conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})")
            # What autovacuum soon does after so many inserts (the visibility map makes the
            # index-only scans index-only). The tiny audiences table is left unanalyzed, as it
            # often is. VACUUM can't run inside a transaction block.
            conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in ("memberships", "membership_changes", "calls", "call_values", "sync_runs"):
                conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")
    engine.dispose()
    stable = [u for u in range(1, members + 1) if history.changes[u] == 1 and history.position[u] >= 0][:10]
    return {
        "seconds": time.perf_counter() - started,
        "changes": history.change_id,
        "calls": history.call_id,
        "members": len(history.current),
        "checkpoints": checkpoints,
        "now": {"count": len(history.current), "sum": sum(history.current)},
        "samples": [
            {"user": user_id(u), "changes": history.changes[u], "calls": history.calls[u]}
            for u in samples_churned + stable
        ],
    }
