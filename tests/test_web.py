"""The web status page on a store with known history (both databases), through a real loopback
HTTP server: each page's content, escaping, paging, the token check, and `serve` beside a daemon."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import html
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from audiencesync.alerts import attention
from audiencesync.config.loading import load_config
from audiencesync.config.secret import Secret
from audiencesync.errors import ConfigError
from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import audit, store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.store.schema import audience_counts, audiences, sync_runs
from audiencesync.web.app import WebApp
from audiencesync.web.server import Server
from tests import web_scenario as w
from tests.conftest import ConfigFactory, SourceDB, unchanged
from tests.gleap_standin import GleapStandIn

WEB_TOKEN = "web-token-0123456789abcdef"
SERVE = (sys.executable, "-m", "audiencesync", "--config")
Get = Callable[..., httpx.Response]


@contextlib.contextmanager
def serve(scenario: w.WebScenario, token: Secret | None = None) -> Iterator[str]:
    """The pages of the scenario's store on a real loopback server; its base URL."""
    engine = store_mod.engine_for(scenario.config.store)

    def seen() -> attention.Attention:  # as `serve` reads it, at the scenario's time
        with audit.snapshot(engine) as conn:
            return attention.read(conn, lifecycle.states(scenario.config), w.T8)

    app = WebApp(
        engine,
        token=token,
        configured=lambda: lifecycle.states(scenario.config),
        health=lambda: (True, "ok"),
        attention=seen,
        clock=lambda: w.T8,
        this_process=lambda: "active",
    )
    server = Server("127.0.0.1", 0, app)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        engine.dispose()


@pytest.fixture(scope="module")
def scenario(
    shared_make_config: ConfigFactory, shared_source: SourceDB, shared_gleap: GleapStandIn
) -> Iterator[w.WebScenario]:
    """Played once per store for this module's tests, which only read it (checked at the end)."""
    played = w.play(shared_make_config, shared_source, shared_gleap)
    with unchanged(played.config.store.url, "the web scenario"):
        yield played


@pytest.fixture
def own_scenario(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> w.WebScenario:
    """The scenario played again for a test that writes into its store."""
    return w.play(make_config, source, gleap)


@contextlib.contextmanager
def client(scenario: w.WebScenario) -> Iterator[Get]:
    with serve(scenario) as base, httpx.Client(base_url=base, timeout=10) as http:
        yield http.get


@pytest.fixture
def get(scenario: w.WebScenario) -> Iterator[Get]:
    with client(scenario) as get:
        yield get


def rows(page: str, css: str) -> list[str]:
    return re.findall(rf'<tr class="{css}"[^>]*>(.*?)</tr>', page, re.S)


def points(page: str) -> list[int]:
    """The number of points of each chart (an SVG circle each), in page order."""
    return [
        len(re.findall(r'<circle class="point"', svg)) for svg in re.findall(r"<svg.*?</svg>", page, re.S)
    ]


def test_overview_shows_every_audience_with_its_counts_last_run_and_members_chart(get: Get) -> None:
    answer = get("/")
    assert answer.status_code == 200
    page = answer.text
    audiences = rows(page, "audience")
    assert len(audiences) == 2
    for row, key in zip(audiences, ("segment_a", "segment_b"), strict=True):
        assert f'href="/audiences/{key}"' in row
        assert f'<td class="num members">{w.NOW[key]}</td>' in row
        assert "succeeded" in row or "partial" in row
    # One point per applied refresh: eight cycles each.
    assert points(page) == [len(w.MEMBERS_A), len(w.MEMBERS_B)]
    assert "2026-11-02 16:00:00 UTC" in page  # the last run's start, in UTC, said so
    assert 'This process: <span class="badge active sev-ok">active</span>' in page
    assert "None: no run is delivering now." in page
    # The parked count (u3 in a, the HTML id in b) is shown in both rows.
    assert all(re.search(r'<td class="num bad">1</td>', row) for row in audiences)


def test_a_paused_or_retired_audience_says_so_and_the_retired_come_last(scenario: w.WebScenario) -> None:
    # segment_a gone from the config (retired), segment_b paused: as `status` lists them.
    paused_b = dataclasses.replace(
        scenario.config,
        audiences=tuple(
            dataclasses.replace(a, enabled=False) for a in scenario.config.audiences if a.key == "segment_b"
        ),
    )
    with serve(dataclasses.replace(scenario, config=paused_b)) as base:
        page = httpx.get(f"{base}/", timeout=10).text
        audience_a = httpx.get(f"{base}/audiences/segment_a", timeout=10).text
    first, second = rows(page, "audience")
    # The state is the badge of its verdict (attention.py), grey: nothing to act on by itself.
    assert 'href="/audiences/segment_b"' in first
    assert '<span class="badge sev-neutral" data-state="paused"' in first and "enabled = false" in first
    assert 'href="/audiences/segment_a"' in second
    assert '<span class="badge sev-neutral" data-state="retired"' in second
    assert 'data-state="retired"' in audience_a


def test_audience_page_charts_runs_and_parked_failures_with_gleaps_answer(get: Get) -> None:
    page = get("/audiences/segment_a").text
    members_chart, changes_chart = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(re.findall(r'<circle class="point"', members_chart)) == len(w.MEMBERS_A)
    for value in w.MEMBERS_A:
        assert f"{value} members" in members_chart
    # Two bars per run (entered up, left down); cycle 4: u1, u6 entered, u3 left.
    assert len(re.findall(r'<rect class="bar (entered|left)[ "]', changes_chart)) == 2 * len(w.MEMBERS_A)
    assert "2 entered" in changes_chart and "1 left" in changes_chart
    # The scale is the incremental runs' (at most 2): the first sync's 3 entries are cut, and said.
    assert re.search(r'<rect class="bar entered cut"[^>]*><title>[^<]*\(initial\): 3 entered', changes_chart)
    assert "run started (UTC)" in members_chart and "members" in members_chart
    assert len(rows(page, "run")) == 8
    [parked] = rows(page, "parked-row")
    assert ">u3<" in parked and "bad user" in parked and "422" in parked


def test_audience_page_escapes_the_html_id_and_gleaps_html_answer(get: Get) -> None:
    page = get("/audiences/segment_b").text
    assert "<script" not in page and "<img" not in page
    [parked] = rows(page, "parked-row")
    assert html.escape(w.HTML_ID, quote=False) in parked
    assert html.escape(w.HTML_ERROR, quote=False) in parked


def test_a_delivery_in_progress_shows_sent_remaining_rate_and_eta(own_scenario: w.WebScenario) -> None:
    scenario = own_scenario  # a run is added
    engine = store_mod.engine_for(scenario.config.store)
    with engine.begin() as conn:
        audience_id = conn.execute(
            sa.select(audiences.c.id).where(audiences.c.key == "segment_a")
        ).scalar_one()
        pending = conn.execute(
            sa.select(audience_counts.c.pending).where(audience_counts.c.audience_id == audience_id)
        ).scalar_one()
        conn.execute(
            sa.insert(sync_runs).values(
                cycle_id="c9", audience_id=audience_id, mode="incremental", status="running",
                started_at=w.T8 - timedelta(seconds=100), sent=50,
            )
        )  # fmt: skip
    engine.dispose()
    with client(scenario) as get:
        [row] = rows(get("/").text, "delivery")
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    assert ">segment_a<" in cells[0]
    assert "stale" in cells[0]  # no process holds the store: a run a dead process left open
    assert cells[3:6] == ["50", str(pending), "0.5 calls/s"]
    assert cells[6] == ("0s" if pending == 0 else f"{pending * 2}s")


def test_runs_are_paged_and_filtered_by_status(get: Get) -> None:
    page = get("/runs").text
    runs = rows(page, "run")
    assert len(runs) == 16  # both audiences' eight cycles, fewer than a page
    assert 'class="older"' not in page
    held = get("/runs", params={"status": "partial"}).text
    assert rows(held, "run") and all(
        'data-status="partial"' in r for r in re.findall(r"<tr class=\"run\"[^>]*>", held)
    )
    audience = get("/audiences/segment_a", params={"before": "3"}).text
    assert len(rows(audience, "run")) == 1  # run 1: segment_a's first
    assert get("/runs", params={"status": "<bogus>"}).status_code == 200  # an unknown status: no filter


def test_user_lookup_shows_the_timeline_as_audit_user_does(get: Get, scenario: w.WebScenario) -> None:
    page = get("/users", params={"id": "u4"}).text
    events = rows(page, "event")
    engine = store_mod.engine_for(scenario.config.store)
    with audit.snapshot(engine) as conn:
        timeline = audit.timeline(conn, "u4")
    engine.dispose()
    assert len(events) == len(timeline)
    kinds = [re.search(r'data-event="(\w+)"', e) for e in re.findall(r'<tr class="event"[^>]*>', page)]
    assert [k.group(1) for k in kinds if k] == [row[2] for row in timeline]
    assert "503" in page and "acknowledged" in page
    shown = get("/users", params={"id": w.HTML_ID}).text
    assert "<script" not in shown
    assert f'<h2 class="user-id">{html.escape(w.HTML_ID, quote=False)}</h2>' in shown
    assert rows(shown, "event")
    assert "holds nothing about this user" in get("/users", params={"id": "nobody"}).text


def test_pages_forbid_scripts_and_frames_and_say_what_is_missing(get: Get) -> None:
    answer = get("/")
    csp = answer.headers["content-security-policy"]
    assert "script-src 'none'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert answer.headers["x-frame-options"] == "DENY"
    assert get("/static/style.css").headers["content-type"].startswith("text/css")
    assert get("/audiences/nope").status_code == 404
    assert get("/nope").status_code == 404
    assert httpx.post(str(answer.url), timeout=10).status_code == 405  # read-only


def test_no_page_shows_the_gleap_token_or_a_password(get: Get, scenario: w.WebScenario) -> None:
    token = scenario.config.gleap.api_token
    assert token is not None
    for path in ("/", "/audiences/segment_a", "/audiences/segment_b", "/runs", "/users?id=u4"):
        assert token.reveal() not in get(path).text


# --- the token -------------------------------------------------------------------------


@pytest.fixture
def guarded(scenario: w.WebScenario) -> Iterator[str]:
    with serve(scenario, Secret(WEB_TOKEN)) as base:
        yield base


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-0123456789"}, basic("wrong"), {"Authorization": "Basic !!"}],
    ids=["none", "wrong-bearer", "wrong-basic", "garbled"],
)
def test_a_missing_or_wrong_token_is_refused_on_every_page(guarded: str, headers: dict[str, str]) -> None:
    for path in ("/", "/runs", "/audiences/segment_a", "/users?id=u4", "/static/style.css", "/metrics"):
        answer = httpx.get(guarded + path, headers=headers, timeout=10)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"].startswith("Basic")
        assert "segment_a" not in answer.text


def test_the_right_token_opens_the_pages_and_healthz_needs_none(guarded: str) -> None:
    for headers in ({"Authorization": f"Bearer {WEB_TOKEN}"}, basic(WEB_TOKEN)):
        assert "segment_a" in httpx.get(guarded + "/", headers=headers, timeout=10).text
    assert httpx.get(guarded + "/healthz", timeout=10).status_code == 200


def test_loopback_without_a_token_is_open(get: Get) -> None:
    assert get("/").status_code == 200


def test_listening_beyond_loopback_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUDIENCESYNC_SERVER_TOKEN", raising=False)
    path = tmp_path / "c.toml"

    def load(server: str) -> object:
        path.write_text(f'[store]\nurl = "sqlite:///s.db"\n[server]\n{server}\n')
        return load_config(path)

    with pytest.raises(ConfigError, match=r"\[server\]\.auth_token.*AUDIENCESYNC_SERVER_TOKEN"):
        load('listen = "0.0.0.0:9464"')
    with pytest.raises(ConfigError, match="shorter than 16"):
        load('listen = "0.0.0.0:9464"\nauth_token = "short"')
    # No listen: the daemon serves nothing, but `serve --listen` serves with the token (test_serve_token.py).
    alone = load(f'auth_token = "{WEB_TOKEN}"')
    assert alone.server is None and alone.pages_token == Secret(WEB_TOKEN)  # type: ignore[attr-defined]
    assert load('listen = "127.0.0.1:9464"').server.auth_token is None  # type: ignore[attr-defined]
    assert load(f'listen = "0.0.0.0:9464"\nauth_token = "{WEB_TOKEN}"').server.auth_token == Secret(WEB_TOKEN)  # type: ignore[attr-defined]
    monkeypatch.setenv("AUDIENCESYNC_SERVER_TOKEN", WEB_TOKEN + "-env")
    assert load('listen = "[::]:9464"').server.auth_token == Secret(WEB_TOKEN + "-env")  # type: ignore[attr-defined]


# --- serve -----------------------------------------------------------------------------


def test_serve_refuses_a_public_address_without_a_token(scenario: w.WebScenario) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AUDIENCESYNC_SERVER_TOKEN"}
    done = subprocess.run(
        [*SERVE, str(scenario.config.path), "serve", "--listen", "0.0.0.0:0"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "auth_token" in done.stderr and "AUDIENCESYNC_SERVER_TOKEN" in done.stderr


def test_serve_reads_the_store_beside_the_lease_holder_and_never_takes_the_lease(
    own_scenario: w.WebScenario,
) -> None:
    scenario = own_scenario  # the lease is taken
    engine = store_mod.engine_for(scenario.config.store)
    lease = WriterLease(engine, store_mod.utc_now, ttl_seconds=120, role="daemon")
    assert lease.try_acquire() is None
    process = subprocess.Popen(
        [*SERVE, str(scenario.config.path), "serve", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # blocks until serve says where it listens (or dies)
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert found, line
        page = httpx.get(f"http://127.0.0.1:{found.group(1)}/", timeout=10).text
        assert "segment_a" in page and "daemon" in page
        assert f"pid {os.getpid()}" in page  # the holder shown is this test's lease
        assert lease.try_acquire() is None  # still ours
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        lease.release()
        engine.dispose()


# --- the daemon ------------------------------------------------------------------------


def test_the_daemon_serves_the_pages_beside_healthz_and_metrics_behind_its_token(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, tmp_path: Path
) -> None:
    from tests.test_daemon import SCHEDULE, SYNC, free_port, wait_for

    port = free_port()
    source.set(["u1", "u2"])
    env = os.environ | {"AUDIENCESYNC_SERVER_TOKEN": WEB_TOKEN}
    with pytest.MonkeyPatch.context() as patch:  # make_config loads the file in this process
        patch.setenv("AUDIENCESYNC_SERVER_TOKEN", WEB_TOKEN)
        config = make_config(
            gleap.base_url, sync=SYNC, extra=SCHEDULE + f'[server]\nlisten = "0.0.0.0:{port}"\n'
        )
    refused = subprocess.run([*SERVE, str(config.path), "run"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "auth_token" in refused.stderr  # no token in its environment
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen([*SERVE, str(config.path), "run"], stderr=log, env=env)
    base = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {WEB_TOKEN}"}
    try:

        def overview() -> str:
            try:
                return httpx.get(base + "/", headers=bearer, timeout=5).text
            except httpx.HTTPError:
                return ""

        wait_for(
            lambda: 'data-key="segment_a"' in overview() and "badge active" in overview(), what="the overview"
        )
        page = overview()
        assert 'This process: <span class="badge active sev-ok">active</span>' in page
        assert "served by the daemon" in page
        assert httpx.get(base + "/", timeout=5).status_code == 401
        assert httpx.get(base + "/metrics", timeout=5).status_code == 401
        assert "audiencesync_members" in httpx.get(base + "/metrics", headers=bearer, timeout=5).text
        assert httpx.get(base + "/healthz", timeout=5).status_code in (200, 503)  # open: no 401
        assert WEB_TOKEN not in page
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0
        log.close()
