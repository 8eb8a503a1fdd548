"""identify_calls.py: a user's pending rows and fields, packed into calls of at most 35 custom keys."""

from __future__ import annotations

from audiencesync.identify_calls import custom_keys, pack, row_part


def test_a_member_row_carries_the_winning_values_of_the_fields_it_gives() -> None:
    merged = {"email": "first@x.io", "plan": "gold", "seats": 3}
    part = row_part("silver", True, merged=merged, gives={"email", "seats"})
    assert part == {"email": "first@x.io", "seats": 3, "silver": True}


def test_a_leaver_carries_only_its_false_unless_another_audience_now_gives_what_it_gave() -> None:
    assert row_part("gold", False, merged={}, gave={"email"}) == {"gold": False}
    # Still a member elsewhere: the field the leaver gave now comes from that audience.
    assert row_part("gold", False, merged={"email": "b@x.io", "plan": "x"}, gave={"email"}) == {
        "email": "b@x.io",
        "gold": False,
    }


def test_a_row_part_stays_within_the_custom_key_limit() -> None:
    merged = {f"a{n:02d}": n for n in range(40)}
    gives = {f"a{n:02d}" for n in range(34)}
    part = row_part("k", True, merged=merged | {"email": "e"}, gives=gives | {"email"}, gave=set(merged))
    assert custom_keys(part) == 35 and "email" in part and "k" in part
    assert "a34" not in part  # what it only used to give is what makes way


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
