"""User ids as a source gives them: their one canonical text, the checks each passes, and the counts.

Apart from ``sources.py`` (which reads a source in batches) because an id's form is a
contract of its own: the text Gleap gets for it (``canonical_user_id``, also what
`forget` reads its ids with), the ids refused and why (too long, control characters),
and what a read saw (``ReadStats``). ``pushdown.py`` spells the same checks in SQL.
"""

from __future__ import annotations

import decimal
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_ID_LENGTH = 255
SAMPLE_SIZE = 5


def canonical_user_id(value: Any) -> str | None:
    """The one string form Gleap gets for a source value, or None when it is no usable id.

    Integers (and integral floats and decimals, which drivers produce for
    NUMERIC columns) lose any ".0"; UUIDs are lowercase and hyphenated.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float | decimal.Decimal):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        if value == int(value):
            return str(int(value))
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    text = str(value)
    if not text.strip():
        return None
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


TOO_LONG = f"longer than {MAX_ID_LENGTH} characters"
CONTROL_CHARACTERS = "holds control characters"


def _bad_id_reason(user_id: str) -> str | None:
    if len(user_id) > MAX_ID_LENGTH:
        return TOO_LONG
    # A regex, not a per-character loop: this runs once per source row (10x faster, measured).
    if _CONTROL.search(user_id):
        return CONTROL_CHARACTERS
    return None


@dataclass
class ReadStats:
    """What a source read saw; filled in while the batches are consumed."""

    rows: int = 0
    skipped_blank: int = 0
    skipped_invalid: int = 0
    invalid_samples: list[str] = field(default_factory=list)
    no_value: int = 0  # rows whose value is NULL: the user has no value
    skipped_values: int = 0  # rows whose value no Gleap attribute can hold (a counted warning)
    value_samples: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.skipped_blank + self.skipped_invalid + self.no_value + self.skipped_values

    def skip_invalid(self, user_id: str, reason: str) -> None:
        """Count a row skipped for a bad id, keeping the first few as samples."""
        self.skipped_invalid += 1
        if len(self.invalid_samples) < SAMPLE_SIZE:
            self.invalid_samples.append(f"{user_id[:40]!r}: {reason}")

    def skip_value(self, user_id: str, reason: object) -> None:
        """Count a row skipped for a value no Gleap attribute can hold, keeping the first few
        as samples."""
        self.skipped_values += 1
        if len(self.value_samples) < SAMPLE_SIZE:
            self.value_samples.append(f"{user_id[:40]!r}: {reason}")

    def count_pushed(self, rows: int, blank: int, bad: int, samples: list[tuple[str, bool]]) -> None:
        """Count what the checks made in SQL saw (``pushdown.load_stage``): ``rows``, ``blank``
        and ``bad`` ids, and ``samples`` of the bad ones (id, too long or else control
        characters), as ``checked_ids`` counts a streamed read."""
        self.rows += rows
        self.skipped_blank += blank
        for user_id, too_long in samples:
            self.skip_invalid(user_id, TOO_LONG if too_long else CONTROL_CHARACTERS)
        self.skipped_invalid += bad - len(samples)


def checked_ids(raw: list[Any], stats: ReadStats) -> list[str | None]:
    """The canonical id of each source value, None for a row skipped; every row counted in
    ``stats``, and the skipped ones with why.

    Most batches are all text (or all integers) with nothing to skip: they are
    checked a batch at a time in C (one regex over the joined batch, one max of
    lengths) and returned as they are, since the per-row checks cost more than
    staging the ids (measured: about 2 s of a 1M-member read). Any other batch is
    checked row by row.
    """
    stats.rows += len(raw)
    kinds = set(map(type, raw))
    ids: list[Any] | None = raw if kinds <= {str} else list(map(str, raw)) if kinds <= {int} else None
    if (
        ids is not None
        and all(map(str.strip, ids))
        and max(map(len, ids), default=0) <= MAX_ID_LENGTH
        and not _CONTROL.search("".join(ids))
    ):
        return ids
    checked: list[str | None] = []
    for value in raw:
        user_id = canonical_user_id(value)
        if user_id is None:
            stats.skipped_blank += 1
        elif (reason := _bad_id_reason(user_id)) is not None:
            stats.skip_invalid(user_id, reason)
            user_id = None
        checked.append(user_id)
    return checked
