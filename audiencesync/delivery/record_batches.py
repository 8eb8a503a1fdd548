"""Gleap's answers, recorded in batches: one store transaction per batch, and a window that bounds
what a crash can make the next run send again.

Apart from ``delivery.py`` because the window is a guarantee of its own (the README's "What a
crash can cause"): a kill re-sends at most the calls whose answers were not yet recorded, that is
the ``max_concurrency`` calls in flight and at most ``RECORD_WINDOW`` answers waiting for their batch.
"""

from __future__ import annotations

import asyncio

from audiencesync.store.outcomes import Outcome

# Answers received but not yet recorded, at most (on top of the max_concurrency calls in flight).
# Two batches' worth, so that one batch fills while the one before is written.
RECORD_WINDOW = 100
RECORD_BATCH = RECORD_WINDOW // 2  # answers per store transaction, at most
RECORD_LINGER = 0.05  # seconds a batch waits for more answers after its first one


async def next_batch(answers: asyncio.Queue[Outcome | None]) -> tuple[list[Outcome], bool]:
    """The next batch of answers to record in one transaction, and whether the pass ended (None).

    Waits for a first answer, then takes more until ``RECORD_BATCH`` of them or
    ``RECORD_LINGER`` seconds have passed, whichever comes first.
    """
    loop = asyncio.get_running_loop()
    batch: list[Outcome] = []
    item = await answers.get()
    deadline = loop.time() + RECORD_LINGER
    while item is not None:
        batch.append(item)
        if len(batch) >= RECORD_BATCH:
            return batch, False
        if answers.empty():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch, False
            try:
                item = await asyncio.wait_for(answers.get(), remaining)
            except TimeoutError:
                return batch, False
        else:
            item = answers.get_nowait()
    return batch, True
