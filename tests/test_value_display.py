"""Trait values show as values (``608.44``, ``null``) and booleans as ``true``/``false`` on every
surface: the web's user lookup and parked list, and `failures`, which shows the value refused.
On both stores, against the loopback stand-in."""

from __future__ import annotations

import json
import re

from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import store as store_mod
from audiencesync.web.app import WebApp
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import cli
from tests.test_outcomes import wsgi_get
from tests.test_traits import cycle, set_trait, trait_config


def cells(page: str, table: str) -> list[list[str]]:
    body = re.search(rf'<table class="{table}">(.*?)</table>', page, re.S)
    assert body is not None, table
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S)
    found = [
        [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)] for r in rows
    ]
    return [row for row in found if row]  # not the header's


def test_a_refused_trait_value_shows_as_the_value_everywhere(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(["u1"])
    set_trait(source, {"u1": 608.44, "u3": 5})
    config = trait_config(make_config, gleap, sync='max_attempts = 1\nretry_backoff = "0s"')
    assert cycle(config).complete
    assert gleap.contacts["u1"]["tier"] == 608.44
    # u1's tier goes to 700 and u2 joins segment_a: Gleap refuses both for good (parked); u3's
    # value is dropped (null, delivered).
    source.set(["u1", "u2"])
    set_trait(source, {"u1": 700})
    gleap.fail_user("u1", 400, times=None)
    gleap.fail_user("u2", 400, times=None)
    cycle(config)
    listed = json.loads(cli(config, "failures", "--format", "json").stdout)
    assert [(r["audience"], r["user_id"], r["value"]) for r in listed] == [
        ("segment_a", "u2", True),
        ("tier", "u1", 700),
    ]
    table = cli(config, "failures").stdout.splitlines()
    assert re.match(r"tier +u1 +700 ", table[2]) and re.match(r"segment_a +u2 +true ", table[1]), table
    engine = store_mod.engine_for(config.store)
    app = WebApp(
        engine, token=None, configured=lambda: lifecycle.states(config), health=lambda: (True, "ok"),
        clock=store_mod.utc_now,
    )  # fmt: skip
    try:
        user = wsgi_get(app, "/users?id=u1")
        parked_tier = cells(wsgi_get(app, "/audiences/tier"), "parked")
        parked_a = cells(wsgi_get(app, "/audiences/segment_a"), "parked")
        gone = wsgi_get(app, "/users?id=u3")
    finally:
        engine.dispose()
    # audience, member or value, Gleap has, ...
    now = {row[0]: row[1:3] for row in cells(user, "current")}
    assert now == {"segment_a": ["true", "true"], "tier": ["700", "608.44"]}
    assert [row[1] for row in parked_tier] == ["700"] and [row[1] for row in parked_a] == ["true"]
    for page in (user, gone):
        assert not re.search(r">\s*(True|False|None)\s*<", page)
