"""What one identify call says for each of a user's pending properties: the attributes of its body.

One function for the delivery and the dry run, so the dry run prints exactly
what would be sent. ``gleap.identify_body`` adds the ``userId``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from audiencesync.store.outcomes import PendingChange


def attribute(change: PendingChange) -> Any:
    """An audience's value is its membership; a trait's is its value (``None``: null, or
    the trait's configured ``missing``, which the store already put in the change)."""
    return change.value if change.kind == "trait" else change.desired


def attributes(changes: Iterable[tuple[str, PendingChange]]) -> dict[str, Any]:
    """(key, change) pairs of one call -> its custom attributes, in the order given."""
    return {key: attribute(change) for key, change in changes}
