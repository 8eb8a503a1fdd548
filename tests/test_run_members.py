"""A run's members are the snapshot after it: a failed or held refresh, and a delivery-only run,
show the members the store still holds (not 0, nor what a held refresh would have left), and the
runs table says nothing was applied. On both stores, against the loopback stand-in."""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import store as store_mod
from audiencesync.store.schema import sync_runs
from audiencesync.store.store import Store
from audiencesync.sync.cycle import Syncer
from audiencesync.web.app import WebApp
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_outcomes import cycle, wsgi_get
from tests.test_sync import only
from tests.test_value_display import cells

USERS = [f"u{i:02d}" for i in range(62)]


def test_failed_held_and_delivery_runs_show_the_unchanged_snapshot(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn
) -> None:
    source.set(USERS)
    config = make_config(gleap.base_url)
    assert only(cycle(config)).members == 62
    # The source's query fails: nothing is read, nothing applied.
    with sqlite3.connect(source.path) as lite:
        lite.execute("ALTER TABLE members RENAME TO gone")
    lite.close()
    failed = only(cycle(config))
    with sqlite3.connect(source.path) as lite:
        lite.execute("ALTER TABLE gone RENAME TO members")
    lite.close()
    # The source returns 2 of 62: the guard holds the refresh (it would have left 2).
    source.set(USERS[:2])
    held = only(cycle(config))
    assert (failed.status, held.status) == ("failed", "held")
    assert (failed.members, held.members) == (62, 62)  # the summary says what the store holds
    # The daemon's delivery-only run between refreshes.
    engine = store_mod.engine_for(config.store)
    syncer = Syncer(config, Store(engine))
    try:
        syncer.finish(syncer.delivery_run(config.audiences[0], "delivery-cycle"))
    finally:
        syncer.sources.dispose()
    with engine.connect() as conn:
        runs = conn.execute(sa.select(sync_runs.c.status, sync_runs.c.mode, sync_runs.c.members)).all()
    assert [tuple(r) for r in runs] == [
        ("succeeded", "initial", 62),
        ("failed", "incremental", 62),
        ("held", "incremental", 62),
        ("succeeded", "delivery", 62),
    ]
    app = WebApp(
        engine, token=None, configured=lambda: lifecycle.states(config), health=lambda: (True, "ok"),
        clock=store_mod.utc_now,
    )  # fmt: skip
    try:
        table = cells(wsgi_get(app, "/runs"), "runs")
    finally:
        engine.dispose()
    # run, audience, status, mode, started, took, members, entered, left (or "nothing applied")...
    assert [(row[2], row[6], row[7]) for row in table] == [
        ("succeeded", "62", "nothing applied"),
        ("held", "62", "nothing applied"),
        ("failed", "62", "nothing applied"),
        ("succeeded", "62", "62"),
    ]
