"""The calls of one delivery pass: audiences take turns a page of users at a time.

Apart from ``delivery.py`` (which sends the calls, records the answers and
bounds what is in flight) because the order is a guarantee of its own: a new
audience's hours-long first sync never starves the few changes of the others,
each user's due properties are coalesced into as few calls as Gleap allows,
and keyset cursors keep a pass finite even when calls fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import groupby

from audiencesync.delivery.identify_calls import Call, user_calls
from audiencesync.gleap.api import MAX_CUSTOM_KEYS
from audiencesync.store.member_fields import PageFields
from audiencesync.store.store import PendingChange, Store


def plan_calls(
    store: Store,
    audience_ids: Sequence[int],
    page_size: int = 100,
    *,
    keys: Mapping[int, str],
    field_order: Sequence[str] = (),
    on_page: Callable[[list[PendingChange]], None] | None = None,
) -> Iterator[tuple[str, Call[PendingChange]]]:
    """(user id, one call) for one pass over these audiences, in turns.

    A user's due changes go in one call, with the contact fields that win for
    them across the audiences of ``field_order`` (config order), or in several
    calls when they carry more than Gleap's 35 custom keys. Keyset cursors per
    audience make the pass finite even when calls fail. ``on_page`` sees each
    page's changes before any of them is yielded (the write-ahead mark of calls
    about to go out). Each call names the losing audiences of the field conflicts
    it carries (``Call.conflicts``): counted once Gleap acknowledges it, not here,
    as a call planned may never go out (the pass ends early) or be refused.

    Each user is called once per pass, with no per-user memory: a pass reads
    what was due when it started (one ``now`` for every page), and a user's
    call carries their due changes in every audience of the pass. So when an
    audience's page holds a user with a due change in another audience whose
    cursor has already passed them, that audience's page held them too, and
    their call carried this change: they are passed over. (Called and
    answered, their rows are no longer due: acknowledged, or backed off past
    ``now``; in flight, still marked due, they are caught by that rule.)
    """
    now = store.clock()
    cursors: dict[int, str | None] = dict.fromkeys(audience_ids, "")  # None: passed every user
    while any(cursor is not None for cursor in cursors.values()):
        for audience_id, after in cursors.items():
            if after is None:
                continue
            page = store.pending_page(audience_id, audience_ids, after, page_size, now=now, passed=cursors)
            if not page:
                cursors[audience_id] = None
                continue
            cursors[audience_id] = page[-1].user_id  # ordered by user, in the database's collation
            grouped = [(user_id, list(group)) for user_id, group in groupby(page, key=lambda c: c.user_id)]
            users = [(user, changes) for user, changes in grouped if not any(c.carried for c in changes)]
            fields = store.page_fields([u for u, _ in users], field_order) if field_order else PageFields()
            calls: list[tuple[str, Call[PendingChange]]] = []
            for user_id, changes in users:
                made, _ = user_calls(
                    changes, keys, fields.members.get(user_id, ()), fields.held.get(user_id), MAX_CUSTOM_KEYS
                )
                calls.extend((user_id, call) for call in made)
            if on_page is not None and calls:
                on_page([change for _, call in calls for change in call.changes])
            yield from calls
