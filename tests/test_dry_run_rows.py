"""The dry run's plain calls read as the plan's rows (store.plan_rows, sync.plan_listing) list exactly
what building every call in Python lists: the same rows, numbers, order and counts, in every
format, with users whose calls carry fields, a trait, more than 35 keys or ids the csv and json
modules must quote or escape between them, on both stores."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from audiencesync.cli.call_listing import CALL_COLUMNS, CALL_LAYOUT, call_rows, write_calls
from audiencesync.cli.formats import write_rows
from audiencesync.config.loading import Config
from audiencesync.store import plan_rows
from audiencesync.sync.dry_run import Listing
from audiencesync.sync.reports import CycleReport, PlannedCall, PlannedRows
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_sync import cycle

WIDE = 37  # audiences every "w" user is in: more keys than Gleap's 35 a call
# Ids csv quotes or json escapes, beside plain ones; each sorts somewhere among the others.
ODD = ["a,b", 'q"x', "back\\slash", "\u00e9t\u00e9", "sp ace"]
PLAIN = [f"u{i:02d}" for i in range(1, 21)]


def people(source: SourceDB, rows: list[tuple[str, str, str | None, str | None]]) -> None:
    """(user id, segment, email, plan) rows of ``people``."""
    with sqlite3.connect(source.path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS people (user_id TEXT, segment TEXT, email TEXT, plan TEXT)")
        conn.execute("DELETE FROM people")
        conn.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", rows)
    conn.close()


def audiences() -> str:
    def one(name: str, where: str, columns: str = "user_id") -> str:
        return (
            f'\n[[audiences]]\nname = "{name}"\nsource = "main"\n'
            f'query = "SELECT {columns} FROM people WHERE {where}"\n'
        )

    text = one("Alpha", "segment IN ('a', 'ab')") + one("Beta", "segment IN ('b', 'ab')")
    text += one("Fielded", "segment = 'f'", "user_id, email")
    text += "".join(one(f"Wide {n:02d}", "segment = 'w'") for n in range(WIDE))
    return text + (
        '\n[[traits]]\nname = "Tier"\nsource = "main"\n'
        'query = "SELECT user_id, plan AS value FROM people WHERE plan IS NOT NULL"\n'
    )


def members(turn: int) -> list[tuple[str, str, str | None, str | None]]:
    """The source at each turn: the second moves some users, so that a plan holds falses too."""
    rows: list[tuple[str, str, str | None, str | None]] = []
    for n, user in enumerate(PLAIN + ODD):
        segment = ("a", "b", "ab")[(n + turn) % 3]
        if turn and n % 7 == 0:
            continue  # a leaver
        rows.append((user, segment, None, None))
    rows += [(f"f{i}", "f", f"f{i}@x.io", None) for i in range(3)]
    rows += [(f"w{i}", "w", None, None) for i in range(2)]
    rows += [("u05", "t", None, "gold"), ("t1", "t", None, "silver" if turn else "gold")]
    return rows


Show = Callable[[Iterator[Any]], object]


def listed(
    config: Config, fmt: str, *, rows: bool, limit: int | None = None, **kwargs: Any
) -> tuple[str, CycleReport, Any]:
    """The dry run's listing in ``fmt``: through the plan's rows (``rows``) or built call by call,
    as ``sync --dry-run`` wrote it before; its text, report and what the listing saw."""
    out = io.StringIO()
    listing = Listing(limit)
    seen: list[type] = []

    def spy(calls: Iterator[Any]) -> Iterator[Any]:
        for call in calls:
            seen.append(type(call))
            yield call

    if rows:
        show: Show = lambda calls: write_calls(out, fmt, listing.take(spy(calls)))  # noqa: E731
    else:
        show = lambda calls: write_rows(  # noqa: E731
            out, fmt, CALL_COLUMNS, call_rows(listing.take(spy(calls))), layout=CALL_LAYOUT
        )
    report = cycle(config, dry_run=True, show_calls=show, rows=rows, **kwargs)
    return out.getvalue(), report, (listing.listed, listing.note(report.calls + report.track_calls), seen)


def same_listing(config: Config, *, split_blocks: bool = False, empty: bool = False, **kwargs: Any) -> None:
    """The two paths list the same; ``empty``: there is nothing to list (both say so alike)."""
    for fmt in ("csv", "json", "jsonl", "table"):
        text, report, (listed_count, note, seen) = listed(config, fmt, rows=True, **kwargs)
        expected, expected_report, (expected_count, expected_note, _) = listed(
            config, fmt, rows=False, **kwargs
        )
        assert text == expected, fmt
        assert (report.calls, report.track_calls, report.events) == (
            expected_report.calls,
            expected_report.track_calls,
            expected_report.events,
        )
        assert [a.summary() for a in report.audiences] == [a.summary() for a in expected_report.audiences]
        assert (listed_count, note) == (expected_count, expected_note)
        if empty:
            assert report.calls == 0 and seen == []
            continue
        # Both paths were taken: plain users as rows, the others built.
        assert PlannedRows in seen and PlannedCall in seen
        if split_blocks:
            assert seen.count(PlannedRows) > 5
    for limit in () if empty else (1, 5, 12):  # a table on a terminal: the first calls, the rest counted
        text, report, (listed_count, note, _) = listed(config, "table", rows=True, limit=limit, **kwargs)
        expected, expected_report, (expected_count, expected_note, _) = listed(
            config, "table", rows=False, limit=limit, **kwargs
        )
        assert (text, report.calls, listed_count, note) == (
            expected,
            expected_report.calls,
            expected_count,
            expected_note,
        )
        assert listed_count == limit and note is not None


@pytest.mark.parametrize("block_rows", [plan_rows.BLOCK_ROWS, 3])
def test_the_plain_calls_as_rows_list_what_building_every_call_lists(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    monkeypatch: pytest.MonkeyPatch,
    block_rows: int,
) -> None:
    # Blocks of 3 rows: a user's rows span two blocks, and built users cut blocks.
    monkeypatch.setattr(plan_rows, "BLOCK_ROWS", block_rows)
    people(source, members(0))
    config = make_config(base_url=gleap.base_url, audiences=audiences())
    same_listing(config, split_blocks=block_rows == 3)  # the first sync: everyone enters
    _, first, _ = listed(config, "csv", rows=True)
    assert first.calls > len(PLAIN + ODD) + 5  # the wide users' calls were split (37 keys > 35)
    cycle(config)  # delivered
    people(source, members(1))
    # Leavers (false), movers, a changed trait.
    same_listing(config, split_blocks=block_rows == 3, allow_removals=True)
    cycle(config, allow_removals=True)
    same_listing(config, empty=True)  # nothing changed, everything delivered


def test_the_listing_writes_a_plain_block_as_the_csv_and_json_modules_would() -> None:
    block = PlannedRows([("u1", "alpha", 1), ("u1", "beta", 0), ("u2", "alpha", None)], calls=2)
    odd = PlannedRows([("x,y", "alpha", True), ('q"', "alpha", False)], calls=2)
    for fmt in ("csv", "json", "jsonl"):
        fast = io.StringIO()
        write_calls(fast, fmt, [block, odd, PlannedCall("z", {"alpha": True, "email": "a@x.io"})])
        slow = io.StringIO()
        write_rows(
            slow,
            fmt,
            CALL_COLUMNS,
            call_rows([block, odd, PlannedCall("z", {"alpha": True, "email": "a@x.io"})]),
        )
        assert fast.getvalue() == slow.getvalue(), fmt
    empty = io.StringIO()
    write_calls(empty, "json", [])
    assert empty.getvalue() == "[]\n"


def test_an_id_the_source_gives_twice_is_planned_once_as_the_sync_sends_it(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    # The stage of ids alone is made distinct by the dry run itself (store.stage.seal_for_plan
    # on PostgreSQL): a plain user, an odd id and a wide user given twice are each one call.
    rows = members(0)
    rows += [row for row in rows if row[0] in ("u03", "a,b", "w1")]
    people(source, rows)
    config = make_config(base_url=gleap.base_url, audiences=audiences())
    same_listing(config)
    text, planned, _ = listed(config, "csv", rows=True)
    listed_rows = list(csv.reader(io.StringIO(text)))[1:]
    assert len({tuple(row[1:3]) for row in listed_rows}) == len(listed_rows)  # no (user, key) twice
    gleap.reset_log()
    sent = cycle(config)
    assert planned.calls == sent.calls == len(gleap.identify_calls)
    assert [(a.key, a.members, a.entered) for a in planned.audiences] == [
        (a.key, a.members, a.entered) for a in sent.audiences
    ]
