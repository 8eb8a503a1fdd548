"""docs/schema.md is true: its views exist after `db upgrade` with the columns it lists, and its
queries, run as written (example values replaced), answer the scripted store right on both
databases."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from audiencesync.cli import main as cli
from audiencesync.store import audit, store as store_mod
from audiencesync.store.schema_views import VIEWS
from tests import audit_scenario as s
from tests.conftest import ConfigFactory, SourceDB, unchanged
from tests.gleap_standin import GleapStandIn

DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"

# The example values the documented queries use, each replaced by the test's own.
USER, AUDIENCE = "'u42'", "'order_completed_last_30_days'"
FROM, TO = "'2026-12-01 00:00:00.000000+00:00'", "'2026-12-08 00:00:00.000000+00:00'"


def documented_queries() -> dict[str, str]:
    """Each ```sql block that follows a `<!-- query: NAME -->` marker."""
    return dict(re.findall(r"<!-- query: (\w+) -->\n```sql\n(.*?)```", DOC.read_text(), re.DOTALL))


def documented_columns() -> dict[str, list[str]]:
    """Each view's columns, from the first cell of the rows of the table under its heading."""
    views: dict[str, list[str]] = {}
    for name, body in re.findall(
        r"^### `(\w+)`: .*?\n(.*?)(?=^#)", DOC.read_text(), re.DOTALL | re.MULTILINE
    ):
        cells = [line.split("|")[1] for line in body.splitlines() if line.startswith("| `")]
        views[name] = [column for cell in cells for column in re.findall(r"`(\w+)`", cell)]
    return views


def literal(at: datetime) -> str:
    """A time literal as docs/schema.md says to write one."""
    return "'" + at.strftime("%Y-%m-%d %H:%M:%S.%f+00:00") + "'"


def query(name: str, **values: str) -> str:
    sql = documented_queries()[name]
    for example, value in values.items():
        placeholder = {"user": USER, "audience": AUDIENCE, "start": FROM, "end": TO}[example]
        assert placeholder in sql, f"the query {name!r} no longer uses {placeholder}"
        sql = sql.replace(placeholder, value)
    return sql


def plain(value: Any) -> Any:
    """A value as Python sees it on either database: SQLite's text times and 0/1 read back."""
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00:00", value):
        return datetime.fromisoformat(value)
    return value


def run_sql(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(plain(v) for v in row) for row in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


def test_every_query_is_found() -> None:
    assert set(documented_queries()) == {
        "timeline",
        "members_at",
        "false_sent",
        "false_verdict",
        "entered_left",
        "runs",
    }


def test_the_views_exist_after_db_upgrade_with_the_documented_columns(
    make_config: ConfigFactory, store_url: str
) -> None:
    config = make_config(create_store=False)
    assert cli.main(["--config", str(config.path), "db", "upgrade"]) == 0
    documented = documented_columns()
    assert set(documented) == {view.name for view in VIEWS}
    engine = store_mod.create_engine(store_url)
    with engine.connect() as conn:
        for view in VIEWS:
            columns = list(conn.exec_driver_sql(f"SELECT * FROM {view.name} LIMIT 0").keys())
            assert columns == documented[view.name] == list(view.c.keys()), view.name
    engine.dispose()


@pytest.fixture(scope="module")
def scenario(
    shared_make_config: ConfigFactory, shared_source: SourceDB, shared_gleap: GleapStandIn
) -> Iterator[s.Scenario]:
    """Played once per store for this module's tests, which only read it (checked at the end)."""
    played = s.play(shared_make_config, shared_source, shared_gleap)
    with unchanged(played.config.store.url, "the audit scenario"):
        yield played


def test_the_documented_queries_answer_the_scripted_store(scenario: s.Scenario) -> None:
    store_url = scenario.config.store.url
    a = f"'{s.A}'"
    for at, expected in s.MEMBERS_AT.items():
        rows = run_sql(store_url, query("members_at", audience=a, start=literal(at)))
        assert [user for user, _ in rows] == sorted(expected), at
    rows = run_sql(store_url, query("members_at", audience=a, start=literal(s.half_past(4))))
    assert dict(rows) == s.SINCE_AT_HALF_PAST_4

    for (start, end), (entered, left) in s.DIFFS.items():
        rows = run_sql(store_url, query("entered_left", audience=a, start=literal(start), end=literal(end)))
        assert dict(rows) == {k: len(v) for k, v in (("entered", entered), ("left", left)) if v}

    # u3's false was rejected twice (then parked); u6's was acknowledged in cycle 5.
    rejected = run_sql(store_url, query("false_sent", audience=a, user="'u3'"))
    assert [(status, outcome) for _, _, _, _, status, outcome, _ in rejected] == [(422, "rejected")] * 2
    assert all("bad user" in error for *_, error in rejected)
    assert run_sql(store_url, query("false_verdict", audience=a, user="'u3'")) == [(2, 0, 0, None)]
    acked = run_sql(store_url, query("false_sent", audience=a, user="'u6'"))
    assert [(run, at, status) for _, run, at, _, status, _, _ in acked] == [
        (scenario.runs[(5, s.A)], s.T[5], 200)
    ]
    assert run_sql(store_url, query("false_verdict", audience=a, user="'u6'")) == [(1, 1, 0, s.T[5])]

    rows = run_sql(store_url, query("runs", audience=a))
    assert [row[2] for row in rows] == [scenario.runs[(k, s.A)] for k in range(6, 0, -1)]
    assert len(rows[0]) == len(audit.RUN_COLUMNS)


def test_the_documented_timeline_is_the_one_audit_user_shows(scenario: s.Scenario) -> None:
    store_url = scenario.config.store.url
    engine = store_mod.engine_for(scenario.config.store)
    for user in ("u1", "u3", "u4", "u5", "u6"):
        rows = run_sql(store_url, query("timeline", user=f"'{user}'"))
        with engine.connect() as conn:
            shown = audit.timeline(conn, user)
        value = audit.TIMELINE_COLUMNS.index("value")  # 0 and 1 on SQLite
        normal = [tuple(bool(v) if i == value else v for i, v in enumerate(row)) for row in rows]
        assert normal == [tuple(row) for row in shown], user
    engine.dispose()
    u4 = run_sql(store_url, query("timeline", user="'u4'"))
    assert [(event, result) for _, _, event, _, _, result, *_ in u4] == [("entered", "acknowledged")] + [
        ("call", "unknown")
    ] * 4 + [("call", "acknowledged")]
