"""How the command line writes a list of rows: a table for people, or csv, json or jsonl for programs.

Every format streams: rows are written as they come, so a list of ten million
rows runs in flat memory. The table holds its first few hundred rows back to
size its columns, no more.

Values are typed, and each format renders them its own way: a datetime is full
ISO 8601 in UTC for programs and to the second for people; a timedelta is
seconds for programs and "3h20m" for people; None is JSON null, an empty csv
cell, or "-" in a table.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import IO

from audiencesync.errors import iso_time

FORMATS = ("table", "csv", "json", "jsonl")

# Rows the table reads ahead to size its columns; a later, longer cell is cut.
TABLE_SAMPLE_ROWS = 300
# Writes reach a pipe's reader in steady chunks, not one syscall a row.
FLUSH_EVERY_ROWS = 1000
# A column is cut no narrower than its header, or than a time shown whole: below that a cell
# says too little, and cutting the line (the last columns) is the clearer loss.
MIN_CUT_WIDTH = len("2026-12-01T19:25:25+00:00")
GAP = "  "
ELLIPSIS = "…"

Row = Sequence[object]


def add_format_option(parser: argparse.ArgumentParser, default: str = "table") -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=default,
        help=f"table (for people, cut to the terminal), csv, json (one array) or jsonl (default: {default})",
    )


def write_rows(
    out: IO[str],
    fmt: str,
    columns: Sequence[str],
    rows: Iterable[Row],
    *,
    width: int | None = None,
    notes: IO[str] | None = None,
) -> int:
    """Write ``rows`` (each a value per column) to ``out`` in ``fmt``; returns how many were written.

    ``width`` is the table's (default: the terminal's, 80 when not a terminal).
    ``notes`` (default stderr) gets the one line saying a table was cut.
    """
    writers: dict[str, Callable[[IO[str], Sequence[str], Iterable[Row]], int]] = {
        "csv": _write_csv,
        "json": _write_json,
        "jsonl": _write_jsonl,
    }
    if fmt == "table":
        count, cut_to = _write_table(out, columns, rows, width or shutil.get_terminal_size((80, 24)).columns)
        out.flush()
        if cut_to is not None:
            print(
                f"output was cut to {cut_to} columns; use --format csv or --format json for full values",
                file=notes or sys.stderr,
            )
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


def human_age(value: timedelta) -> str:
    """A span for people: 45s, 12m or 3h20m (the duration syntax the config reads)."""
    minutes, secs = divmod(max(0, int(value.total_seconds())), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m" if minutes else f"{secs}s")


# --- programs -------------------------------------------------------------------


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return machine_time(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)  # Decimal, UUID...: as the database would print them


def _csv_value(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"  # as JSON writes them, not Python's True
    return "" if value is None else _json_value(value)


def _write_csv(out: IO[str], columns: Sequence[str], rows: Iterable[Row]) -> int:
    # "\n", not RFC 4180's "\r\n": lines that wc, grep and head count right; csv readers take both.
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    count = 0
    for count, row in enumerate(rows, 1):
        writer.writerow([_csv_value(v) for v in _checked(columns, row)])
        _flush_now_and_then(out, count)
    return count


def _object(columns: Sequence[str], row: Row) -> str:
    return json.dumps({c: _json_value(v) for c, v in zip(columns, _checked(columns, row), strict=True)})


def _write_json(out: IO[str], columns: Sequence[str], rows: Iterable[Row]) -> int:
    # One array, an object a line: valid JSON at any length, zero rows included ("[]").
    out.write("[")
    count = 0
    for count, row in enumerate(rows, 1):
        out.write(("\n" if count == 1 else ",\n") + _object(columns, row))
        _flush_now_and_then(out, count)
    out.write("\n]\n" if count else "]\n")
    return count


def _write_jsonl(out: IO[str], columns: Sequence[str], rows: Iterable[Row]) -> int:
    count = 0
    for count, row in enumerate(rows, 1):
        out.write(_object(columns, row) + "\n")
        _flush_now_and_then(out, count)
    return count


def _checked(columns: Sequence[str], row: Row) -> Row:
    if len(row) != len(columns):
        raise ValueError(f"a row has {len(row)} values for {len(columns)} columns ({', '.join(columns)})")
    return row


def _flush_now_and_then(out: IO[str], count: int) -> None:
    if count % FLUSH_EVERY_ROWS == 0:
        out.flush()


# --- people ---------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return iso_time(value)
    if isinstance(value, timedelta):
        return human_age(value)
    # A newline or tab in a value (an error text) would break the row's line.
    return _CONTROL.sub(" ", str(value))


def _write_table(
    out: IO[str], columns: Sequence[str], rows: Iterable[Row], width: int
) -> tuple[int, int | None]:
    """The rows as aligned columns within ``width``; returns (rows written, width if anything was cut)."""
    stream = iter(rows)
    header = [_cell(c) for c in columns]
    sample = [
        [_cell(v) for v in _checked(columns, row)] for row in itertools.islice(stream, TABLE_SAMPLE_ROWS)
    ]
    natural = [max(len(cells[i]) for cells in [header, *sample]) for i in range(len(columns))]
    lows = [min(n, max(len(name), 1)) for n, name in zip(natural, header, strict=True)]
    floors = [min(n, max(len(name), MIN_CUT_WIDTH)) for n, name in zip(natural, header, strict=True)]
    floors[0] = natural[0]  # the first column names the row (an audience, a time): kept whole
    widths = _fit(natural, floors, lows, width)
    cut = False
    count = 0
    lines = itertools.chain([header], sample, ([_cell(v) for v in _checked(columns, row)] for row in stream))
    for count, cells in enumerate(lines):
        line, cut_here = _line(cells, widths, width)
        cut = cut or cut_here
        out.write(line + "\n")
        _flush_now_and_then(out, count)
    return count, width if cut else None


def _fit(natural: list[int], floors: list[int], lows: list[int], width: int) -> list[int]:
    """Column widths within ``width``: the widest columns shrink first, to one cap, none below its floor.

    When the floors don't fit, the last columns are left out: fewer widths come
    back than there are columns, and ``_line`` marks the gap with "…". The last
    column shown may shrink to its ``lows`` (its header), to show what fits.
    """

    def least(shown: int) -> list[int]:
        return [*floors[: shown - 1], lows[shown - 1]]

    def marker(shown: int) -> int:
        return 0 if shown == len(natural) else len(GAP + ELLIPSIS)

    shown = len(natural)
    while shown > 1 and _span(least(shown)) + marker(shown) > width:
        shown -= 1
    wanted, bounds = natural[:shown], least(shown)
    room = width - marker(shown) - len(GAP) * (shown - 1)
    if sum(wanted) <= room:
        return wanted

    def capped(cap: int) -> list[int]:
        return [max(bound, min(n, cap)) for n, bound in zip(wanted, bounds, strict=True)]

    cap = max(wanted)
    while cap > 1 and sum(capped(cap)) > room:
        cap -= 1
    widths = capped(cap)
    # What the cap left over goes, a character each, to the columns it cut.
    spare = room - sum(widths)
    for i, n in enumerate(wanted):
        if spare > 0 and widths[i] < n:
            widths[i] += 1
            spare -= 1
    return widths


def _span(widths: list[int]) -> int:
    return sum(widths) + len(GAP) * (len(widths) - 1)


def _line(cells: list[str], widths: list[int], width: int) -> tuple[str, bool]:
    cut = len(widths) < len(cells)
    parts = []
    for cell, size in zip(cells, widths, strict=False):
        if len(cell) > size:
            cell, cut = cell[: size - 1] + ELLIPSIS, True
        parts.append(cell.ljust(size))
    if len(widths) < len(cells):
        parts.append(ELLIPSIS)
    line = GAP.join(parts).rstrip()
    if len(line) > width:  # one column wider than the terminal
        line, cut = line[: width - 1] + ELLIPSIS, True
    return line, cut
