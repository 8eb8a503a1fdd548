"""Answers recorded against the key their call carried, not against the row that has the id now.

A call carries ``key: value`` for each row it delivers, the key being the one the pass
planned with. Answers are recorded by row id; a rename keeps the row's id and gives it
a new key, and a new row to the old key (``renames.py``). Had a rename come between a
call and its answer (the daemon prevents it, ``pass_gate.py``; this makes the answers
immune whatever the cause), the answer to ``old: true`` would acknowledge ``new``, which
Gleap never got (issue #19, A.1). So before a batch of answers is recorded, each row
whose key is no longer the one its call carried is recorded against the row that holds
that key now: for a rename, the old key's retired row, which then still owes ``old:
false``; the renamed row stays owed its value under the new key.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync.store.outcomes import Outcome
from audiencesync.store.schema import audiences

log = logging.getLogger(__name__)


def as_carried(
    conn: Connection, results: Sequence[Outcome], run_ids: dict[int, int], keys: Mapping[int, str]
) -> tuple[Sequence[Outcome], dict[int, int]]:
    """``results`` with each change moved to the row holding the key its call carried
    (``keys``: row id -> the key it went out under), and the run ids of the rows moved to
    (the run of the call's row). Read inside the recording transaction, so that no rename
    can commit between this look and the write."""
    carried = {
        c.audience_id: keys[c.audience_id] for o in results for c in o.changes if c.audience_id in keys
    }
    if not carried:
        return results, run_ids
    rows = conn.execute(
        sa.select(audiences.c.id, audiences.c.key).where(
            sa.or_(audiences.c.id.in_(carried), audiences.c.key.in_(set(carried.values())))
        )
    ).all()
    key_of = {int(r.id): str(r.key) for r in rows}
    id_of = {str(r.key): int(r.id) for r in rows}
    moved = {i: id_of.get(k) for i, k in carried.items() if key_of.get(i) != k}
    if not moved:
        return results, run_ids
    log.warning(
        "answers to calls that carried %s recorded under that key: its row was renamed meanwhile",
        ", ".join(sorted({carried[i] for i in moved})),
    )
    out: list[Outcome] = []
    for result in results:
        changes = []
        for change in result.changes:
            if change.audience_id not in moved:
                changes.append(change)
            elif (to := moved[change.audience_id]) is not None:
                changes.append(dataclasses.replace(change, audience_id=to))
            # else: no row has the key any more, so nothing to record it against (a rename
            # always leaves one; kept safe rather than acknowledging the wrong key).
        if changes:
            out.append(dataclasses.replace(result, changes=tuple(changes)))
    extra = {to: run_ids[old] for old, to in moved.items() if to is not None and old in run_ids}
    return out, extra | run_ids
