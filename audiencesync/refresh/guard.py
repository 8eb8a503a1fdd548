"""The mass-removal guard: hold a refresh that would remove too much of an audience or trait."""

from __future__ import annotations

from audiencesync.config.loading import AudienceConfig
from audiencesync.store.diff import DiffCounts
from audiencesync.store.store import Guard


def removal_guard(audience: AudienceConfig) -> Guard:
    """Hold a cycle that would remove too much of an audience: a half-loaded or broken
    source must not send thousands of wrong ``false``s (for a trait: ``null``s)."""
    trait = audience.kind == "trait"
    members = "users with a value" if trait else "members"
    removing = "null" if trait else "remove"

    def guard(counts: DiffCounts) -> str | None:
        if not counts.left or counts.previous == 0:
            return None
        release = f"audiencesync sync --audience {audience.key} --allow-removals"
        if counts.members == 0:
            if audience.allow_empty:
                return None
            return (
                f"the source returned no rows, which would {removing} all {counts.previous} {members}. "
                f"Nothing was applied. Fix: check the source; if it is right, release it once with "
                f"`{release}`, or set allow_empty = true on the {audience.kind}"
            )
        if counts.left > audience.max_removal_fraction * counts.previous:
            return (
                f"this cycle would {removing} {counts.left} of {counts.previous} {members} "
                f"({counts.left / counts.previous:.0%}, more than max_removal_fraction = "
                f"{audience.max_removal_fraction:g}). Nothing was applied. Fix: check the source; "
                f"if it is right, release it once with `{release}`"
            )
        return None

    return guard
