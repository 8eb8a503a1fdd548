"""Migrations carry an existing store forward (and back) without losing what it knows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import command

from audiencesync.store import audit, database, store as store_mod
from audiencesync.store.utc_time import UtcDateTime

T1 = datetime(2026, 11, 30, 10, 0, 0, tzinfo=UTC)
T2 = datetime(2026, 11, 30, 11, 0, 0, tzinfo=UTC)


def _at(sql: str) -> sa.TextClause:
    clause = sa.text(sql)
    names = [n for n in ("t1", "t2") if f":{n}" in sql]
    return clause.bindparams(*(sa.bindparam(n, type_=UtcDateTime) for n in names))


def test_0005_turns_the_delivery_log_into_calls_and_back(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0004")
        conn.execute(
            _at(
                "INSERT INTO audiences (id, key, name, created_at) VALUES "
                "(1, 'a', 'A', :t1), (2, 'b', 'B', :t1)"
            ),
            {"t1": T1},
        )
        conn.execute(
            _at(
                "INSERT INTO sync_runs (id, cycle_id, audience_id, mode, status, started_at) VALUES "
                "(1, 'c1', 1, 'initial', 'succeeded', :t1), (2, 'c1', 2, 'initial', 'partial', :t1)"
            ),
            {"t1": T1},
        )
        # One call that carried both audiences (each row with its audience's run), a
        # rejected one, an unanswered one and a rate-limited one.
        conn.execute(
            _at(
                "INSERT INTO deliveries (run_id, audience_id, user_id, value, status, error, at) VALUES "
                "(1, 1, 'u1', true, 200, NULL, :t1), (2, 2, 'u1', false, 200, NULL, :t1), "
                "(2, 2, 'u2', true, 422, 'HTTP 422: bad', :t1), "
                "(2, 2, 'u3', true, 0, 'no answer within 2 s', :t2), "
                "(1, 1, 'u4', true, 429, 'HTTP 429', :t2)"
            ),
            {"t1": T1, "t2": T2},
        )
    store_mod.upgrade(engine)
    with engine.connect() as conn:
        logged = conn.execute(
            sa.text(
                "SELECT user_id, audience_key, run_id, value, attempt, status, outcome, error "
                "FROM call_log ORDER BY user_id, audience_key"
            )
        ).all()
        calls = conn.execute(sa.text("SELECT count(*) FROM calls")).scalar_one()
    assert [(r[0], r[1], r[2], bool(r[3]), r[4], r[5], r[6], r[7]) for r in logged] == [
        ("u1", "a", 1, True, 1, 200, "acknowledged", None),
        ("u1", "b", 2, False, 1, 200, "acknowledged", None),
        ("u2", "b", 2, True, 1, 422, "rejected", "HTTP 422: bad"),
        ("u3", "b", 2, True, 1, 0, "unknown", "no answer within 2 s"),
        ("u4", "a", 1, True, 1, 429, "rate_limited", "HTTP 429"),
    ]
    assert calls == 4  # u1's two rows were one call

    with engine.begin() as conn:
        command.downgrade(database._alembic_config(conn), "0004")
    with engine.connect() as conn:
        back = conn.execute(
            sa.text(
                "SELECT run_id, audience_id, user_id, value, status FROM deliveries "
                "ORDER BY user_id, audience_id"
            )
        ).all()
    engine.dispose()
    assert [(r[0], r[1], r[2], bool(r[3]), r[4]) for r in back] == [
        (1, 1, "u1", True, 200),
        (2, 2, "u1", False, 200),
        (2, 2, "u2", True, 422),
        (2, 2, "u3", True, 0),
        (1, 1, "u4", True, 429),
    ]


def _pending(conn: sa.Connection) -> dict[str, bool]:
    return {u: bool(p) for u, p in conn.execute(sa.text("SELECT user_id, pending FROM memberships"))}


def test_0006_carries_a_0005_store_forward_without_resending_or_losing_anything(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    # (user, desired, acked, resend, unknown, parked)
    rows = [
        ("acked_in", True, True, False, False, False),  # settled
        ("acked_out", True, False, False, False, False),  # a re-entry owed to Gleap
        ("new", True, None, False, False, False),  # never told: owed
        ("leaving", False, None, False, False, False),  # never told, gone: settled
        ("unknown", True, True, False, True, False),  # an outcome unknown: owed
        ("parked", True, False, False, False, True),  # rejected: waits for `retry`
        ("resend", True, True, True, False, False),  # a full resend owed
    ]
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0005")
        conn.execute(
            _at("INSERT INTO audiences (id, key, name, created_at) VALUES (1, 'a', 'A', :t1)"), {"t1": T1}
        )
        for user, desired, acked, resend, unknown, parked in rows:
            conn.execute(
                _at(
                    "INSERT INTO memberships (audience_id, user_id, desired, acked, resend, unknown, "
                    "changed_at, parked_at) VALUES (1, :u, :d, :k, :r, :x, :t1, "
                    + (":t2" if parked else "NULL")
                    + ")"
                ),
                {"u": user, "d": desired, "k": acked, "r": resend, "x": unknown, "t1": T1, "t2": T2},
            )
        before = _pending(conn)
    store_mod.upgrade(engine)
    with engine.connect() as conn:
        after = _pending(conn)
        kinds = conn.execute(sa.text("SELECT kind, missing FROM audiences")).all()
    assert after == before
    assert {u for u, p in after.items() if p} == {"acked_out", "new", "unknown", "parked", "resend"}
    assert [tuple(k) for k in kinds] == [("audience", None)]

    store = store_mod.Store(engine)
    audience = store.ensure_audience("a", "A")
    page = store.pending_page(audience.id, [audience.id], "", 100)
    # What goes out is what went out before: memberships, no values; the parked one waits.
    assert [(c.user_id, c.desired, c.kind, c.value) for c in page] == [
        ("acked_out", True, "audience", None),
        ("new", True, "audience", None),
        ("resend", True, "audience", None),
        ("unknown", True, "audience", None),
    ]
    with engine.begin() as conn:
        command.downgrade(database._alembic_config(conn), "0005")
    with engine.connect() as conn:
        back = _pending(conn)
    assert back == before
    engine.dispose()


def test_0006_events_adds_an_empty_outbox_and_nothing_is_owed(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0005")
        conn.execute(
            _at("INSERT INTO audiences (id, key, name, created_at) VALUES (1, 'a', 'A', :t1)"), {"t1": T1}
        )
        conn.execute(
            _at(
                "INSERT INTO sync_runs (id, cycle_id, audience_id, mode, status, started_at) "
                "VALUES (1, 'c1', 1, 'initial', 'succeeded', :t1)"
            ),
            {"t1": T1},
        )
        conn.execute(
            _at(
                "INSERT INTO memberships (audience_id, user_id, desired, acked, changed_at) VALUES "
                "(1, 'u1', true, true, :t1), (1, 'u2', true, NULL, :t1)"
            ),
            {"t1": T1},
        )
    store_mod.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT events_sent, events_failed FROM sync_runs")).one() == (0, 0)
        assert conn.execute(sa.text("SELECT count(*) FROM memberships WHERE pending")).scalar_one() == 1
    with engine.begin() as conn:
        command.downgrade(database._alembic_config(conn), "0005")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM sync_runs")).scalar_one() == 1
        assert "events" not in sa.inspect(conn).get_table_names()
    engine.dispose()


def test_0014_makes_the_change_indexes_covering_and_the_members_at_an_instant_stay_exact(
    store_url: str,
) -> None:
    t = [T1 + timedelta(hours=h) for h in range(6)]  # t[1]..t[5]
    engine = store_mod.create_engine(store_url, create=True)
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0013_pending_since")
        conn.execute(
            _at("INSERT INTO audiences (id, key, name, created_at) VALUES (1, 'a', 'A', :t1)"), {"t1": T1}
        )
        for run in range(1, 6):
            conn.execute(
                _at(
                    "INSERT INTO sync_runs (id, cycle_id, audience_id, mode, status, started_at) "
                    f"VALUES ({run}, 'c{run}', 1, 'incremental', 'succeeded', :t1)"
                ),
                {"t1": t[run]},
            )
        # u1 enters, leaves, comes back; u2 enters, gets a new value, leaves; u3 enters and
        # stays; u4's entry was pruned, so its departure is its first change.
        changes = [
            ("u1", 1, "entered"),
            ("u2", 1, "entered"),
            ("u3", 1, "entered"),
            ("u2", 2, "changed"),
            ("u1", 3, "left"),
            ("u2", 4, "left"),
            ("u4", 4, "left"),
            ("u1", 5, "entered"),
        ]
        for user, run, change in changes:
            conn.execute(
                _at(
                    "INSERT INTO membership_changes (audience_id, user_id, run_id, change, at) "
                    f"VALUES (1, '{user}', {run}, '{change}', :t1)"
                ),
                {"t1": t[run]},
            )
        for user, run in (("u1", 5), ("u3", 1)):
            conn.execute(
                _at(
                    "INSERT INTO memberships (audience_id, user_id, desired, acked, changed_at) "
                    f"VALUES (1, '{user}', true, true, :t1)"
                ),
                {"t1": t[run]},
            )
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0014_covering_change_indexes")

    def indexes() -> set[str]:
        with engine.connect() as conn:
            return {str(i["name"]) for i in sa.inspect(conn).get_indexes("membership_changes")}

    assert {
        "ix_membership_changes_audience_id_at_change_user_id_id",
        "ix_membership_changes_audience_id_user_id_id_at_change",
    } <= indexes()
    store_mod.upgrade(engine)  # the audit of today reads 0015's column
    half = timedelta(minutes=30)
    expected = {
        t[2] + half: [("u1", t[1]), ("u2", t[1]), ("u3", t[1]), ("u4", None)],
        t[3] + half: [("u2", t[1]), ("u3", t[1]), ("u4", None)],
        t[5] + half: [("u1", t[5]), ("u3", t[1])],
    }
    with audit.snapshot(engine) as conn:
        assert {at: [tuple(r) for r in audit.members(conn, 1, at)] for at in expected} == expected

    with engine.begin() as conn:
        command.downgrade(database._alembic_config(conn), "0013_pending_since")
    assert {
        "ix_membership_changes_audience_id_at",
        "ix_membership_changes_audience_id_user_id_id_at",
    } <= indexes()
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM membership_changes")).scalar_one() == len(changes)
    engine.dispose()
