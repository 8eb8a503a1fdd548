"""The Gleap token, wrapped so that it never shows itself, and scrubbed from what could quote it."""

from __future__ import annotations

import re
from collections.abc import Iterable


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


MASK = "***"
# What a token occurrence must not touch to be a whole one: letters, digits and "_", of which
# words, numbers and timestamps are made ("HTTP", "400", "2026-12-06T01:25:56").
_WORD = "A-Za-z0-9_"
# What joins digits into one number, time or address: 0.5, 2026-12-06, 01:25:56, 127.0.0.1.
_JOIN = ".:-"


def _pattern(secret: str) -> str:
    """``secret`` as a whole occurrence: not inside a longer run of word characters, on either
    side where its own end is one (a token ending in "=" is bounded there by itself). A token of
    digits only is not whole either where a "." ":" or "-" joins it to more digits: there it is
    part of a number, a time or an address ("0" in 0.5, "12" in 2026-12-06, "00" in +00:00), and
    scrubbing it would make every timestamp invalid. A token with a letter is never part of one."""
    before = f"(?<![{_WORD}])" if re.match(f"[{_WORD}]", secret[0]) else ""
    after = f"(?![{_WORD}])" if re.match(f"[{_WORD}]", secret[-1]) else ""
    if re.fullmatch("[0-9]+", secret):
        before += f"(?<![0-9][{_JOIN}])"
        after += f"(?![{_JOIN}][0-9])"
    return before + re.escape(secret) + after


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every whole occurrence of each secret replaced by ***.

    A plain replacement would mangle every message for a short token ("T" in each timestamp,
    the 0s of "HTTP 400"): a token inside a longer word or number is not the token there."""
    for secret in secrets:
        if secret:
            text = re.sub(_pattern(secret), MASK, text)
    return text
