"""The status pages in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
which `.ci/run` installs) loads each page from a real server on the web scenario's store.

It checks what a person sees (the audience rows, the charts and their points, the user's
timeline), that the console has no error (a CSP violation or a missing file is one), and that an
id made of HTML shows as text and runs nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests import web_scenario as w
from tests.conftest import SQLITE_ONLY, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_web import serve
from tests.web_states import HOLD, KEY, RETRY, States, serve as serve_states

CHROMIUM = os.environ.get("AUDIENCESYNC_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AUDIENCESYNC_CHROMEDRIVER", "/usr/bin/chromedriver")
MISSING = [path for path in (CHROMIUM, CHROMEDRIVER) if not (os.path.exists(path) or shutil.which(path))]

if MISSING:
    reason = (
        f"{' and '.join(MISSING)} missing: apt-get install chromium chromium-driver (see docs/development.md)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"under CI the browser tests must run: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only once the browser is known to be there
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# The browser sees the same HTML on both stores; test_web and test_web_attention cover PostgreSQL.
pytestmark = SQLITE_ONLY


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def base(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str) -> Iterator[str]:
    with serve(w.play(make_config, source, gleap)) as url:
        yield url


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console's errors since the last look (a CSP violation, a file that failed to load...)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [entry for entry in entries if entry["level"] in ("SEVERE", "ERROR")]


def load(driver: webdriver.Chrome, url: str) -> None:
    driver.get(url)
    assert console_errors(driver) == []
    assert driver.find_element(By.TAG_NAME, "footer").text.find("UTC") > 0


def navigated(driver: webdriver.Chrome, css: str, text: str | None = None) -> None:
    """Wait for the page a form's submit loads (the submit returns before it does): its ``css``
    element is there (with ``text``). A deadline, not a race: a loaded machine is slow.

    The page before can still be there when ``arrived`` looks, and go between finding its element
    and reading the element's text: that stale element is a look to repeat, not a failure."""

    def arrived(d: webdriver.Chrome) -> bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        return bool(found) and (text is None or found[0].text == text)

    WebDriverWait(
        driver, 60, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
    ).until(arrived)


def alert_open(driver: webdriver.Chrome) -> bool:
    try:
        driver.switch_to.alert  # noqa: B018 - raises when there is none
    except Exception:
        return False
    return True


def cells(row: Any) -> list[str]:
    return [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]


def test_overview_in_a_browser(browser: webdriver.Chrome, base: str) -> None:
    load(browser, base + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.audience")
    assert [row.get_attribute("data-key") for row in rows] == ["segment_a", "segment_b"]
    assert [row.find_element(By.CSS_SELECTOR, "td.members").text for row in rows] == ["3", "2"]
    sparks = [row.find_elements(By.CSS_SELECTOR, "svg.chart circle.point") for row in rows]
    assert [len(points) for points in sparks] == [len(w.MEMBERS_A), len(w.MEMBERS_B)]
    # The stylesheet loaded and applies (CSP allows it): the header is dark, the chart line drawn.
    header = browser.find_element(By.TAG_NAME, "header")
    assert header.value_of_css_property("background-color") == "rgba(36, 41, 47, 1)"
    line = rows[0].find_element(By.CSS_SELECTOR, "polyline.line")
    assert line.value_of_css_property("fill") == "none"


def test_audience_page_in_a_browser_shows_charts_and_the_html_id_as_text(
    browser: webdriver.Chrome, base: str
) -> None:
    load(browser, base + "/audiences/segment_b")
    members, changes = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(members.find_elements(By.CSS_SELECTOR, "circle.point")) == len(w.MEMBERS_B)
    assert len(changes.find_elements(By.CSS_SELECTOR, "rect.bar")) == 2 * len(w.MEMBERS_B)
    assert "run started (UTC)" in members.text
    [parked] = browser.find_elements(By.CSS_SELECTOR, "tr.parked-row")
    assert cells(parked)[0] == w.HTML_ID and cells(parked)[-1].endswith(w.HTML_ERROR)
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []
    assert not alert_open(browser)


def test_user_lookup_in_a_browser(browser: webdriver.Chrome, base: str) -> None:
    load(browser, base + "/users")
    box = browser.find_element(By.ID, "user-search")
    box.send_keys("u4")
    box.submit()
    navigated(browser, "h2.user-id", "u4")
    events = browser.find_elements(By.CSS_SELECTOR, "tr.event")
    kinds = [row.get_attribute("data-event") for row in events]
    assert kinds[0] == "entered" and kinds.count("call") == 5  # four 503s, then the 200
    assert "acknowledged" in cells(events[-1])
    # The HTML id, typed into the box as a person would: shown as text, nothing runs.
    box = browser.find_element(By.ID, "user-search")
    box.clear()
    box.send_keys(w.HTML_ID)
    box.submit()
    navigated(browser, "h2.user-id", w.HTML_ID)
    assert browser.find_element(By.CSS_SELECTOR, "h2.user-id").text == w.HTML_ID
    assert browser.find_elements(By.CSS_SELECTOR, "tr.event")
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert not alert_open(browser)
    assert console_errors(browser) == []


def test_runs_page_in_a_browser_filters_by_status(browser: webdriver.Chrome, base: str) -> None:
    load(browser, base + "/runs")
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.run")) == 16
    browser.find_element(By.CSS_SELECTOR, "#status option[value='succeeded']").click()
    browser.find_element(By.CSS_SELECTOR, "form.filter button").click()
    navigated(browser, "#status option[value='succeeded'][selected]")
    statuses = {row.get_attribute("data-status") for row in browser.find_elements(By.CSS_SELECTOR, "tr.run")}
    assert statuses == {"succeeded"}
    assert console_errors(browser) == []


@pytest.fixture
def states(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, store_url: str
) -> Iterator[States]:
    made = States(make_config, source, gleap)
    try:
        yield made
    finally:
        made.close()


def shown(driver: webdriver.Chrome) -> list[tuple[str, str, list[str]]]:
    """Each banner at the top of the page: its state, its severity class, the commands to copy."""
    return [
        (
            banner.get_attribute("data-state") or "",
            next(c for c in (banner.get_attribute("class") or "").split() if c.startswith("sev-")),
            [code.text for code in banner.find_elements(By.CSS_SELECTOR, ".fix code")],
        )
        for banner in driver.find_elements(By.CSS_SELECTOR, ".banners .banner")
    ]


def state_badge(driver: webdriver.Chrome) -> tuple[str, str, str]:
    """The audience's badge on the overview: its words, severity class and background colour."""
    badge = driver.find_element(By.CSS_SELECTOR, f'tr.audience[data-key="{KEY}"] td.state .badge')
    severity = next(c for c in (badge.get_attribute("class") or "").split() if c.startswith("sev-"))
    return badge.text, severity, badge.value_of_css_property("background-color")


def test_each_condition_shows_a_banner_with_its_command_and_a_badge_then_clears(
    browser: webdriver.Chrome, states: States
) -> None:
    with serve_states(states.config) as base:
        load(browser, base + "/")
        assert shown(browser) == []
        words, severity, ok_colour = state_badge(browser)
        assert (words, severity) == ("ok", "sev-ok")
        colours = {"sev-ok": ok_colour}

        cases = [
            ("held", states.enter_held, states.leave_held, "sev-action", [HOLD]),
            ("parked", states.enter_parked, states.leave_parked, "sev-action",
             [f"audiencesync failures --audience {KEY}", RETRY]),
            ("token_refused", states.enter_token_refused, states.leave_token_refused, "sev-failing",
             ["audiencesync check"]),
        ]  # fmt: skip
        for state, enter, leave, severity, commands in cases:
            enter()
            load(browser, base + "/")
            assert shown(browser) == [(state, severity, commands)], state
            words, badge_severity, colour = state_badge(browser)
            assert (words, badge_severity) == (state.replace("_", " "), severity)
            colours[severity] = colour
            # The audience's own page: the same banner first, above its counts.
            load(browser, base + f"/audiences/{KEY}")
            assert shown(browser) == [(state, severity, commands)], state
            top = browser.find_element(By.CSS_SELECTOR, ".banners").location["y"]
            assert top < browser.find_element(By.CSS_SELECTOR, "section.counts").location["y"]
            header = browser.find_element(By.CSS_SELECTOR, "section.counts .state .badge")
            assert header.text == state.replace("_", " ")
            leave()
            load(browser, base + "/")
            assert shown(browser) == [], state
            assert state_badge(browser)[:2] == ("ok", "sev-ok")
        # Three severities, three colours (and each badge says its word, above).
        assert len(set(colours.values())) == 3
        # "held" (a run's result) and "running" do not share a colour.
        load(browser, base + "/runs?status=held")
        held = browser.find_element(By.CSS_SELECTOR, "span.badge.held")
        assert held.value_of_css_property("background-color") == colours["sev-action"]
        assert held.value_of_css_property("background-color") != "rgba(221, 244, 255, 1)"  # progress' blue
