"""A store brought into each state attention.py names, and back, for the web page's tests (over
HTTP and in the browser): every step a real `audiencesync` command against the Gleap stand-in,
as a person would live it, except where only a daemon could (Gleap down, a past next run).

Each ``enter_*`` opens a condition; its ``leave_*`` ends it the way the page's banner says to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import sqlalchemy as sa

from audiencesync.alerts.alerts import Alerts
from audiencesync.cli import main as cli
from audiencesync.config.loading import Config
from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import store as store_mod
from audiencesync.store.lease import WriterLease
from audiencesync.store.schema import audiences
from audiencesync.web.app import WebApp
from audiencesync.web.server import Server
from tests.conftest import TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn

KEY = "segment_a"
MEMBERS = [f"u{i}" for i in range(1, 11)]
HOLD = f"audiencesync sync --audience {KEY} --allow-removals"
RETRY = f"audiencesync retry --audience {KEY}"


class States:
    def __init__(self, make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> None:
        self.source, self.gleap = source, gleap
        source.set(MEMBERS)
        self.config: Config = make_config(gleap.base_url, extra="[sync]\nmax_attempts = 1\n")
        self.lease: WriterLease | None = None
        assert self.sync() == 0  # ok: every member delivered

    def sync(self, *args: str) -> int:
        """One `audiencesync sync` in this process: its alert conditions are recorded when it returns."""
        return cli.main(["--config", str(self.config.path), "sync", *args])

    def enter_held(self) -> None:
        self.source.set([])  # a broken source: the refresh would remove everyone
        assert self.sync() == 1

    def leave_held(self) -> None:
        assert self.sync("--audience", KEY, "--allow-removals") == 0  # the banner's command
        self.source.set(MEMBERS)  # the source mended: everyone back, for the next state
        assert self.sync() == 0

    def enter_parked(self) -> None:
        self.gleap.fail_user("u42", 422, body="contact is blocked")
        self.source.set([*MEMBERS, "u42"])  # u42 enters; Gleap refuses it (max_attempts = 1): parked
        assert self.sync() == 1

    def leave_parked(self) -> None:
        self.gleap.clear_faults()
        assert cli.main(["--config", str(self.config.path), "retry", "--audience", KEY]) == 0
        assert self.sync() == 0

    def enter_token_refused(self) -> None:
        self.gleap.set_token("a-token-rotated-in-gleap")
        self.source.set([*MEMBERS, "u99"])  # a change that waits
        assert self.sync() != 0

    def leave_token_refused(self) -> None:
        self.gleap.set_token(TOKEN)
        assert self.sync() == 0

    def _alerts(self) -> Alerts:
        return Alerts.of(self.config, store_mod.engine_for(self.config.store))

    def enter_gleap_down(self) -> None:
        """What the daemon's circuit breaker records (only a daemon has one), with a change owed."""
        self.source.set([*MEMBERS, "u77"])
        self.gleap.fail_next(10_000, 503)
        self.sync()
        alerts = self._alerts()
        alerts.gleap("HTTP 503 Service Unavailable")
        alerts.close(0)

    def leave_gleap_down(self) -> None:
        self.gleap.clear_faults()
        assert self.sync() == 0
        alerts = self._alerts()
        alerts.gleap(None)  # calls went through: the breaker closes
        alerts.close(0)

    def enter_overdue(self) -> None:
        """A daemon planned the next run an hour ago, then stopped: no one will run it."""
        engine = store_mod.engine_for(self.config.store)
        with engine.begin() as conn:
            past = store_mod.utc_now() - timedelta(hours=1)
            conn.execute(sa.update(audiences).where(audiences.c.key == KEY).values(next_run_at=past))
        engine.dispose()

    def leave_overdue(self) -> None:
        """A daemon starts: it holds the store (and would run what is due)."""
        self.lease = WriterLease(
            store_mod.engine_for(self.config.store), store_mod.utc_now, ttl_seconds=300, role="daemon"
        )
        assert self.lease.try_acquire() is None

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease.engine.dispose()


@contextlib.contextmanager
def serve(config: Config) -> Iterator[str]:
    """The pages as `audiencesync serve` shows them (attention from the store alone, now)."""
    engine = store_mod.engine_for(config.store)
    # No attention given: the app reads it from the store in each page's snapshot, as serve does.
    app = WebApp(
        engine, token=None, configured=lambda: lifecycle.states(config), health=lambda: (True, "ok"),
        clock=store_mod.utc_now, mode="serve",
    )  # fmt: skip
    server = Server("127.0.0.1", 0, app)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        engine.dispose()
