"""Rows marked outcome-unknown before their call goes out, and giving back the marks of calls never sent.

A delivery pass marks a page's rows unknown before any of their calls can leave (so a crash
mid-call counts as a call that may have been applied); ``delivery`` hands each call to a sender
and tells this module, and at the end of the pass the rows of calls never sent get their old
mark back. Imports only the store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from audiencesync.errors import AudienceSyncError
from audiencesync.store.store import PendingChange, Store

log = logging.getLogger(__name__)


class UnknownMarks:
    """Rows marked outcome-unknown ahead of their call, until the call is handed to a sender.

    Once handed over, the mark stays until the answer is stored: a call
    cancelled or killed in flight may have reached Gleap.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._open: dict[tuple[int, str], PendingChange] = {}

    def mark(self, changes: list[PendingChange]) -> None:
        self.store.mark_unknown(changes)
        with self._lock:
            self._open.update(((c.audience_id, c.user_id), c) for c in changes)

    def sent(self, changes: Sequence[PendingChange]) -> None:
        with self._lock:
            for change in changes:
                self._open.pop((change.audience_id, change.user_id), None)

    def unsent(self, changes: Sequence[PendingChange]) -> None:
        with self._lock:
            self._open.update(((c.audience_id, c.user_id), c) for c in changes)

    def restore(self) -> None:
        """Never sent: these rows get back the mark they had before this pass."""
        with self._lock:
            unsent = list(self._open.values())
            self._open.clear()
        if not unsent:
            return
        try:
            self.store.restore_unknown(unsent)
        except (AudienceSyncError, SQLAlchemyError) as exc:
            # Harmless: they stay pending, and the next pass sends them once more.
            log.warning("could not clear the marks of %d unsent call(s): %s", len(unsent), exc)
