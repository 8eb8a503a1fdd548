"""Tables for people: on a terminal they keep what matters; anywhere else they cut nothing."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from audiencesync.cli.formats import FORMATS, write_rows
from audiencesync.cli.store import FAILURE_COLUMNS, FAILURE_LAYOUT, STATUS_LAYOUT, TABLE_COLUMNS
from audiencesync.cli.tables import TABLE_SAMPLE_ROWS, Layout, table_width

AT = datetime(2026, 12, 6, 1, 25, 56, tzinfo=UTC)
WHOLE_AT = "2026-12-06T01:25:56+00:00"
GLEAP_ANSWER = 'HTTP 400: {"errors":[{"message":"segment_a must be a boolean","code":"invalid_type"}]}'


def status_row(key: str, condition: str, result: str) -> tuple[object, ...]:
    return (
        key, condition, 2, 0, 1, 0, timedelta(minutes=12), AT, result, 2, 0, 1, AT, True, 0, 0,
        "audience", 0, 0, 0,
    )  # fmt: skip


def table(
    columns: tuple[str, ...],
    rows: Sequence[Sequence[object]],
    width: int | None,
    layout: Layout | None = None,
) -> tuple[list[str], str]:
    out, notes = io.StringIO(), io.StringIO()
    write_rows(out, "table", columns, rows, layout=layout, width=width, notes=notes)
    return out.getvalue().splitlines(), notes.getvalue()


def test_status_on_80_columns_keeps_the_result_the_condition_and_a_whole_last_run() -> None:
    rows = [
        status_row("segment_a", "held", "held"),
        status_row("order_completed_last_30_days", "source failing", "failed"),
        status_row("b", "ok", "aborted"),
    ]
    lines, note = table(TABLE_COLUMNS, rows, 80, STATUS_LAYOUT)
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].split() == ["audience", "condition", "last_run", "result"]
    assert lines[1].split() == ["segment_a", "held", WHOLE_AT, "held"]
    assert lines[2].split() == ["order_completed_last_30_days", "source", "failing", WHOLE_AT, "failed"]
    assert lines[3].split() == ["b", "ok", WHOLE_AT, "aborted"]
    assert note == (
        "output was cut to 80 columns (16 of 20 columns left out); "
        "see all of it with | less -S or --format csv\n"
    )
    # With a short key the counts fit beside them, the most telling first.
    lines, _ = table(TABLE_COLUMNS, [status_row("a", "parked", "partial")], 80, STATUS_LAYOUT)
    assert lines[0].split() == ["audience", "condition", "members", "pending", "last_run", "result"]
    assert lines[1].split() == ["a", "parked", "2", "0", WHOLE_AT, "partial"]


def test_failures_on_80_columns_leave_the_rest_out_before_cutting_gleaps_answer() -> None:
    rows = [("segment_a", "u2", True, 3, AT, GLEAP_ANSWER), ("segment_a", "u3", False, 1, AT, "HTTP 422: no")]
    lines, note = table(FAILURE_COLUMNS, rows, 110, FAILURE_LAYOUT)
    assert lines[0].split() == ["audience", "user_id", "last_error"]
    assert lines[1] == f"segment_a  u2       {GLEAP_ANSWER}"  # whole: the others made room
    assert note.startswith("output was cut to 110 columns (3 of 6 columns left out);")

    # Too long for the terminal even alone: cut last, after every other column went.
    lines, note = table(FAILURE_COLUMNS, rows, 80, FAILURE_LAYOUT)
    assert lines[0].split() == ["audience", "user_id", "last_error"]
    assert lines[1] == f"segment_a  u2       {GLEAP_ANSWER[:59]}…" and len(lines[1]) == 80
    assert lines[2] == "segment_a  u3       HTTP 422: no"
    assert note.startswith("output was cut to 80 columns (3 of 6 columns left out);")


def test_a_time_is_left_out_rather_than_cut_mid_way() -> None:
    columns = ("user_id", "note", "at", "count")
    lines, note = table(columns, [("u1", "n" * 30, AT, 7)], 40)
    # "at" does not fit whole beside the note cut to its least: it goes, "count" after it too.
    assert lines == ["user_id  note", "u1       " + "n" * 30]
    assert note.startswith("output was cut to 40 columns (2 of 4 columns left out);")
    lines, _ = table(columns, [("u1", "n" * 30, AT, 7)], 64)
    assert lines == ["user_id  note                          at", f"u1       {'n' * 27}…  {WHOLE_AT}"]


def test_not_a_terminal_cuts_nothing() -> None:
    long_id = "a-much-longer-user-id-than-any-in-the-sample-" * 2
    rows: list[tuple[object, ...]] = [
        (f"user-{i}", True, i, AT, GLEAP_ANSWER) for i in range(TABLE_SAMPLE_ROWS + 5)
    ]
    rows.append((long_id, False, 1, AT, GLEAP_ANSWER * 2))  # longer than the sampled rows
    lines, note = table(("user_id", "value", "attempts", "at", "error"), rows, None)
    assert note == "" and "…" not in "".join(lines)
    assert lines[1] == f"user-0    true   0         {WHOLE_AT}  {GLEAP_ANSWER}"
    assert lines[-1] == f"{long_id}  false  1         {WHOLE_AT}  {GLEAP_ANSWER * 2}"
    # The status table, too: every one of its columns.
    lines, note = table(TABLE_COLUMNS, [status_row("segment_a", "held", "held")], None, STATUS_LAYOUT)
    assert lines[0].split() == list(TABLE_COLUMNS) and note == ""


def test_a_later_longer_cell_of_a_kept_column_stays_whole_on_a_terminal() -> None:
    rows: list[tuple[object, ...]] = [
        ("segment_a", f"u{i}", True, 1, AT, "HTTP 422") for i in range(TABLE_SAMPLE_ROWS)
    ]
    rows.append(("segment_a", "u-late", True, 1, AT, GLEAP_ANSWER))
    lines, _ = table(FAILURE_COLUMNS, rows, 80, FAILURE_LAYOUT)
    assert lines[-1].endswith(GLEAP_ANSWER)


def test_the_hint_only_when_something_was_cut() -> None:
    # An empty table loses no value, even when its header leaves columns out.
    lines, note = table(TABLE_COLUMNS, [], 80, STATUS_LAYOUT)
    assert note == "" and len(lines) == 1 and len(lines[0]) <= 80
    assert lines[0].split()[:2] == ["audience", "condition"] and "result" in lines[0]
    # A table that fits.
    assert table(("user_id", "at"), [("u1", AT)], 80) == (["user_id  at", f"u1       {WHOLE_AT}"], "")
    # Programs' formats never get it, however narrow the terminal.
    for fmt in FORMATS[1:]:
        notes = io.StringIO()
        write_rows(io.StringIO(), fmt, TABLE_COLUMNS, [status_row("a", "ok", "ok")], width=20, notes=notes)
        assert notes.getvalue() == ""


def test_a_layout_naming_no_column_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="the layout names state, not in"):
        table(("audience", "result"), [("a", "ok")], 80, Layout(keep=("state",)))


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a tty's would."""

    def isatty(self) -> bool:
        return True


def test_the_width_is_the_terminals_and_no_limit_elsewhere() -> None:
    assert table_width(io.StringIO(), {"COLUMNS": "80"}) is None  # a pipe or a file
    assert table_width(Terminal(), {"COLUMNS": "132"}) == 132
    assert table_width(Terminal(), {}) == 80  # a terminal that cannot say its size
