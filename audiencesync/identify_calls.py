"""What a user's identify calls carry: their pending properties and contact fields, packed into bodies.

Pure: no I/O. Each pending row (one audience's value for the user) brings
its own part of the body: its key and value, and, when the user is a member,
the contact fields that row gives, with the values that win for the user
(the merge over all their member audiences, first in the config wins). A
row also brings the fields it gave when Gleap last acknowledged it: if it
no longer gives one (the user left, or the column is NULL now), the next
audience that gives it now wins, and that value goes out.

Parts are packed into calls of at most Gleap's 35 custom keys; a row's part
is never split, so each call's 2xx acknowledges exactly the rows it carried.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from audiencesync import payload
from audiencesync.fields import Conflict, Fields, is_custom, merge_fields
from audiencesync.outcomes import PendingChange

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
    gave: Collection[str] = (),
    max_keys: int = 35,
) -> Fields:
    """One row's part of the body: ``{key: value}`` and the winning values of the fields it
    ``gives`` now (as a member) or ``gave`` when last acknowledged, within ``max_keys`` custom keys.

    ``merged`` holds the user's fields merged over their member audiences. A
    field nobody gives any more is left out: Gleap keeps what it has.
    """
    part: Fields = {}
    used = 1
    for name in [*sorted(gives), *sorted(set(gave) - set(gives))]:
        if name not in merged or name in part:
            continue
        if is_custom(name):
            if used >= max_keys:
                continue  # only fields the row used to give can be over: the mapper caps the others
            used += 1
        part[name] = merged[name]
    part[key] = value
    return part


@dataclass
class Call(Generic[C]):
    """One identify call: the rows it acknowledges, and the body's attributes (without userId)."""

    changes: list[C]
    attributes: Fields


def pack(parts: Sequence[tuple[C, Mapping[str, Any]]], max_keys: int = 35) -> list[Call[C]]:
    """Rows' parts into as few calls as fit, in order: a part goes into the current call when
    the union stays within ``max_keys`` custom keys, else it starts the next one."""
    calls: list[Call[C]] = []
    for change, part in parts:
        if calls and custom_keys(calls[-1].attributes | dict(part)) <= max_keys:
            calls[-1].changes.append(change)
            calls[-1].attributes.update(part)
        else:
            calls.append(Call([change], dict(part)))
    return calls


def user_calls(
    changes: Sequence[PendingChange],
    keys: Mapping[int, str],
    members: Sequence[tuple[str, Mapping[str, Any] | None]] = (),
    gave: Mapping[int, Collection[str]] | None = None,
    max_keys: int = 35,
) -> tuple[list[Call[PendingChange]], list[Conflict]]:
    """One user's calls for their pending ``changes``, and the field conflicts that went out.

    ``members``: (audience key, fields) of every audience the user is a member
    of now, in config order; ``gave``: per audience id, the fields of the value
    Gleap last acknowledged for it. A trait's change carries its value alone.
    """
    merged, conflicts = merge_fields(members)
    gave = gave or {}
    parts: list[tuple[PendingChange, Mapping[str, Any]]] = []
    for change in changes:
        key = keys[change.audience_id]
        if change.kind != "audience":
            parts.append((change, {key: payload.attribute(change)}))
            continue
        gives = change.value if change.desired and isinstance(change.value, dict) else {}
        part = row_part(
            key,
            change.desired,
            merged=merged,
            gives=gives,
            gave=gave.get(change.audience_id, ()),
            max_keys=max_keys,
        )
        parts.append((change, part))
    calls = pack(parts, max_keys)
    sent = {name for call in calls for name in call.attributes}
    return calls, [conflict for conflict in conflicts if conflict.field in sent]
