"""The web page shows what needs a person as attention.py reads it (issue 20), on both stores:
a banner per open concern at the top of the overview and of the audience's page, with its
reason, since when and the command to run; a badge per audience coloured by its severity; and
each gone once the condition ends."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa

from audiencesync.store import store as store_mod
from audiencesync.store.schema import audiences, sync_runs
from audiencesync.web import attention as web_attention
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.web_states import HOLD, KEY, RETRY, States, serve


@pytest.fixture
def states(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> Iterator[States]:
    made = States(make_config, source, gleap)
    try:
        yield made
    finally:
        made.close()


def banners(page: str) -> list[tuple[str, str, str]]:
    """(state, subject, text) of each banner, in page order."""
    found = re.findall(
        r'<div class="banner sev-(\w+)"[^>]*data-state="(\w+)" data-subject="([^"]*)">(.*?)</div>', page, re.S
    )
    return [(state, subject, text) for _, state, subject, text in found]


def badge(page: str, key: str) -> tuple[str, str]:
    """The severity class and state of the audience's row badge on the overview."""
    row = re.search(rf'<tr class="audience" data-key="{key}">(.*?)</tr>', page, re.S)
    assert row, page
    found = re.search(r'<td class="state"><span class="badge sev-(\w+)" data-state="(\w+)"', row.group(1))
    assert found, row.group(1)
    return found.group(1), found.group(2)


def page(base: str, path: str = "/") -> str:
    answer = httpx.get(base + path, timeout=30)
    assert answer.status_code == 200
    return answer.text


def test_ok_shows_no_banner_and_a_green_badge(states: States) -> None:
    with serve(states.config) as base:
        overview = page(base)
        assert banners(overview) == []
        assert badge(overview, KEY) == ("ok", "ok")
        assert banners(page(base, f"/audiences/{KEY}")) == []


def test_a_held_audience_shows_its_release_command_at_the_top_and_says_held_in_its_header(
    states: States,
) -> None:
    states.enter_held()
    with serve(states.config) as base:
        overview = page(base)
        [(state, subject, text)] = banners(overview)
        assert (state, subject) == ("held", KEY)
        assert f"<code>{HOLD}</code>" in text and "since 20" in text and "returned no rows" in text
        assert badge(overview, KEY) == ("action", "held")
        audience = page(base, f"/audiences/{KEY}")
        # The banner comes before the counts (above the fold), and the header's first count says held.
        assert audience.index(f"<code>{HOLD}</code>") < audience.index('<section class="counts">')
        counts = audience[audience.index('<section class="counts">') :]
        assert counts.index('data-state="held"') < counts.index("members</div>")
        assert "see above" in counts.split("</div>")[0]  # the banner's reason, not said twice
        # The run result "held" wears the needs-action colour, not the in-progress one of "running".
        assert '<span class="badge held sev-action">held</span>' in audience
        states.leave_held()
        assert banners(page(base)) == [] and badge(page(base), KEY) == ("ok", "ok")


def test_parked_changes_show_failures_and_retry_then_clear(states: States) -> None:
    states.enter_parked()
    with serve(states.config) as base:
        [(state, subject, text)] = banners(page(base))
        assert (state, subject) == ("parked", KEY)
        assert (
            f"<code>audiencesync failures --audience {KEY}</code>" in text and f"<code>{RETRY}</code>" in text
        )
        assert badge(page(base), KEY) == ("action", "parked")
        assert [b[0] for b in banners(page(base, f"/audiences/{KEY}"))] == ["parked"]
        states.leave_parked()
        assert banners(page(base)) == [] and badge(page(base), KEY) == ("ok", "ok")


def test_a_refused_token_is_a_daemon_wide_failing_banner_and_blocks_the_audience(states: States) -> None:
    states.enter_token_refused()
    with serve(states.config) as base:
        overview = page(base)
        [(state, subject, text)] = banners(overview)
        assert (state, subject) == ("token_refused", "")
        assert "refuses the API token" in text and "<code>audiencesync check</code>" in text
        assert "GLEAP_API_TOKEN" in text
        assert badge(overview, KEY) == ("failing", "token_refused")
        # The audience's page shows the daemon-wide banner too.
        assert [b[0] for b in banners(page(base, f"/audiences/{KEY}"))] == ["token_refused"]
        assert 'data-state="token_refused"' in overview.split('id="daemon"')[1].split("</div>")[0]
        states.leave_token_refused()
        overview = page(base)
        assert banners(overview) == [] and badge(overview, KEY) == ("ok", "ok")


def test_gleap_down_recorded_by_a_daemon_shows_and_clears(states: States) -> None:
    states.enter_gleap_down()
    with serve(states.config) as base:
        overview = page(base)
        assert [b[:2] for b in banners(overview)] == [("gleap_down", "")]
        assert badge(overview, KEY) == ("failing", "gleap_down")
        states.leave_gleap_down()
        assert banners(page(base)) == [] and badge(page(base), KEY) == ("ok", "ok")


def test_overdue_when_no_daemon_holds_the_store_and_a_next_run_is_past(states: States) -> None:
    states.enter_overdue()
    with serve(states.config) as base:
        overview = page(base)
        # One banner (the daemon-wide one names the audience); its row's next run says overdue.
        [(state, subject, text)] = banners(overview)
        assert (state, subject) == ("overdue", "") and KEY in text and "<code>audiencesync run</code>" in text
        row = re.search(rf'data-key="{KEY}">(.*?)</tr>', overview, re.S)
        assert row and re.search(
            r'<td class="next">[^<]*UTC <span class="badge sev-action" data-state="overdue"', row.group(1)
        )
        assert badge(overview, KEY) == ("action", "overdue")
        assert 'data-state="overdue"' in page(base, f"/audiences/{KEY}")
        states.leave_overdue()
        overview = page(base)
        assert banners(overview) == [] and 'data-state="overdue"' not in overview


def test_an_action_splits_into_words_and_commands_to_copy() -> None:
    def shown(action: str, key: str | None = None) -> str:
        return "".join(f"[{p.text}]" if p.command else p.text for p in web_attention.pieces(action, key))

    assert shown(f"{HOLD} (if the removals are right)", KEY) == f"[{HOLD}] (if the removals are right)"
    assert shown(f"audiencesync failures --audience {KEY}, fix the cause, then {RETRY}", KEY) == (
        f"[audiencesync failures --audience {KEY}], fix the cause, then [{RETRY}]"
    )
    assert shown("start the daemon (`audiencesync run`, or its service)") == (
        "start the daemon ([audiencesync run], or its service)"
    )
    assert (
        shown(f"audiencesync retire {KEY} removes its state", KEY)
        == f"[audiencesync retire {KEY}] removes its state"
    )
    assert shown("check the network") == "check the network"
    assert web_attention.pieces(None) == []


def test_a_delivery_blocked_by_a_refused_token_says_so_not_running(states: States) -> None:
    states.enter_token_refused()
    engine = store_mod.engine_for(states.config.store)
    with engine.begin() as conn:  # the daemon's delivery run, open while Gleap refuses every call
        audience_id = conn.execute(sa.select(audiences.c.id).where(audiences.c.key == KEY)).scalar_one()
        conn.execute(
            sa.insert(sync_runs).values(
                cycle_id="d1", audience_id=audience_id, mode="delivery", status="running",
                started_at=store_mod.utc_now() - timedelta(minutes=5), sent=0,
            )
        )  # fmt: skip
    engine.dispose()
    with serve(states.config) as base:
        [row] = re.findall(r'<tr class="delivery blocked">(.*?)</tr>', page(base), re.S)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        assert 'class="badge sev-failing" data-state="token_refused"' in cells[1] and "blocked" in cells[1]
        assert cells[-1] == "blocked"  # not "unknown" at 0.0 calls/s
