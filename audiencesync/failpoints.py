"""Named places where the crash-safety tests make this process die, as a SIGKILL would.

Set ``AUDIENCESYNC_FAILPOINT=NAME`` (or ``NAME:N`` for the N-th time it is
reached) in the environment of an ``audiencesync`` process. Reaching that
point kills the process at once with SIGKILL: no cleanup, no finally blocks,
exactly what a power cut or the OOM killer does. ``NAME:N:raise`` raises an
unexpected exception there instead, to see what a bug's traceback shows.
Unset, each point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "AUDIENCESYNC_FAILPOINT"
_reached: Counter[str] = Counter()


def reach(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != name:
        return
    nth, _, action = rest.partition(":")
    _reached[name] += 1
    if _reached[name] < int(nth or 1):
        return
    if action == "raise":
        raise RuntimeError(f"failpoint {name} reached")
    os.kill(os.getpid(), signal.SIGKILL)
