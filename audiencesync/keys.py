"""Audience property keys: the snake_cased names Gleap receives as contact attributes."""

from __future__ import annotations

import re

import inflection

# Gleap's own contact fields. A custom attribute with one of these names would
# overwrite real contact data instead of recording audience membership.
RESERVED_KEYS = frozenset(
    {
        "userId",
        "email",
        "name",
        "phone",
        "companyName",
        "companyId",
        "lang",
        "plan",
        "value",
        "createdAt",
        "lastActivity",
        "lastPageView",
    }
)
_RESERVED_FOLDED = {k.lower(): k for k in RESERVED_KEYS} | {
    inflection.underscore(k): k for k in RESERVED_KEYS
}

_VALID_KEY = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")


def key_for_name(name: str) -> str:
    """Snake-case an audience name the way Engage does: "Churn-Risk (EU)" -> "churn_risk_eu".

    CamelCase is split, accents are transliterated, and every run of other
    characters becomes one underscore. The result may be empty (for "!!!").
    """
    return inflection.parameterize(inflection.underscore(name), separator="_")


def key_problem(key: str) -> str | None:
    """Why ``key`` can't be used as an audience property, or None when it can."""
    if not key:
        return "the key is empty"
    if not _VALID_KEY.fullmatch(key):
        return (
            f"the key {key!r} may hold only lowercase letters, digits and single "
            "underscores, and may not start or end with an underscore"
        )
    clash = _RESERVED_FOLDED.get(key)
    if clash is not None:
        return f"the key {key!r} collides with Gleap's contact field {clash!r}"
    return None
