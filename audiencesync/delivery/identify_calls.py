"""What a user's identify calls carry: their pending properties and contact fields, packed into bodies.

Pure: no I/O. Each pending row (one audience's value for the user) brings
its own part of the body: its key and value, and, when the user is a member,
the contact fields that row gives, with the values that win for the user
(the merge over all their member audiences, first in the config wins).

Besides, every call of the user carries each winning field that Gleap does not
hold (``held``: what it acknowledged per field, ``contact_fields``): a field the
leaving audience gave, whose next winner now goes out; one whose winner changed
because an audience was retired, removed or moved in the config. After a call
with no verdict (a carried row is marked unknown), Gleap may hold anything that
call carried, so every winning field goes.

Parts are packed into calls of at most Gleap's 35 custom keys; a row's part
is never split, so each call's 2xx acknowledges exactly the rows it carried,
and the fields it carried (``Call.fields``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from audiencesync import values
from audiencesync.delivery import payload
from audiencesync.fields import Conflict, Fields, is_custom, merge_fields
from audiencesync.store.outcomes import PendingChange

C = TypeVar("C")


def custom_keys(body: Mapping[str, Any]) -> int:
    """How many of Gleap's 35 custom keys a body uses (contact fields and userId don't count)."""
    return sum(1 for name in body if is_custom(name))


def row_part(
    key: str,
    value: Any,
    *,
    merged: Mapping[str, Any],
    gives: Collection[str] = (),
    max_keys: int = 35,
) -> Fields:
    """One row's part of the body: ``{key: value}`` and the winning values of the fields it
    ``gives`` now (as a member), within ``max_keys`` custom keys.

    ``merged`` holds the user's fields merged over their member audiences. A
    field nobody gives any more is left out: Gleap keeps what it has.
    """
    part: Fields = {}
    used = 1
    for name in sorted(gives):
        if name not in merged or name in part:
            continue
        if is_custom(name):
            if used >= max_keys:
                continue  # the mapper caps an audience's custom attributes below this
            used += 1
        part[name] = merged[name]
    part[key] = value
    return part


@dataclass
class Call(Generic[C]):
    """One identify call: the rows it acknowledges, and the body's attributes (without userId)."""

    changes: list[C]
    attributes: Fields
    # The contact fields among the attributes (neither a property's key nor its value):
    # what a 2xx tells Gleap holds for the user (``contact_fields``).
    fields: Fields = dataclasses.field(default_factory=dict)
    # The losing audience of each field conflict this call is the first of the user's to carry.
    conflicts: list[str] = dataclasses.field(default_factory=list)


def pack(parts: Sequence[tuple[C, Mapping[str, Any]]], max_keys: int = 35) -> list[Call[C]]:
    """Rows' parts into as few calls as fit, in order: a part goes into the current call when
    the union stays within ``max_keys`` custom keys, else it starts the next one."""
    calls: list[Call[C]] = []
    for change, part in parts:
        if calls and custom_keys(calls[-1].attributes | dict(part)) <= max_keys:
            if change not in calls[-1].changes:  # a carrier of owed fields is already in it
                calls[-1].changes.append(change)
            calls[-1].attributes.update(part)
        else:
            calls.append(Call([change], dict(part)))
    return calls


def user_calls(
    changes: Sequence[PendingChange],
    keys: Mapping[int, str],
    members: Sequence[tuple[str, Mapping[str, Any] | None]] = (),
    held: Mapping[str, str] | None = None,
    max_keys: int = 35,
) -> tuple[list[Call[PendingChange]], list[Conflict]]:
    """One user's calls for their pending ``changes``, and the field conflicts that went out.

    ``members``: (audience key, fields) of every audience the user is a member
    of now, in config order; ``held``: per field, the canonical JSON of the value
    Gleap acknowledged (a field missing is not known to be held). A trait's change
    carries its value alone.
    """
    merged, conflicts = merge_fields(members)
    parts: list[tuple[PendingChange, Mapping[str, Any]]] = []
    for change in changes:
        key = keys[change.audience_id]
        if change.kind != "audience":
            parts.append((change, {key: payload.attribute(change)}))
            continue
        gives = change.value if change.desired and isinstance(change.value, dict) else {}
        parts.append((change, row_part(key, change.desired, merged=merged, gives=gives, max_keys=max_keys)))
    if changes and merged:
        carried = {name for _, part in parts for name in part}
        owed = owed_fields(merged, held or {}, everything=any(c.unknown for c in changes)) - carried
        parts += _owed_parts(changes[0], parts[0][1], keys[changes[0].audience_id], merged, owed, max_keys)
    calls = pack(parts, max_keys)
    property_keys = {keys[change.audience_id] for change in changes}
    for call in calls:
        call.fields = {name: value for name, value in call.attributes.items() if name not in property_keys}
    sent = {name for call in calls for name in call.fields}
    lost = [conflict for conflict in conflicts if conflict.field in sent]
    for conflict in lost:
        # On one call, so that a user's conflict counts once however many calls carry the field.
        next(call for call in calls if conflict.field in call.fields).conflicts.append(conflict.loser)
    return calls, lost


def owed_fields(merged: Mapping[str, Any], held: Mapping[str, str], *, everything: bool = False) -> set[str]:
    """The winning fields Gleap does not hold (all of them when ``everything``: an earlier call
    had no verdict, so Gleap may hold anything it carried)."""
    if everything:
        return set(merged)
    return {name for name, value in merged.items() if held.get(name) != values.encode(value)}


def _owed_parts(
    carrier: PendingChange,
    carrier_part: Mapping[str, Any],
    key: str,
    merged: Mapping[str, Any],
    owed: Collection[str],
    max_keys: int,
) -> list[tuple[PendingChange, Fields]]:
    """The owed fields as parts that ride the user's first change (its key and value again):
    the standard ones in one part, the custom ones a call's worth at a time, so that however
    many are owed, each goes in some call, and that call's 2xx acknowledges it."""
    if not owed:
        return []
    base = {key: carrier_part[key]}
    standard = {name: merged[name] for name in sorted(owed) if not is_custom(name)}
    custom = [name for name in sorted(owed) if is_custom(name)]
    room = max_keys - custom_keys(base)
    chunks = [custom[i : i + room] for i in range(0, len(custom), room)] or [[]]
    parts = [(carrier, base | {name: merged[name] for name in chunk}) for chunk in chunks]
    parts[0][1].update(standard)
    return parts
