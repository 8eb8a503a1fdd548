"""Reading one TOML table of the config: typed values, durations, and typos reported as such."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, TypeVar

from audiencesync.errors import ConfigError

T = TypeVar("T")

_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")
_UNIT_SECONDS = (7 * 86400, 86400, 3600, 60)


def parse_duration(text: str) -> float | None:
    """Seconds in "90s", "45m", "2h", "1h30m", "3d" or "2w"; None when the text is not such a duration."""
    match = _DURATION.fullmatch(text.strip())
    if not match or not any(match.groups()):
        return None
    *whole, seconds = match.groups()
    return sum(int(n or 0) * unit for n, unit in zip(whole, _UNIT_SECONDS, strict=True)) + float(seconds or 0)


# What a TOML file's author calls each type (Python's names, "int" or "str", are not theirs).
TOML_TYPES: dict[type, str] = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def toml_type(kind: type) -> str:
    return TOML_TYPES.get(kind, f"a {kind.__name__}")


class Table:
    """One TOML table being read: type-checks each key and reports leftovers as typos."""

    def __init__(self, data: Any, path: Path, where: str, allowed: list[str]) -> None:
        if not isinstance(data, dict):
            raise ConfigError("must be a table", path=str(path), where=where)
        self._data = dict(data)
        self.path = path
        self.where = where
        # Typos first: a misspelt key would otherwise surface as a missing one.
        for key in self._data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(allowed)}"
                raise self.error(
                    f"unknown key {key!r}", key=key, fix=f"remove it or fix its spelling ({hint})"
                )

    def place(self, key: str | None = None) -> str:
        return f"{self.where}.{key}" if key else self.where

    def error(self, message: str, fix: str | None = None, key: str | None = None) -> ConfigError:
        return ConfigError(message, path=str(self.path), where=self.place(key), fix=fix)

    def take(self, key: str, kind: type[T], default: T | None = None, *, required: bool = False) -> T:
        if key not in self._data:
            if required or default is None:
                raise self.error(f"the key {key!r} is required", fix=f"add {key} = ...")
            return default
        value = self._data.pop(key)
        # TOML integers are fine where a float is expected; booleans are not numbers here.
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.error(
                f"must be {toml_type(kind)}, not {toml_type(type(value))}",
                key=key,
                fix=f"write {key} as {toml_type(kind)}"
                + (" (without quotes)" if isinstance(value, str) else ""),
            )
        return value

    def take_optional(self, key: str, kind: type[T]) -> T | None:
        if key not in self._data:
            return None
        return self.take(key, kind, required=True)

    def take_raw(self, key: str) -> Any:
        """The value as TOML gave it, for a key whose type the caller checks; None when absent."""
        return self._data.pop(key, None)

    def take_positive(self, key: str, kind: type[T], default: T) -> T:
        value = self.take(key, kind, default)
        if value <= 0:  # type: ignore[operator]
            raise self.error("must be greater than zero", key=key, fix=f"set {key} to a positive number")
        return value

    def take_duration(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        text = self.take_optional(key, str)
        if text is None:
            return default
        seconds = parse_duration(text)
        if seconds is None or (seconds == 0 and not allow_zero):
            raise self.error(
                f"{text!r} is not a duration",
                key=key,
                fix=f'write {key} as a string like "90s", "45m", "2h", "1h30m" or "3d"',
            )
        return seconds
