"""What Gleap holds per contact field follows the winner (the first audience in the config that gives
it), whatever changes the winner: a retire (with or without --unset-in-gleap), a reorder, a pause and
resume, an audience removed from the config. Against the loopback stand-in, on both stores.

The scenario of issue 19, A.5: ``x`` comes first and gives u1 ``plan = pro``, ``b`` gives
``plan = basic``. u2 is in ``b`` alone, u3 in ``x`` alone.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import command

from audiencesync.config.loading import Config
from audiencesync.delivery.field_winners import moved, reconcile
from audiencesync.gleap.api import identify_body
from audiencesync.store import database, store as store_mod
from audiencesync.store.store import Store
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.sync.cycle import PlannedCall
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_contact_fields import audience, people
from tests.test_counters import assert_counters_exact
from tests.test_daemon import cli
from tests.test_sync import calls, cycle

ROWS: list[dict[str, Any]] = [
    {"user_id": "u1", "segment": "x", "plan": "pro"},
    {"user_id": "u1", "segment": "b", "plan": "basic", "email": "u1@b.io"},
    {"user_id": "u2", "segment": "b", "plan": "basic"},
    {"user_id": "u3", "segment": "x", "plan": "pro"},
]
X = audience("X", "user_id, plan", "x")
B = audience("B", "user_id, plan, email", "b")


def paused(text: str) -> str:
    return text + "enabled = false\n"


def plans(gleap: GleapStandIn) -> dict[str, object]:
    return {user: contact.get("plan") for user, contact in gleap.contacts.items()}


def owed(config: Config) -> int:
    """Rows still owed to Gleap, of every audience."""
    engine = store_mod.create_engine(config.store.url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM memberships WHERE pending")).scalar_one())
    finally:
        engine.dispose()


def synced(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> Config:
    people(source, ROWS)
    config = make_config(gleap.base_url, audiences=X + B)
    cycle(config)
    assert plans(gleap) == {"u1": "pro", "u2": "basic", "u3": "pro"}
    gleap.reset_log()
    return config


def test_retire_with_unset_in_gleap_hands_the_field_to_the_next_audience(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    config = synced(make_config, source, gleap)
    without_x = make_config(gleap.base_url, audiences=B, create_store=False)
    retired = cli(without_x, "retire", "x", "--unset-in-gleap")
    assert retired.returncode == 0, retired.stderr
    cycle(without_x)
    # u3: nobody gives plan any more, so Gleap keeps what it has; u1: b's value wins now.
    assert plans(gleap) == {"u1": "basic", "u2": "basic", "u3": "pro"}
    assert gleap.contacts["u1"]["x"] is False and gleap.contacts["u3"]["x"] is False
    assert all(body["userId"] != "u2" for body in gleap.identify_calls)  # nothing changed for u2
    assert owed(without_x) == 0
    gleap.reset_log()
    cycle(without_x)
    assert gleap.identify_calls == []
    del config


def test_retire_without_unset_and_a_removal_alone_hand_the_field_on_too(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    synced(make_config, source, gleap)
    without_x = make_config(gleap.base_url, audiences=B, create_store=False)
    retired = cli(without_x, "retire", "x")
    assert retired.returncode == 0, retired.stderr
    cycle(without_x)
    assert calls(gleap) == {"u1": {"userId": "u1", "b": True, "plan": "basic", "email": "u1@b.io"}}
    assert plans(gleap) == {"u1": "basic", "u2": "basic", "u3": "pro"}
    # Put back first: its value wins again (its rows are gone, so it is a first sync of x).
    gleap.reset_log()
    cycle(make_config(gleap.base_url, audiences=X + B, create_store=False))
    assert plans(gleap) == {"u1": "pro", "u2": "basic", "u3": "pro"}
    assert owed(without_x) == 0


def test_a_reorder_sends_the_new_winner_to_the_users_it_changes_and_to_nobody_else(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    synced(make_config, source, gleap)
    b_first = make_config(gleap.base_url, audiences=B + X, create_store=False)
    planned: list[PlannedCall] = []
    cycle(b_first, dry_run=True, show_calls=planned.extend)
    assert gleap.identify_calls == []
    cycle(b_first)
    assert calls(gleap) == {"u1": {"userId": "u1", "b": True, "plan": "basic", "email": "u1@b.io"}}
    assert [identify_body(c.user_id, c.attributes) for c in planned] == gleap.identify_calls
    assert plans(gleap) == {"u1": "basic", "u2": "basic", "u3": "pro"}
    assert owed(b_first) == 0
    gleap.reset_log()
    cycle(b_first)
    assert gleap.identify_calls == []
    cycle(make_config(gleap.base_url, audiences=X + B, create_store=False))
    assert calls(gleap) == {"u1": {"userId": "u1", "x": True, "plan": "pro"}}
    assert plans(gleap) == {"u1": "pro", "u2": "basic", "u3": "pro"}


def test_a_paused_audience_still_counts_where_it_stands_and_a_move_while_paused_is_sent(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    synced(make_config, source, gleap)
    # Paused in place: its fields still count, nothing changes in Gleap.
    cycle(make_config(gleap.base_url, audiences=paused(X) + B, create_store=False))
    assert gleap.identify_calls == []
    # Paused and moved after b: b's value wins now, and goes in a call of b (x's rows stay as they are).
    moved = make_config(gleap.base_url, audiences=B + paused(X), create_store=False)
    cycle(moved)
    assert calls(gleap) == {"u1": {"userId": "u1", "b": True, "plan": "basic", "email": "u1@b.io"}}
    assert plans(gleap) == {"u1": "basic", "u2": "basic", "u3": "pro"}
    # Resumed first again: its value wins again.
    gleap.reset_log()
    cycle(make_config(gleap.base_url, audiences=X + B, create_store=False))
    assert calls(gleap) == {"u1": {"userId": "u1", "x": True, "plan": "pro"}}
    assert plans(gleap) == {"u1": "pro", "u2": "basic", "u3": "pro"}
    assert owed(moved) == 0


def test_a_lost_answer_resends_the_new_winner_even_when_the_source_flips_back(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """A reorder's new winner goes out and its answer is lost; the config is put back before the
    retry. Gleap may hold basic: the retry must send pro, though pro is what it acknowledged last."""
    synced(make_config, source, gleap)
    gleap.lose_answer_next(10)  # every try of the call: applied, and its answer lost
    cycle(make_config(gleap.base_url, audiences=B + X, create_store=False))
    assert plans(gleap)["u1"] == "basic"
    gleap.clear_faults()
    gleap.reset_log()
    cycle(make_config(gleap.base_url, audiences=X + B, create_store=False))
    assert plans(gleap)["u1"] == "pro"


def test_a_winner_owed_after_a_reorder_is_counted_as_fields_pending_exactly(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    synced(make_config, source, gleap)
    b_first = make_config(gleap.base_url, audiences=B + X, create_store=False)
    gleap.fail_user("u1", 422, body="no")  # refused every time: the change stays owed
    cycle(b_first)
    engine = store_mod.create_engine(b_first.store.url)
    try:
        counted = assert_counters_exact(Store(engine))
    finally:
        engine.dispose()
    assert counted["b"][1] == 1 and counted["b"][4] == 1  # pending, fields_pending: u1's row of b
    assert counted["x"][4] == 0
    gleap.clear_faults()
    cycle(b_first)
    assert plans(gleap)["u1"] == "basic" and owed(b_first) == 0


def test_a_store_upgraded_to_0012_sends_only_the_conflicting_winners_once(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    """Before 0012 the store knew each row's own fields, not what the call carried: where rows
    agree that is what Gleap holds; where they disagreed, the winner goes once."""
    people(source, ROWS)
    engine = store_mod.create_engine(store_url, create=True)
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0010_web")
        t = sa.bindparam("t", type_=UtcDateTime)
        conn.execute(
            sa.text(
                "INSERT INTO audiences (id, key, name, created_at, refreshed_at) "
                "VALUES (1, 'x', 'X', :t, :t), (2, 'b', 'B', :t, :t)"
            ).bindparams(t),
            {"t": store_mod.utc_now()},
        )
        member = (
            "INSERT INTO memberships (audience_id, user_id, desired, acked, value, acked_value, "
            "changed_at, acked_at) VALUES (:a, :u, true, true, :v, :v, :t, :t)"
        )
        conn.execute(
            sa.text(member).bindparams(t),
            [
                {"a": a, "u": u, "v": v, "t": store_mod.utc_now()}
                for a, u, v in (
                    (1, "u1", '{"plan":"pro"}'),
                    (2, "u1", '{"email":"u1@b.io","plan":"basic"}'),
                    (2, "u2", '{"plan":"basic"}'),
                    (1, "u3", '{"plan":"pro"}'),
                )
            ],
        )
    engine.dispose()
    config = make_config(gleap.base_url, audiences=X + B)  # upgrades the store to head
    engine = store_mod.create_engine(store_url)
    try:
        with engine.connect() as conn:
            held = conn.execute(sa.text("SELECT user_id, field, value FROM contact_fields")).all()
    finally:
        engine.dispose()
    assert sorted(map(tuple, held)) == [
        ("u1", "email", '"u1@b.io"'),
        ("u2", "plan", '"basic"'),
        ("u3", "plan", '"pro"'),
    ]
    cycle(config)
    assert calls(gleap) == {"u1": {"userId": "u1", "x": True, "plan": "pro"}}  # its email agreed
    gleap.reset_log()
    cycle(config)
    assert gleap.identify_calls == []


def test_retire_without_unset_of_a_row_whose_call_had_no_verdict_resends_the_winner(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    """u1 enters x (first: pro) beside b (basic); that call is applied and its answer lost. x is
    then retired without --unset-in-gleap: its unknown mark goes with its row, and the winner
    is b's basic again, which is what Gleap acknowledged last, yet Gleap may hold pro."""
    people(source, [ROWS[1], ROWS[3]])
    config = make_config(gleap.base_url, audiences=X + B)
    cycle(config)
    people(source, ROWS)
    gleap.lose_answer_next(10)
    cycle(config)
    assert plans(gleap)["u1"] == "pro"  # applied, never acknowledged
    gleap.clear_faults()
    without_x = make_config(gleap.base_url, audiences=B, create_store=False)
    retired = cli(without_x, "retire", "x")
    assert retired.returncode == 0, retired.stderr
    gleap.reset_log()
    cycle(without_x)
    assert plans(gleap)["u1"] == "basic" and owed(without_x) == 0


def test_moved_names_the_audiences_whose_precedence_changed_and_no_other() -> None:
    assert moved([1, 2, 3], [1, 2, 3]) == set()
    assert moved([1, 2, 3], [4, 1, 2, 3]) == {4}  # one added before them shifts, but reorders nothing
    assert moved([1, 2, 3], [1, 3]) == {2}
    assert moved([1, 2, 3], [2, 1, 3]) == {1, 2}
    assert moved([1, 2, 3], [3, 1, 2]) == {1, 2, 3}
    assert moved([], [1, 2]) == {1, 2}  # a store upgraded to 0012: every member is compared once


def test_reconcile_walks_every_user_a_batch_at_a_time(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    config = synced(make_config, source, gleap)
    engine = store_mod.create_engine(config.store.url)
    try:
        assert reconcile(engine, None, ["b", "x"], batch=1) == 1  # u1's row of b (b is not drained)
        assert reconcile(engine, None, ["b", "x"], batch=1) == 0  # stored: nothing to compare
        with engine.connect() as conn:
            flagged = conn.execute(sa.text("SELECT user_id FROM memberships WHERE resend")).scalars().all()
        assert flagged == ["u1"]
    finally:
        engine.dispose()
