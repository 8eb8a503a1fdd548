"""The oldest pending age counts from the pending change itself (``memberships.pending_since``,
migration 0013), contact-field and trait changes included, not from when the user entered; on
both stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import command

from audiencesync.store import database, store as store_mod
from audiencesync.store.schema import memberships
from audiencesync.store.store import Audience, Store
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.values import encode
from tests.test_counters import answer, assert_counters_exact, refresh_values

T1 = datetime(2026, 11, 1, 10, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


class Clock:
    def __init__(self) -> None:
        self.now = T1

    def __call__(self) -> datetime:
        return self.now


def oldest(store: Store, key: str) -> datetime | None:
    assert_counters_exact(store)  # the counters' query and the scan of every row agree on it too
    (row,) = [s for s in store.status() if s.key == key]
    return row.oldest_pending_at


def changed_at(store: Store, audience: Audience, user_id: str) -> datetime:
    with store.engine.connect() as conn:
        at: datetime = conn.execute(
            sa.select(memberships.c.changed_at).where(
                memberships.c.audience_id == audience.id, memberships.c.user_id == user_id
            )
        ).scalar_one()
        return at


def test_a_field_or_trait_change_of_a_long_standing_member_is_as_old_as_the_change(
    store_url: str,
) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    clock = Clock()
    store = Store(engine, clock=clock)
    paying = store.ensure_audience("paying", "Paying")
    tier = store.ensure_audience("tier", "Tier", kind="trait")
    refresh_values(store, paying, [("u1", encode({"email": "a@x.io"})), ("u2", encode({"email": "b@x.io"}))])
    refresh_values(store, tier, [("u1", encode(608.44))])
    assert oldest(store, "paying") == T1 and oldest(store, "tier") == T1
    answer(store, paying, {"u1": 200, "u2": 200})
    answer(store, tier, {"u1": 200})
    assert oldest(store, "paying") is None and oldest(store, "tier") is None
    # Three days on, u1's email and trait change: a minute old, not three days.
    clock.now = T1 + 3 * DAY
    refresh_values(
        store, paying, [("u1", encode({"email": "new@x.io"})), ("u2", encode({"email": "b@x.io"}))]
    )
    refresh_values(store, tier, [("u1", encode(700))])
    assert oldest(store, "paying") == T1 + 3 * DAY and oldest(store, "tier") == T1 + 3 * DAY
    assert changed_at(store, paying, "u1") == T1  # the membership's change time, for the audit, stays
    # Changed again before Gleap took it: Gleap has been behind since the first of them.
    clock.now = T1 + 4 * DAY
    refresh_values(
        store, paying, [("u1", encode({"email": "newer@x.io"})), ("u2", encode({"email": "b@x.io"}))]
    )
    assert oldest(store, "paying") == T1 + 3 * DAY
    # Delivered: the oldest is then u2's exit, made now.
    refresh_values(store, paying, [("u1", encode({"email": "newer@x.io"}))])
    answer(store, paying, {"u1": 200})
    assert oldest(store, "paying") == T1 + 4 * DAY
    answer(store, paying, {"u2": 200})
    assert oldest(store, "paying") is None
    # A full resend owes every member again, from when it was asked.
    clock.now = T1 + 5 * DAY
    run_id = store.start_run("cycle", paying, "full")
    rows: list[tuple[str, str | None]] = [("u1", encode({"email": "newer@x.io"}))]
    store.refresh(paying, run_id, iter([rows]), full=True, valued=True)
    assert oldest(store, "paying") == T1 + 5 * DAY
    engine.dispose()


def test_a_parked_change_replaced_by_a_new_one_counts_from_the_new_one(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    store_mod.upgrade(engine)
    clock = Clock()
    store = Store(engine, clock=clock)
    tier = store.ensure_audience("tier", "Tier", kind="trait")
    refresh_values(store, tier, [("u1", encode(1))])
    answer(store, tier, {"u1": 200})
    refresh_values(store, tier, [("u1", encode(2))])
    answer(store, tier, {"u1": 400}, permanent=True)
    clock.now = T1 + DAY  # past the backoff
    answer(store, tier, {"u1": 400}, permanent=True)  # the second rejection parks it (max_attempts=2)
    assert oldest(store, "tier") is None  # parked is not pending
    clock.now = T1 + 2 * DAY
    refresh_values(store, tier, [("u1", encode(3))])  # a new value: a new change, owed from now
    assert oldest(store, "tier") == T1 + 2 * DAY
    engine.dispose()


def test_0013_backfills_the_pending_rows_with_their_changed_at_and_goes_back(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    t2 = T1 + DAY
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0012_contact_fields")
        conn.execute(
            sa.text("INSERT INTO audiences (id, key, name, created_at) VALUES (1, 'a', 'A', :t)").bindparams(
                sa.bindparam("t", type_=UtcDateTime)
            ),
            {"t": T1},
        )
        conn.execute(
            sa.text(
                "INSERT INTO memberships (audience_id, user_id, desired, acked, changed_at) "
                "VALUES (1, :u, true, :k, :t)"
            ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
            [
                {"u": "u1", "k": None, "t": T1},
                {"u": "u2", "k": True, "t": t2},
                {"u": "u3", "k": None, "t": t2},
            ],
        )
    store_mod.upgrade(engine)
    with engine.connect() as conn:
        since = dict(conn.execute(sa.select(memberships.c.user_id, memberships.c.pending_since)).all())
    assert since == {"u1": T1, "u2": None, "u3": t2}
    store = Store(engine)
    assert oldest(store, "a") == T1
    with engine.begin() as conn:
        command.downgrade(database._alembic_config(conn), "0012_contact_fields")
    with engine.connect() as conn:
        assert "pending_since" not in {c["name"] for c in sa.inspect(conn).get_columns("memberships")}
        assert conn.execute(sa.text("SELECT count(*) FROM memberships WHERE pending")).scalar_one() == 2
    engine.dispose()
