"""Computing what changed: stage the source's ids, then anti-join them with the snapshot.

The diff runs in SQL so it scales to millions of members: the ids are bulk
loaded into an indexed temporary table (``stage.py``), and entered/left
users are found with NOT EXISTS anti-joins against ``memberships``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, TextClause, bindparam, text

from audiencesync.store.pending_since import SINCE, since_sql
from audiencesync.store.stage import steer_planner
from audiencesync.store.utc_time import UtcDateTime


@dataclass(frozen=True)
class DiffCounts:
    members: int
    entered: int
    left: int
    changed: int = 0  # members who stayed with a new value

    @property
    def previous(self) -> int:
        """Members before this change."""
        return self.members - self.entered + self.left


def _distinct(conn: Connection) -> str:
    return "IS NOT" if conn.dialect.name == "sqlite" else "IS DISTINCT FROM"


# An entry onto an existing row (a leaver whose false is still owed) keeps the time it has owed.
ENTRY_SINCE = since_sql("excluded.pending_since")


# A departure records the time of the entry it closes (migration 0015), so that the members at
# an instant read one range of one index. It is the leaver's memberships.changed_at, read
# before the statement that sets it to the departure's time: a member's changed_at is the time
# of their entry (a new value leaves it alone).
LEFT_COLUMNS = "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at, entered_at)"


def _timed(sql: str) -> TextClause:
    # Typed, so that SQLite stores the same text format as every other write.
    return text(sql).bindparams(bindparam("t", type_=UtcDateTime))


def apply_stage(
    conn: Connection,
    name: str,
    *,
    audience_id: int,
    run_id: int,
    now: datetime,
    full: bool,
    members: int | None,
    valued: bool = False,
) -> DiffCounts:
    """Make the snapshot equal the stage, recording every change. Runs in the caller's transaction.

    ``members``: the users in the sealed stage (``seal_stage``); None for a stage
    sealed without a key (PostgreSQL, ids only), diffed by ``_apply_joined``.
    ``valued``: the stage carries values (a trait, an audience with contact fields);
    a member whose value differs is 'changed'. Without it the ids-only statements
    run, exactly as fast as before values existed.
    """
    steer_planner(conn)
    if members is None:
        return _apply_joined(conn, name, audience_id=audience_id, run_id=run_id, now=now, full=full)
    if valued:
        return _apply_values(
            conn, name, audience_id=audience_id, run_id=run_id, now=now, full=full, members=members
        )
    params = {"a": audience_id, "r": run_id, "t": now}

    def not_in_stage(alias: str) -> str:
        return f"NOT EXISTS (SELECT 1 FROM {name} s WHERE s.user_id = {alias}.user_id)"

    not_member = (
        "NOT EXISTS (SELECT 1 FROM memberships m WHERE m.audience_id = :a "
        "AND m.user_id = s.user_id AND m.desired = true)"
    )
    left = conn.execute(
        _timed(
            f"{LEFT_COLUMNS} SELECT m.audience_id, m.user_id, :r, 'left', :t, m.changed_at "
            "FROM memberships m "
            f"WHERE m.audience_id = :a AND m.desired = true AND {not_in_stage('m')}"
        ),
        params,
    ).rowcount
    entered = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
            f"SELECT :a, s.user_id, :r, 'entered', :t FROM {name} s WHERE {not_member}"
        ),
        params,
    ).rowcount
    if left:
        # A leaver's pending resend is void: only the new value (false) matters.
        conn.execute(
            _timed(
                # A new value is a new change: earlier failures, backoff and parking don't
                # carry over. The unknown mark does: Gleap may still hold anything.
                "UPDATE memberships SET desired = false, resend = false, changed_at = :t, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {SINCE} "
                f"WHERE audience_id = :a AND desired = true AND {not_in_stage('memberships')}"
            ),
            params,
        )
    if entered:
        conn.execute(
            _timed(
                "INSERT INTO memberships "
                "(audience_id, user_id, desired, resend, changed_at, pending_since, attempts) "
                f"SELECT :a, s.user_id, true, false, :t, :t, 0 FROM {name} s WHERE {not_member} "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, changed_at = excluded.changed_at, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {ENTRY_SINCE}"
            ),
            params,
        )
    _settle(conn, params, full=full)
    return DiffCounts(members=members, entered=entered, left=left)


def _apply_joined(
    conn: Connection, name: str, *, audience_id: int, run_id: int, now: datetime, full: bool
) -> DiffCounts:
    """``apply_stage`` on PostgreSQL for a stage of ids with no key (``seal_stage(keyed=False)``).

    One hash full join of the stage with the snapshot finds the entries and the exits
    together, where the portable statements make four anti-joins of a million rows (two to
    log the changes, two to apply them): measured at 1M members and 1% churn, 4 of the 6.5 s
    of a refresh. The difference (the churn: thousands of rows, not millions) goes into a
    keyed table; every statement after that starts from it. An id the source gave twice is
    one row of it (DISTINCT). The number of members is the counter the triggers keep.
    """
    params = {"a": audience_id, "r": run_id, "t": now}
    changes = f"{name}_changes"
    # The default collation, as memberships.user_id has: compared under the stage's "C", its
    # ids could not be looked up in memberships' indexes (measured: a hash join over 1M rows).
    conn.exec_driver_sql(f"CREATE TEMP TABLE {changes} (user_id TEXT PRIMARY KEY, entered BOOLEAN NOT NULL)")
    conn.execute(
        text(
            f"INSERT INTO {changes} (user_id, entered) "
            "SELECT DISTINCT coalesce(s.user_id, m.user_id), m.user_id IS NULL "
            "FROM (SELECT user_id FROM memberships WHERE audience_id = :a AND desired = true) m "
            f"FULL JOIN {name} s ON s.user_id = m.user_id "
            "WHERE m.user_id IS NULL OR s.user_id IS NULL "
            # In key order: the key is then built by appends, and the statements below,
            # which read it in that order, read the table's pages in turn. A first sync's
            # difference is every member: unordered, 10M random inserts into the key and
            # reads through the 8 MB of a session's temp_buffers (PostgreSQL's default).
            "ORDER BY 1"
        ),
        params,
    )
    conn.exec_driver_sql(f"ANALYZE {changes}")
    # From here on each statement reads the small difference and finds its rows of
    # memberships through the primary key: nested loops are the right plan. Even were
    # the planner to start from a million memberships, each would probe a keyed table.
    conn.exec_driver_sql("SET LOCAL enable_nestloop = on")
    left = conn.execute(
        _timed(
            f"{LEFT_COLUMNS} SELECT :a, c.user_id, :r, 'left', :t, m.changed_at FROM {changes} c "
            "JOIN memberships m ON m.audience_id = :a AND m.user_id = c.user_id "
            "WHERE NOT c.entered ORDER BY c.user_id"
        ),
        params,
    ).rowcount
    entered = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
            f"SELECT :a, c.user_id, :r, 'entered', :t FROM {changes} c WHERE c.entered ORDER BY c.user_id"
        ),
        params,
    ).rowcount
    if left:
        conn.execute(
            _timed(
                "UPDATE memberships SET desired = false, resend = false, changed_at = :t, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {SINCE} "
                f"FROM {changes} c WHERE memberships.audience_id = :a AND memberships.user_id = c.user_id "
                "AND NOT c.entered AND memberships.desired = true"
            ),
            params,
        )
    if entered:
        conn.execute(
            _timed(
                "INSERT INTO memberships "
                "(audience_id, user_id, desired, resend, changed_at, pending_since, attempts) "
                f"SELECT :a, c.user_id, true, false, :t, :t, 0 FROM {changes} c WHERE c.entered "
                "ORDER BY c.user_id "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, changed_at = excluded.changed_at, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {ENTRY_SINCE}"
            ),
            params,
        )
    steer_planner(conn)  # back to hash joins for what else the transaction runs
    _settle(conn, params, full=full)
    members = conn.execute(
        text("SELECT members FROM audience_counts WHERE audience_id = :a"), params
    ).scalar_one()
    return DiffCounts(members=int(members), entered=entered, left=left)


def _apply_values(
    conn: Connection, name: str, *, audience_id: int, run_id: int, now: datetime, full: bool, members: int
) -> DiffCounts:
    """``apply_stage`` for a stage with values: entries and changes record the new value."""
    params = {"a": audience_id, "r": run_id, "t": now}
    stage = name
    differs = _distinct(conn)
    not_in_stage = "NOT EXISTS (SELECT 1 FROM {n} s WHERE s.user_id = {a}.user_id)"
    not_member = (
        "NOT EXISTS (SELECT 1 FROM memberships m WHERE m.audience_id = :a "
        "AND m.user_id = s.user_id AND m.desired = true)"
    )
    left = conn.execute(
        _timed(
            f"{LEFT_COLUMNS} SELECT m.audience_id, m.user_id, :r, 'left', :t, m.changed_at "
            "FROM memberships m "
            f"WHERE m.audience_id = :a AND m.desired = true AND {not_in_stage.format(n=name, a='m')}"
        ),
        params,
    ).rowcount
    changed_rows = (
        f"FROM memberships m JOIN {stage} s ON s.user_id = m.user_id "
        f"WHERE m.audience_id = :a AND m.desired = true AND m.value {differs} s.value"
    )
    changed = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at, value) "
            f"SELECT m.audience_id, m.user_id, :r, 'changed', :t, s.value {changed_rows}"
        ),
        params,
    ).rowcount
    entered = conn.execute(
        _timed(
            "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at, value) "
            f"SELECT :a, s.user_id, :r, 'entered', :t, s.value FROM {stage} s WHERE {not_member}"
        ),
        params,
    ).rowcount
    fresh = f"changed_at = :t, attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {SINCE}"
    if left:
        conn.execute(
            _timed(
                f"UPDATE memberships SET desired = false, value = NULL, resend = false, {fresh} "
                f"WHERE audience_id = :a AND desired = true "
                f"AND {not_in_stage.format(n=name, a='memberships')}"
            ),
            params,
        )
    if changed:
        # A new value is a new change, as an entry is: failures and parking don't carry over.
        # changed_at stays the entry's time: the audit rebuilds members at an instant from it.
        conn.execute(
            _timed(
                "UPDATE memberships SET value = s.value, attempts = 0, failures = 0, "
                f"next_attempt_at = NULL, parked_at = NULL, {SINCE} FROM {stage} s "
                f"WHERE memberships.audience_id = :a AND memberships.desired = true "
                f"AND s.user_id = memberships.user_id AND memberships.value {differs} s.value"
            ),
            params,
        )
    if entered:
        conn.execute(
            _timed(
                "INSERT INTO memberships "
                "(audience_id, user_id, desired, value, resend, changed_at, pending_since, attempts) "
                f"SELECT :a, s.user_id, true, s.value, false, :t, :t, 0 FROM {stage} s WHERE {not_member} "
                "ON CONFLICT (audience_id, user_id) "
                "DO UPDATE SET desired = true, value = excluded.value, changed_at = excluded.changed_at, "
                f"attempts = 0, failures = 0, next_attempt_at = NULL, parked_at = NULL, {ENTRY_SINCE}"
            ),
            params,
        )
    _settle(conn, params, full=full)
    return DiffCounts(members=members, entered=entered, left=left, changed=changed)


def _settle(conn: Connection, params: dict[str, object], *, full: bool) -> None:
    """After either diff: drop the rows that hold nothing, and with ``full`` owe every member again."""
    # Rows that are neither members nor owed to Gleap hold nothing worth keeping:
    # the change log keeps their history.
    conn.execute(
        text("DELETE FROM memberships WHERE audience_id = :a AND desired = false AND pending = false"),
        params,
    )
    if full:
        # The admin asked for everything now: backoffs end too (parked changes stay parked).
        conn.execute(
            _timed(
                "UPDATE memberships SET resend = true, failures = 0, next_attempt_at = NULL, "
                f"{since_sql(stays_parked=True)} "
                "WHERE audience_id = :a AND desired = true"
            ),
            params,
        )
