"""formats.write_rows: each format read back, rows written as they come, in flat memory."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from audiencesync.cli.formats import FORMATS, write_rows

COLUMNS = ("user_id", "value", "attempts", "at", "error")
AT = datetime(2026, 12, 1, 19, 25, 25, 123456, tzinfo=UTC)
ROWS = [
    ("u1", True, 3, AT, None),
    ('u,2 "quoted"', False, 0, AT.replace(tzinfo=None), "line one\nline two"),
    ("u3", None, 12, AT.astimezone(timezone(timedelta(hours=2))), "é"),
]


def written(fmt: str, rows: object = ROWS, **kwargs: object) -> tuple[str, int]:
    out = io.StringIO()
    count = write_rows(out, fmt, COLUMNS, rows, **kwargs)  # type: ignore[arg-type]
    return out.getvalue(), count


def test_csv_reads_back_with_a_header_and_typed_cells() -> None:
    text, count = written("csv")
    assert count == 3
    assert list(csv.reader(io.StringIO(text))) == [
        list(COLUMNS),
        ["u1", "true", "3", "2026-12-01T19:25:25.123456+00:00", ""],
        ['u,2 "quoted"', "false", "0", "2026-12-01T19:25:25.123456+00:00", "line one\nline two"],
        ["u3", "", "12", "2026-12-01T19:25:25.123456+00:00", "é"],  # an offset, converted to UTC
    ]


def test_json_is_one_array_of_objects_and_jsonl_one_object_a_line() -> None:
    expected = [
        {
            "user_id": "u1",
            "value": True,
            "attempts": 3,
            "at": "2026-12-01T19:25:25.123456+00:00",
            "error": None,
        },
        {
            "user_id": 'u,2 "quoted"',
            "value": False,
            "attempts": 0,
            "at": "2026-12-01T19:25:25.123456+00:00",
            "error": "line one\nline two",
        },
        {
            "user_id": "u3",
            "value": None,
            "attempts": 12,
            "at": "2026-12-01T19:25:25.123456+00:00",
            "error": "é",
        },
    ]
    text, count = written("json")
    parsed = json.loads(text)
    assert count == 3 and parsed == expected
    assert [type(row["attempts"]) for row in parsed] == [int, int, int]  # 3 == 3.0: equality can't tell
    lines, count = written("jsonl")
    assert count == 3 and [json.loads(line) for line in lines.splitlines()] == expected


def test_zero_rows() -> None:
    assert json.loads(written("json", [])[0]) == []
    assert written("jsonl", []) == ("", 0)
    assert list(csv.reader(io.StringIO(written("csv", [])[0]))) == [list(COLUMNS)]
    assert written("table", [], width=80)[0].split() == list(COLUMNS)  # just the header


def test_a_row_of_the_wrong_length_is_refused() -> None:
    for fmt in FORMATS:
        with pytest.raises(ValueError, match="2 values for 5 columns"):
            written(fmt, [("u1", True)], width=80)


def test_table_shows_times_to_the_second_none_as_a_dash_and_spans_as_ages() -> None:
    notes = io.StringIO()
    out = io.StringIO()
    rows = [("u1", None, 3, AT, timedelta(hours=3, minutes=20))]
    assert write_rows(out, "table", COLUMNS, rows, width=200, notes=notes) == 1
    assert out.getvalue().splitlines() == [
        "user_id  value  attempts  at                         error",
        "u1       -      3         2026-12-01T19:25:25+00:00  3h20m",
    ]
    assert notes.getvalue() == ""  # nothing was cut


def test_table_fits_80_columns_and_says_once_that_it_cut() -> None:
    notes = io.StringIO()
    out = io.StringIO()
    long_error = "422 unprocessable: " + "the contact's attributes were refused " * 5
    rows = [(f"user-{i}", True, i, AT, long_error) for i in range(500)]  # past the sampled rows
    rows.append(("a-much-longer-user-id-than-any-in-the-sample-" * 2, False, 1, AT, "short"))
    assert write_rows(out, "table", COLUMNS, rows, width=80, notes=notes) == 501
    lines = out.getvalue().splitlines()
    assert len(lines) == 502 and all(len(line) <= 80 for line in lines[:-1])
    assert lines[0].split() == list(COLUMNS)
    assert lines[1].startswith("user-0    true   0         2026-12-01T19:25:25+00:00  422 unprocessable")
    assert lines[1].endswith("…") and len(lines[1]) == 80
    # The first column names the row: a later, longer id stays whole, past the width.
    assert lines[-1].startswith(f"{rows[-1][0]}  false  1")
    assert notes.getvalue() == "output was cut to 80 columns; see all of it with | less -S or --format csv\n"


def test_table_leaves_out_the_last_columns_when_even_their_headers_do_not_fit() -> None:
    out, notes = io.StringIO(), io.StringIO()
    columns = ("audience", *(f"count_{i}" for i in range(12)))
    write_rows(out, "table", columns, [("order_completed_last_30_days", *range(12))], width=60, notes=notes)
    header, row = out.getvalue().splitlines()
    assert len(header) <= 60 and len(row) <= 60
    assert header.startswith("audience  ")
    assert row.startswith("order_completed_last_30_days  0  ")  # the first column stays whole
    assert all(name in header for name in columns[:4]) and "count_11" not in header
    assert "(9 of 13 columns left out)" in notes.getvalue()


def test_table_cell_with_a_newline_stays_on_its_line() -> None:
    text, _ = written("table", [("u1", True, 1, AT, "one\ntwo\tthree")], width=200)
    assert text.splitlines()[1].endswith("one two three")


class Sink(io.TextIOBase):
    """A stdout that keeps nothing: only what a memory bound can see."""

    def __init__(self) -> None:
        self.lines = 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return len(text)


def many_rows(total: int, sink: Sink, lag: list[int]) -> Iterator[tuple[object, ...]]:
    """``total`` rows, made one at a time; ``lag[0]`` gets the most the output ever trailed them by."""
    for i in range(total):
        # A writer that gathered the rows first would have written nothing yet.
        lag[0] = max(lag[0], i - sink.lines)
        yield (f"user-{i:07d}", i % 2 == 0, i, AT, "x" * 40)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_writes_rows_as_they_come(fmt: str) -> None:
    sink, lag = Sink(), [0]
    count = write_rows(sink, fmt, COLUMNS, many_rows(100_000, sink, lag), width=80, notes=io.StringIO())  # type: ignore[arg-type]
    assert count == 100_000 and sink.lines >= 100_000
    assert lag[0] <= 1_000  # the table's sample of a few hundred rows; csv and json: a row or two


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_runs_in_flat_memory(fmt: str) -> None:
    sink, lag = Sink(), [0]
    tracemalloc.start()  # slows each allocation down: fewer rows than above, still MBs if held
    try:
        write_rows(sink, fmt, COLUMNS, many_rows(20_000, sink, lag), width=80, notes=io.StringIO())  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.lines >= 20_000
    assert peak < 500_000, f"{peak} bytes at peak: the rows were held, not streamed"


def test_an_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        written("xml")
