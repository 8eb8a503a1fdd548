"""Contact fields end to end: a query's extra columns reach the Gleap stand-in, diffed, on both stores."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from audiencesync.gleap.api import identify_body
from audiencesync.store import database, store as store_mod
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.sync.cycle import PlannedCall
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_sync import calls, cycle, only

PEOPLE = (
    "user_id TEXT, segment TEXT, first_name TEXT, last_name TEXT, email TEXT, plan TEXT, lang TEXT, "
    "value, created_at, last_activity, last_page_view TEXT, seats, company_id"
)
COLUMNS = [c.split()[0] for c in PEOPLE.split(", ")]


def people(source: SourceDB, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite the source's ``people`` table: one row per dict, missing columns NULL."""
    with sqlite3.connect(source.path) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS people ({PEOPLE})")
        conn.execute("DELETE FROM people")
        conn.executemany(
            f"INSERT INTO people VALUES ({', '.join('?' * len(COLUMNS))})",
            [tuple(row.get(c, "a" if c == "segment" else None) for c in COLUMNS) for row in rows],
        )
    conn.close()


def audience(name: str, select: str, segment: str = "a", key: str | None = None) -> str:
    key_line = f'key = "{key}"' if key else ""
    return f"""
[[audiences]]
name = "{name}"
{key_line}
source = "main"
query = "SELECT {select} FROM people WHERE segment = '{segment}'"
"""


ALL = (
    "user_id, first_name, last_name, email, plan, lang, value, created_at, last_activity, "
    "last_page_view, seats, company_id"
)


def test_every_column_maps_onto_gleap_s_identify_body(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(
        source,
        [
            {
                "user_id": "u1",
                "first_name": "Ada",
                "last_name": "Lovelace",
                "email": "ada@example.com",
                "plan": "pro",
                "lang": "EN",
                "value": 129.5,
                "created_at": "2025-03-01 09:30:00",
                "last_activity": "2026-11-30T12:00:00+02:00",
                "last_page_view": "https://example.com/pricing",
                "seats": 12,
                "company_id": 7,
            },
            {"user_id": "u2", "last_name": "Babbage", "last_page_view": "/docs"},
            {"user_id": "u3"},
        ],
    )
    config = make_config(base_url=gleap.base_url, audiences=audience("Paying", ALL))
    report = cycle(config)
    assert calls(gleap) == {
        "u1": {
            "userId": "u1",
            "paying": True,
            "name": "Ada Lovelace",
            "email": "ada@example.com",
            "plan": "pro",
            "lang": "en",
            "value": 129.5,
            "createdAt": "2025-03-01T09:30:00.000Z",
            "lastActivity": "2026-11-30T10:00:00.000Z",
            "lastPageView": {"page": "https://example.com/pricing", "date": "2026-11-30T10:00:00.000Z"},
            "seats": 12,
            "companyId": "7",
        },
        "u2": {"userId": "u2", "paying": True, "name": "Babbage", "lastPageView": {"page": "/docs"}},
        "u3": {"userId": "u3", "paying": True},
    }
    assert only(report, "paying").status == "succeeded"
    gleap.reset_log()
    cycle(config)
    assert gleap.identify_calls == []  # nothing changed: nothing sent, numbers and times did not flap


def test_custom_attributes_never_override_a_field_userid_or_an_audience_key(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(source, [{"user_id": "u1", "email": "real@x.io", "plan": "gold"}])
    config = make_config(
        base_url=gleap.base_url,
        audiences=audience("VIP", "user_id, email, 'x' AS Email, 'u666' AS userId, plan AS Vip, 1 AS ok")
        + audience("Other", "user_id"),
    )
    report = cycle(config)
    assert calls(gleap) == {"u1": {"userId": "u1", "vip": True, "other": True, "email": "real@x.io", "ok": 1}}
    notes = only(report, "vip").field_notes
    assert len(notes) == 3
    assert "column 'Email' is not sent" in notes[0] and "'email'" in notes[0]
    assert "column 'userId' is not sent" in notes[1] and "'userId'" in notes[1]
    assert "column 'Vip' is not sent" in notes[2] and "audience or trait key 'vip'" in notes[2]
    assert "field_conflicts" not in only(report, "vip").summary()


def test_a_wrong_type_skips_only_that_field_and_is_counted(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(
        source,
        [
            {"user_id": "u1", "email": "a@x.io", "value": "lots", "created_at": "soon"},
            {"user_id": "u2", "email": "b@x.io", "value": 3},
        ],
    )
    config = make_config(
        base_url=gleap.base_url, audiences=audience("Paying", "user_id, email, value, created_at")
    )
    report = cycle(config)
    assert calls(gleap) == {
        "u1": {"userId": "u1", "paying": True, "email": "a@x.io"},
        "u2": {"userId": "u2", "paying": True, "email": "b@x.io", "value": 3},
    }
    paying = only(report, "paying")
    assert paying.status == "succeeded" and paying.field_warnings == 2
    assert paying.field_notes == [
        "skipped fields: created_at: not a timestamp x1 (e.g. user 'u1'); "
        "value: not a number x1 (e.g. user 'u1')"
    ]
    assert "field_warnings=2" in paying.summary()


def test_a_field_change_is_diffed_and_a_leaver_gets_false_without_fields(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    rows = [{"user_id": f"u{n}", "email": f"u{n}@x.io", "plan": "basic"} for n in range(1, 5)]
    people(source, rows)
    config = make_config(base_url=gleap.base_url, audiences=audience("Paying", "user_id, email, plan"))
    cycle(config)
    assert len(gleap.identify_calls) == 4
    gleap.reset_log()
    rows[0]["email"] = "new@x.io"
    people(source, rows[:3])  # u4 leaves
    report = cycle(config)
    assert calls(gleap) == {
        "u1": {"userId": "u1", "paying": True, "email": "new@x.io", "plan": "basic"},
        "u4": {"userId": "u4", "paying": False},
    }
    paying = only(report, "paying")
    assert (paying.changed, paying.left, paying.entered, paying.pending) == (1, 1, 0, 0)
    assert gleap.contacts["u1"]["email"] == "new@x.io"
    gleap.reset_log()
    cycle(config)
    assert gleap.identify_calls == []


def test_conflicting_audiences_first_in_config_wins_and_the_later_one_counts_it(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(
        source,
        [
            {"user_id": "u1", "segment": "a", "email": "first@x.io", "plan": "gold"},
            {"user_id": "u1", "segment": "b", "email": "second@x.io", "plan": "gold", "lang": "de"},
            {"user_id": "u2", "segment": "b", "email": "only-b@x.io"},
        ],
    )
    config = make_config(
        base_url=gleap.base_url,
        audiences=audience("Gold", "user_id, email, plan", "a")
        + audience("Silver", "user_id, email, plan, lang", "b"),
    )
    report = cycle(config)
    assert calls(gleap) == {
        "u1": {
            "userId": "u1",
            "gold": True,
            "silver": True,
            "email": "first@x.io",
            "plan": "gold",
            "lang": "de",
        },
        "u2": {"userId": "u2", "silver": True, "email": "only-b@x.io"},
    }
    assert only(report, "silver").field_conflicts == 1 and only(report, "gold").field_conflicts == 0
    # The first audience lets the user go: the field the second one gives now wins.
    gleap.reset_log()
    people(
        source,
        [
            {"user_id": "u1", "segment": "b", "email": "second@x.io", "plan": "gold", "lang": "de"},
            {"user_id": "u2", "segment": "b", "email": "only-b@x.io"},
            {"user_id": "u9", "segment": "a"},
        ],
    )
    cycle(config, allow_removals=True)
    # Its plan Gleap holds already (gold either way): only the email that changed winner goes.
    assert calls(gleap)["u1"] == {"userId": "u1", "gold": False, "email": "second@x.io"}


def test_more_than_35_custom_keys_go_in_several_calls_each_acknowledged_on_its_own(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(source, [{"user_id": "u1", "email": "a@x.io"}])
    # Three audiences of 20 custom attributes each: 63 custom keys for u1.
    text = "".join(
        audience(f"A{n}", "user_id, email, " + ", ".join(f"'{n}-{i}' AS attr_{n}_{i}" for i in range(20)))
        for n in range(3)
    )
    config = make_config(base_url=gleap.base_url, audiences=text)
    gleap.fail_next(1, 400, body="refused")
    first = cycle(config)
    assert sum(a.pending for a in first.audiences) == 1  # the refused call's audience only
    assert len(gleap.identify_calls) == 2
    bodies = list(gleap.identify_calls)
    gleap.reset_log()
    cycle(config)
    bodies += gleap.identify_calls
    assert len(bodies) == 3  # only the refused call went again
    for body in bodies:
        assert sum(1 for k in body if k not in ("userId", "email")) == 21
        assert body["email"] == "a@x.io"
    assert {k for body in bodies for k in body} >= {f"a{n}" for n in range(3)}
    assert len(gleap.contacts["u1"]) == 2 + 63


def test_full_resends_the_fields(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
    people(source, [{"user_id": "u1", "email": "a@x.io"}, {"user_id": "u2"}])
    config = make_config(base_url=gleap.base_url, audiences=audience("Paying", "user_id, email"))
    cycle(config)
    gleap.reset_log()
    cycle(config, full=True)
    assert calls(gleap) == {
        "u1": {"userId": "u1", "paying": True, "email": "a@x.io"},
        "u2": {"userId": "u2", "paying": True},
    }


def test_a_store_migrated_from_0005_resends_nothing_then_sends_fields_when_columns_come(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> None:
    people(source, [{"user_id": "u1", "email": "a@x.io"}, {"user_id": "u2"}])
    engine = store_mod.create_engine(store_url, create=True)
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0005")
        t = sa.bindparam("t", type_=UtcDateTime)
        now = store_mod.utc_now()
        conn.execute(
            sa.text(
                "INSERT INTO audiences (id, key, name, created_at, refreshed_at) "
                "VALUES (1, 'paying', 'Paying', :t, :t)"
            ).bindparams(t),
            {"t": now},
        )
        conn.execute(
            sa.text(
                "INSERT INTO memberships (audience_id, user_id, desired, acked, changed_at, acked_at) "
                "VALUES (1, 'u1', true, true, :t, :t), (1, 'u2', true, true, :t, :t)"
            ).bindparams(t),
            {"t": now},
        )
    engine.dispose()
    ids_only = make_config(
        base_url=gleap.base_url, audiences=audience("Paying", "user_id"), create_store=False
    )
    report = cycle(ids_only)
    assert gleap.identify_calls == [] and only(report, "paying").status == "succeeded"
    with_fields = make_config(
        base_url=gleap.base_url, audiences=audience("Paying", "user_id, email"), create_store=False
    )
    report = cycle(with_fields)
    # Only the user who has a field gets a call; a member with none is not re-sent.
    assert calls(gleap) == {"u1": {"userId": "u1", "paying": True, "email": "a@x.io"}}
    assert only(report, "paying").changed == 1


def test_the_dry_run_plans_exactly_the_calls_with_the_fields_that_go_out(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    rows: list[dict[str, Any]] = [
        {
            "user_id": "u1",
            "segment": "a",
            "email": "first@x.io",
            "last_page_view": "/a",
            "last_activity": "2026-01-01",
        },
        {"user_id": "u1", "segment": "b", "email": "second@x.io", "lang": "DE"},
        {"user_id": "u2", "segment": "a", "email": "u2@x.io"},
        {"user_id": "u3", "segment": "a", "email": "u3@x.io"},
    ]
    people(source, rows)
    config = make_config(
        base_url=gleap.base_url,
        audiences=audience("Gold", "user_id, email, last_page_view, last_activity", "a")
        + audience("Silver", "user_id, email, lang", "b"),
    )

    def planned_then_sent(**kwargs: Any) -> list[dict[str, Any]]:
        planned: list[PlannedCall] = []
        gleap.reset_log()
        cycle(config, dry_run=True, show_calls=planned.extend, **kwargs)
        assert gleap.requests == []
        cycle(config, **kwargs)
        sent = sorted(gleap.identify_calls, key=lambda b: str(b["userId"]))
        assert sent == [identify_body(c.user_id, c.attributes) for c in planned]
        return sent

    first = planned_then_sent()
    assert first[0] == {
        "userId": "u1",
        "gold": True,
        "silver": True,
        "email": "first@x.io",
        "lang": "de",
        "lastActivity": "2026-01-01T00:00:00.000Z",
        "lastPageView": {"page": "/a", "date": "2026-01-01T00:00:00.000Z"},
    }
    rows[2]["email"] = "new@x.io"  # u2 changes, u3 leaves, u1 leaves gold but stays in silver
    people(source, [rows[1], rows[2]])
    assert planned_then_sent(allow_removals=True) == [
        {"userId": "u1", "gold": False, "email": "second@x.io"},
        {"userId": "u2", "gold": True, "email": "new@x.io"},
        {"userId": "u3", "gold": False},
    ]
    assert planned_then_sent(full=True) == [
        {"userId": "u1", "silver": True, "email": "second@x.io", "lang": "de"},
        {"userId": "u2", "gold": True, "email": "new@x.io"},
    ]


def test_a_query_without_fields_takes_the_ids_only_diff_once_the_store_holds_no_fields(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    valued: list[bool] = []
    refresh = store_mod.Store.refresh

    def spy(self: store_mod.Store, *args: Any, **kwargs: Any) -> store_mod.Refresh:
        valued.append(kwargs["valued"])
        return refresh(self, *args, **kwargs)

    monkeypatch.setattr(store_mod.Store, "refresh", spy)
    people(source, [{"user_id": "u1", "email": "a@x.io"}, {"user_id": "u2"}])
    with_fields = make_config(base_url=gleap.base_url, audiences=audience("Paying", "user_id, email"))
    cycle(with_fields)
    ids_only = make_config(
        base_url=gleap.base_url, audiences=audience("Paying", "user_id"), create_store=False
    )
    gleap.reset_log()
    cycle(ids_only)  # the stored fields are diffed away: u1's true goes once more, without them
    assert calls(gleap) == {"u1": {"userId": "u1", "paying": True}}
    assert gleap.contacts["u1"]["email"] == "a@x.io"  # Gleap keeps what it has
    gleap.reset_log()
    cycle(ids_only)
    assert gleap.identify_calls == []
    assert valued == [True, True, False]


def test_a_trait_shares_the_call_and_its_key_is_no_custom_attribute(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    people(source, [{"user_id": "u1", "email": "a@x.io", "plan": "gold"}])
    trait = """
[[traits]]
name = "Tier"
source = "main"
query = "SELECT user_id, plan AS value FROM people"
"""
    config = make_config(
        base_url=gleap.base_url,
        audiences=audience("Paying", "user_id, email, plan AS TIER, 5 AS seats") + trait,
    )
    planned: list[PlannedCall] = []
    cycle(config, dry_run=True, show_calls=planned.extend)
    report = cycle(config)
    assert calls(gleap) == {
        "u1": {"userId": "u1", "paying": True, "tier": "gold", "email": "a@x.io", "seats": 5}
    }
    assert [identify_body(c.user_id, c.attributes) for c in planned] == gleap.identify_calls
    [note] = only(report, "paying").field_notes
    assert "column 'TIER' is not sent" in note and "trait key 'tier'" in note
