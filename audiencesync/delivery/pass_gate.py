"""The daemon's delivery passes, and the store changes that must never race one.

A rename (``renames.py``) gives a property's row a new key while keeping its id. A
pass under way sends that row's users under the key it planned with, and records
their answers by row id: had the rename come between a call and its answer, the
answer to ``old_key: true`` would acknowledge ``new_key`` (issue #19, A.1). So in
the daemon a rename waits until no pass is under way, and no pass starts while a
rename waits or runs. The rename asks the pass to end early (``wake``, which a pass
treats as new work): it ends once the calls in flight are answered and recorded,
as for any refresh.

A rename waiting is served before the next pass, else a loop of passes would
starve it. The delivery thread itself may rename between its passes (a delivery
run of a renamed property): no call is in flight then, so it goes straight on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class PassGate:
    """Delivery passes on one side, renames on the other, never both at once."""

    def __init__(self, wake: threading.Event | None = None) -> None:
        self._changed = threading.Condition()
        self._passing: int | None = None  # the thread running a pass
        self._changing = False
        self._waiting = 0  # renames waiting for the pass to end
        self.wake = wake  # set to end the pass under way early

    @contextlib.contextmanager
    def passing(self) -> Iterator[None]:
        """A delivery pass: waits for a rename running or waiting, and holds them off."""
        with self._changed:
            self._changed.wait_for(lambda: not self._changing and not self._waiting)
            self._passing = threading.get_ident()
        try:
            yield
        finally:
            with self._changed:
                self._passing = None
                self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """A rename: waits for the pass under way to end (asking it to end early), and for
        any other rename; no pass starts until it is done."""
        me = threading.get_ident()
        with self._changed:
            if self._passing == me:
                mine = True  # the delivery thread, between two passes: nothing in flight
            else:
                mine = False
                self._waiting += 1
                try:
                    if self._passing is not None and self.wake is not None:
                        self.wake.set()
                    self._changed.wait_for(lambda: self._passing is None and not self._changing)
                finally:
                    self._waiting -= 1
                self._changing = True
        if mine:
            yield
            return
        try:
            yield
        finally:
            with self._changed:
                self._changing = False
                self._changed.notify_all()
