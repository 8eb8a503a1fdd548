"""identify_calls.py: a user's pending rows and fields, packed into calls of at most 35 custom keys."""

from __future__ import annotations

from audiencesync import values
from audiencesync.delivery.identify_calls import custom_keys, owed_fields, pack, row_part, user_calls
from audiencesync.store.outcomes import PendingChange


def test_a_member_row_carries_the_winning_values_of_the_fields_it_gives() -> None:
    merged = {"email": "first@x.io", "plan": "gold", "seats": 3}
    part = row_part("silver", True, merged=merged, gives={"email", "seats"})
    assert part == {"email": "first@x.io", "seats": 3, "silver": True}


def held(**fields: object) -> dict[str, str]:
    return {name: values.encode(value) for name, value in fields.items()}


def test_a_leaver_carries_its_false_and_only_the_winning_fields_gleap_does_not_hold() -> None:
    leave = [PendingChange(1, "u1", False)]
    [call], _ = user_calls(leave, {1: "gold"}, [], held(email="a@x.io"))
    assert call.attributes == {"gold": False} and call.fields == {}
    # Still a member elsewhere: the other audience's email now wins; its plan Gleap has already.
    members = [("silver", {"email": "b@x.io", "plan": "x"})]
    [call], _ = user_calls(leave, {1: "gold"}, members, held(email="a@x.io", plan="x"))
    assert call.attributes == {"gold": False, "email": "b@x.io"} and call.fields == {"email": "b@x.io"}


def test_after_a_call_with_no_verdict_every_winning_field_goes() -> None:
    members = [("silver", {"email": "b@x.io", "plan": "x"})]
    unknown = [PendingChange(1, "u1", False, unknown=True)]
    [call], _ = user_calls(unknown, {1: "gold"}, members, held(email="b@x.io", plan="x"))
    assert call.fields == {"email": "b@x.io", "plan": "x"}
    assert owed_fields({"plan": "x"}, held(plan="x")) == set()
    assert owed_fields({"plan": 1}, held(plan="1")) == {"plan"}  # 1 and "1" are not the same value


def test_owed_custom_fields_beyond_one_call_ride_more_calls_of_the_first_change() -> None:
    members = [("a", {f"c{n:02d}": n for n in range(34)}), ("b", {f"d{n:02d}": n for n in range(34)})]
    change = PendingChange(1, "u1", True, value={"e": 1})
    calls, _ = user_calls([change], {1: "x"}, members, {}, 35)
    assert all(custom_keys(c.attributes) <= 35 and c.changes == [change] for c in calls)
    assert {k for c in calls for k in c.fields} == {f"c{n:02d}" for n in range(34)} | {
        f"d{n:02d}" for n in range(34)
    }


def test_a_row_part_stays_within_the_custom_key_limit() -> None:
    merged = {f"a{n:02d}": n for n in range(40)}
    gives = {f"a{n:02d}" for n in range(36)}
    part = row_part("k", True, merged=merged | {"email": "e"}, gives=gives | {"email"})
    assert custom_keys(part) == 35 and "email" in part and "k" in part


def test_pack_fills_calls_up_to_35_custom_keys_in_order_without_splitting_a_part() -> None:
    parts = [(f"row{n}", {f"row{n}": True, f"row{n}_x": n, "email": "e"}) for n in range(20)]
    calls = pack(parts)
    assert [len(c.changes) for c in calls] == [17, 3]
    assert [custom_keys(c.attributes) for c in calls] == [34, 6]
    assert calls[0].changes[0] == "row0" and calls[1].changes == ["row17", "row18", "row19"]
    assert all(c.attributes["email"] == "e" for c in calls)


def test_shared_fields_count_once() -> None:
    parts = [(n, {"shared": 1, f"k{n}": True}) for n in range(34)]
    [call] = pack(parts)
    assert custom_keys(call.attributes) == 35 and len(call.changes) == 34


def test_booleans_alone_pack_as_before() -> None:
    calls = pack([(n, {f"k{n:02d}": True}) for n in range(71)])
    assert [len(c.changes) for c in calls] == [35, 35, 1]
