"""The table: how the command line shows a list of rows to people.

Anywhere but a terminal (a pipe, a file, cron's mail) a table cuts nothing, as
``ps`` and ``git`` do: every value is whole, however long the line. On a
terminal it fits the width, losing what matters least first:

- the columns a ``Layout`` keeps (the first column, which names the row, always)
  are never left out, and their text is cut only when they alone are too wide;
- the other columns come in the layout's order of importance while they fit,
  each no narrower than its header, its times and numbers, or ``MIN_CUT_WIDTH``
  of text; the rest are left out;
- a time, an age, a number or a boolean is never cut mid-way: its column is left
  out instead. Only text is cut, and a cut cell ends in "…".

The columns are sized on the first ``TABLE_SAMPLE_ROWS`` rows. A later, longer
text cell is cut to its column, except in a kept column, where it stays whole
and pushes its line past the width (a time or a number always stays whole).

``table_width`` is the one place that tells a terminal from the rest; the width
is a parameter below it, so that a test can draw an 80-column terminal or a pipe.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import IO

from audiencesync.errors import iso_time

Row = Sequence[object]

# Rows the table reads ahead to size its columns; a later, longer text cell is cut (on a terminal).
TABLE_SAMPLE_ROWS = 300
# Writes reach a pipe's reader in steady chunks, not one syscall a row.
FLUSH_EVERY_ROWS = 1000
# Text is cut no narrower than this (or its header): below it a cell says too little, and
# leaving the column out is the clearer loss.
MIN_CUT_WIDTH = len("2026-12-01T19:25:25+00:00")
# When a terminal does not say its width.
DEFAULT_WIDTH = 80
GAP = "  "
ELLIPSIS = "…"


def table_width(out: IO[str], environ: Mapping[str, str] = os.environ) -> int | None:
    """The width a table on ``out`` fits: the terminal's (``$COLUMNS`` first), or None (no limit)
    when ``out`` is not a terminal."""
    try:
        if not out.isatty():
            return None
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return None
    columns = environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(out.fileno()).columns or DEFAULT_WIDTH
    except (AttributeError, ValueError, OSError):  # a stand-in terminal with no descriptor
        return DEFAULT_WIDTH


@dataclass(frozen=True)
class Layout:
    """What a table on a terminal keeps when it must lose columns.

    ``keep``: never left out (the first column always is); their text is cut last.
    ``first``: the most telling of the others, in this order; the rest follow in
    the table's order.
    """

    keep: tuple[str, ...] = ()
    first: tuple[str, ...] = ()

    def ranks(self, columns: Sequence[str]) -> tuple[list[int], list[int]]:
        """The indexes of the kept columns, and of the others, most important first."""
        unknown = [name for name in (*self.keep, *self.first) if name not in columns]
        if unknown:
            raise ValueError(f"the layout names {', '.join(unknown)}, not in {', '.join(columns)}")
        kept = sorted({0, *(columns.index(name) for name in self.keep)})
        first = [columns.index(name) for name in self.first if columns.index(name) not in kept]
        rest = [i for i in range(len(columns)) if i not in kept and i not in first]
        return kept, [*first, *rest]


# A cell as shown, and whether it must stay whole (a time, an age, a number, a boolean, "-").
Cell = tuple[str, bool]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def cell(value: object) -> Cell:
    if value is None:
        return "-", True
    if isinstance(value, bool):
        return ("true" if value else "false"), True
    if isinstance(value, datetime):
        return iso_time(value), True
    if isinstance(value, timedelta):
        return human_age(value), True
    if isinstance(value, int | float | Decimal):
        return str(value), True
    # A newline or tab in a value (an error text) would break the row's line.
    return _CONTROL.sub(" ", str(value)), False


def human_age(value: timedelta) -> str:
    """A span for people: 45s, 12m or 3h20m (the duration syntax the config reads)."""
    minutes, secs = divmod(max(0, int(value.total_seconds())), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m" if minutes else f"{secs}s")


def checked(columns: Sequence[str], row: Row) -> Row:
    if len(row) != len(columns):
        raise ValueError(f"a row has {len(row)} values for {len(columns)} columns ({', '.join(columns)})")
    return row


def flush_now_and_then(out: IO[str], count: int) -> None:
    if count % FLUSH_EVERY_ROWS == 0:
        out.flush()


def write_table(
    out: IO[str], columns: Sequence[str], rows: Iterable[Row], width: int | None, layout: Layout
) -> tuple[int, str | None]:
    """The rows as aligned columns; returns (rows written, what was cut: None when nothing was).

    ``width`` None: not a terminal, every value whole.
    """
    kept, others = layout.ranks(columns)
    stream = iter(rows)
    header = [name for name, _ in map(cell, columns)]
    sample = [[cell(v) for v in checked(columns, row)] for row in itertools.islice(stream, TABLE_SAMPLE_ROWS)]
    widths = _widths(header, sample, kept, others, width)
    # Text cut to its column: on a terminal, except a kept column the layout did not cut.
    cuttable = [
        width is not None and size is not None and (i not in kept or size < _natural(header, sample, i))
        for i, size in enumerate(widths)
    ]
    cells_cut = False
    count = 0
    lines = itertools.chain(
        [[(name, True) for name in header]],
        sample,
        ([cell(v) for v in checked(columns, row)] for row in stream),
    )
    for count, cells in enumerate(lines):
        line, cut_here = _line(cells, widths, cuttable)
        cells_cut = cells_cut or cut_here
        out.write(line + "\n")
        flush_now_and_then(out, count)
    left_out = sum(size is None for size in widths)
    if count == 0 or not (cells_cut or left_out):  # an empty table loses no value
        return count, None
    return count, _what_was_cut(width, left_out, len(columns))


def _what_was_cut(width: int | None, left_out: int, total: int) -> str:
    what = f" ({left_out} of {total} columns left out)" if left_out else ""
    return f"output was cut to {width} columns{what}; see all of it with | less -S or --format csv"


def _natural(header: list[str], sample: list[list[Cell]], i: int) -> int:
    return max([len(header[i]), *(len(cells[i][0]) for cells in sample)])


def _widths(
    header: list[str], sample: list[list[Cell]], kept: list[int], others: list[int], width: int | None
) -> list[int | None]:
    """Each column's width, None for a column left out (see the module's docstring)."""
    natural = [_natural(header, sample, i) for i in range(len(header))]
    if width is None or _span(natural) <= width:
        return list(natural)
    whole = [max([len(header[i]), *(len(c[i][0]) for c in sample if c[i][1])]) for i in range(len(header))]
    floors = [min(n, max(w, MIN_CUT_WIDTH)) for n, w in zip(natural, whole, strict=True)]
    widths: list[int | None] = [None] * len(header)
    room = width - len(GAP) * (len(kept) - 1)
    if sum(natural[i] for i in kept) > room:
        # The kept columns alone are too wide: they share the width, the others are left out.
        sizes = _shrink([natural[i] for i in kept], [floors[i] for i in kept], room)
        for i, size in zip(kept, sizes, strict=True):
            widths[i] = size
        return widths
    shown = list(kept)
    used = _span([natural[i] for i in kept])
    for i in others:  # the most important first, while each fits at its narrowest
        if used + len(GAP) + floors[i] > width:
            break
        shown.append(i)
        used += len(GAP) + floors[i]
    extra = sorted(set(shown) - set(kept))
    room_for_extra = width - _span([natural[i] for i in kept]) - len(GAP) * len(extra)
    for i in kept:
        widths[i] = natural[i]
    sizes = _shrink([natural[i] for i in extra], [floors[i] for i in extra], room_for_extra)
    for i, size in zip(extra, sizes, strict=True):
        widths[i] = size
    return widths


def _shrink(wanted: list[int], floors: list[int], room: int) -> list[int]:
    """Widths summing to at most ``room`` when the floors allow: the widest shrink first, to one cap."""
    if sum(wanted) <= room:
        return list(wanted)

    def capped(cap: int) -> list[int]:
        return [max(floor, min(n, cap)) for n, floor in zip(wanted, floors, strict=True)]

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


def _line(cells: list[Cell], widths: list[int | None], cuttable: list[bool]) -> tuple[str, bool]:
    cut = False
    parts = []
    for (text, whole), size, may_cut in zip(cells, widths, cuttable, strict=True):
        if size is None:
            continue
        if len(text) > size and may_cut and not whole:
            text, cut = text[: size - 1] + ELLIPSIS, True
        parts.append(text.ljust(size))
    return GAP.join(parts).rstrip(), cut
