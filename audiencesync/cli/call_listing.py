"""A dry run's calls as rows: a row per attribute of an identify call, per event of a track call.

A call's rows share its number: POST to the identify URL with {"userId": user_id, audience: value...}.
The plain calls come as blocks of the plan's rows (``PlannedRows``); in csv, json and jsonl
those are written a block at a time, as the same text ``formats.write_rows`` would write for
them, rather than a value at a time through the csv and json modules (at a million calls,
that was most of the dry run). A block holding a user id those modules would quote or escape
(a comma, a quote, a backslash, a character outside printable ASCII) is written row by row
through them instead.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

from audiencesync.cli.formats import csv_value, json_object, write_rows
from audiencesync.cli.tables import Layout
from audiencesync.sync.reports import PlannedCall, PlannedRows, PlannedTrack

CALL_COLUMNS = ("call", "user_id", "audience", "value")
CALL_LAYOUT = Layout(keep=("call", "user_id", "audience"))

Call = PlannedCall | PlannedRows | PlannedTrack


def write_calls(out: IO[str], fmt: str, calls: Iterable[Call]) -> None:
    """The calls' rows on ``out`` in ``fmt``, exactly as ``write_rows`` writes ``call_rows``."""
    if fmt not in ("csv", "json", "jsonl"):
        write_rows(out, fmt, CALL_COLUMNS, call_rows(calls), layout=CALL_LAYOUT)
        return
    numbers = _Numbers()
    written = 0  # rows
    writer = csv.writer(out, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(CALL_COLUMNS)
    elif fmt == "json":
        out.write("[")
    for call in calls:
        if isinstance(call, PlannedRows) and _plain_ids(call):
            text = (
                numbers.csv(call) if fmt == "csv" else numbers.json(call, "\n" if fmt == "jsonl" else ",\n")
            )
            if fmt == "json":  # the array's first object follows "[" on a line of its own
                text = ("\n" if written == 0 else ",\n") + text[: -len(",\n")]
            out.write(text)
            written += len(call.rows)
            out.flush()
            continue
        for row in numbers.rows(call):
            written += 1
            if fmt == "csv":
                writer.writerow([csv_value(v) for v in row])
            elif fmt == "json":
                out.write(("\n" if written == 1 else ",\n") + json_object(CALL_COLUMNS, row))
            else:
                out.write(json_object(CALL_COLUMNS, row) + "\n")
    if fmt == "json":
        out.write("\n]\n" if written else "]\n")
    out.flush()


def call_rows(calls: Iterable[Call]) -> Iterator[tuple[object, ...]]:
    """The calls' rows: (call number, user id, audience key, value)."""
    numbers = _Numbers()
    for call in calls:
        yield from numbers.rows(call)


class _Numbers:
    """Numbers the calls as they come: one each, and a block's one per user."""

    def __init__(self) -> None:
        self.number = 0
        self.user: str | None = None  # the user of the last plain row: their call's rows share it

    def rows(self, call: Call) -> Iterator[tuple[object, ...]]:
        if isinstance(call, PlannedRows):
            for user_id, key, value in call.rows:
                self._at(user_id)
                yield self.number, user_id, key, bool(value)
            return
        self.number, self.user = self.number + 1, None
        if isinstance(call, PlannedTrack):
            # A track call's rows: one per event, its name as the value (see the README).
            for event in call.events:
                data = event["data"]
                assert isinstance(data, dict)
                yield self.number, event["userId"], data["audience_key"], event["name"]
            return
        for audience, value in call.attributes.items():
            # lastPageView is an object: shown as the JSON it is sent as.
            yield self.number, call.user_id, audience, json.dumps(value) if isinstance(value, dict) else value

    def _at(self, user_id: str) -> None:
        if user_id != self.user:
            self.number, self.user = self.number + 1, user_id

    def csv(self, block: PlannedRows) -> str:
        lines: list[str] = []
        add = lines.append
        for user_id, key, value in block.rows:
            if user_id != self.user:
                self.number, self.user = self.number + 1, user_id
            add(f"{self.number},{user_id},{key},{'true' if value else 'false'}\n")
        return "".join(lines)

    def json(self, block: PlannedRows, end: str) -> str:
        """Each row's object followed by ``end``."""
        lines: list[str] = []
        add = lines.append
        for user_id, key, value in block.rows:
            if user_id != self.user:
                self.number, self.user = self.number + 1, user_id
            add(
                f'{{"call": {self.number}, "user_id": "{user_id}", "audience": "{key}", '
                f'"value": {"true" if value else "false"}}}{end}'
            )
        return "".join(lines)


def _plain_ids(block: PlannedRows) -> bool:
    """Every user id of the block is written as it is in csv and json: no comma, quote or
    backslash, only printable ASCII (audience keys always are: ``keys.key_problem``)."""
    ids: Any = "".join([row[0] for row in block.rows])
    return bool(ids.isascii() and ids.isprintable() and not ("," in ids or '"' in ids or "\\" in ids))
