"""How the command line writes a list of rows: a table for people, or csv, json or jsonl for programs.

Every format streams: rows are written as they come, so a list of ten million
rows runs in flat memory. The table (tables.py) holds its first few hundred rows
back to size its columns, no more.

Values are typed, and each format renders them its own way: a datetime is full
ISO 8601 in UTC for programs and to the second for people; a timedelta is
seconds for programs and "3h20m" for people; None is JSON null, an empty csv
cell, or "-" in a table.
"""

from __future__ import annotations

import argparse
import csv
import enum
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import IO, Literal

from audiencesync.cli.tables import (
    Layout,
    Row,
    checked as _checked,
    flush_now_and_then as _flush_now_and_then,
    table_width,
    write_table,
)

FORMATS = ("table", "csv", "json", "jsonl")


class _Width(enum.Enum):
    OF_OUT = "the terminal's width when the output is a terminal, else no limit"


# write_rows's default width: decided by table_width from the stream itself.
OF_OUT: Literal[_Width.OF_OUT] = _Width.OF_OUT


def add_format_option(parser: argparse.ArgumentParser, default: str = "table") -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=default,
        help=(
            "table (for people; fit to the width on a terminal, whole values elsewhere), csv, "
            f"json (one array) or jsonl (default: {default})"
        ),
    )


def write_rows(
    out: IO[str],
    fmt: str,
    columns: Sequence[str],
    rows: Iterable[Row],
    *,
    layout: Layout | None = None,
    width: int | Literal[_Width.OF_OUT] | None = OF_OUT,
    notes: IO[str] | None = None,
) -> int:
    """Write ``rows`` (each a value per column) to ``out`` in ``fmt``; returns how many were written.

    ``layout``: what a table on a terminal keeps when it must lose columns (default: the first).
    ``width``: the table's, None for no limit (default: ``table_width(out)``, the terminal's
    when ``out`` is one, else no limit).
    ``notes`` (default stderr) gets the one line saying a table was cut, when it was.
    """
    writers: dict[str, Callable[[IO[str], Sequence[str], Iterable[Row]], int]] = {
        "csv": _write_csv,
        "json": _write_json,
        "jsonl": _write_jsonl,
    }
    if fmt == "table":
        size = table_width(out) if width is OF_OUT else width
        count, cut = write_table(out, columns, rows, size, layout or Layout())
        out.flush()
        if cut is not None:
            print(cut, file=notes or sys.stderr)
        return count
    if fmt not in writers:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    count = writers[fmt](out, columns, rows)
    out.flush()
    return count


def machine_time(value: datetime) -> str:
    """A time for programs: ISO 8601 in UTC with its offset and microseconds (naive means UTC).

    A fixed width makes csv cells sort as text in time order.
    """
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.isoformat(timespec="microseconds")


# --- programs -------------------------------------------------------------------


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return machine_time(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)  # Decimal, UUID...: as the database would print them


def csv_value(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"  # as JSON writes them, not Python's True
    return "" if value is None else _json_value(value)


def _write_csv(out: IO[str], columns: Sequence[str], rows: Iterable[Row]) -> int:
    # "\n", not RFC 4180's "\r\n": lines that wc, grep and head count right; csv readers take both.
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    count = 0
    for count, row in enumerate(rows, 1):
        writer.writerow([csv_value(v) for v in _checked(columns, row)])
        _flush_now_and_then(out, count)
    return count


def json_object(columns: Sequence[str], row: Row) -> str:
    return json.dumps({c: _json_value(v) for c, v in zip(columns, _checked(columns, row), strict=True)})


def _write_json(out: IO[str], columns: Sequence[str], rows: Iterable[Row]) -> int:
    # One array, an object a line: valid JSON at any length, zero rows included ("[]").
    out.write("[")
    count = 0
    for count, row in enumerate(rows, 1):
        out.write(("\n" if count == 1 else ",\n") + json_object(columns, row))
        _flush_now_and_then(out, count)
    out.write("\n]\n" if count else "]\n")
    return count


def _write_jsonl(out: IO[str], columns: Sequence[str], rows: Iterable[Row]) -> int:
    count = 0
    for count, row in enumerate(rows, 1):
        out.write(json_object(columns, row) + "\n")
        _flush_now_and_then(out, count)
    return count
