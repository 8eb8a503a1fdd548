"""An address already in use (issue 21, item 2): `serve` says which and how to pick another (exit 2),
a second daemon on the host stands by without the address, and the active daemon listens on
[server] listen once it can, working on meanwhile. Real processes and real sockets; every wait
polls with a deadline."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from audiencesync.cli import main as cli
from audiencesync.config.loading import Config
from audiencesync.errors import ListenError
from audiencesync.web.server import Server
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, Daemon, daemons, free_port, healthz, members_true, wait_for

__all__ = ["daemons"]  # the fixture, re-used


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def listen(port: int) -> str:
    return f'[server]\nlisten = "127.0.0.1:{port}"\n'


def test_the_server_names_a_taken_address_through_the_one_exception_tree(taken: socket.socket) -> None:
    port = port_of(taken)
    with pytest.raises(ListenError) as raised:
        Server("127.0.0.1", port, lambda environ, start_response: [], fix="pick another")
    assert raised.value.in_use and raised.value.address == f"127.0.0.1:{port}"
    assert str(raised.value).startswith(f"can't listen on 127.0.0.1:{port}: the address is already in use")
    assert str(raised.value).endswith(". Fix: pick another")
    assert dict(cli.EXIT_STATUS)[ListenError] == 2


@pytest.mark.parametrize("explicit", [False, True], ids=["default_from_server_listen", "listen_option"])
def test_serve_on_a_taken_address_says_which_and_how_to_pick_another(
    make_config: ConfigFactory, taken: socket.socket, capsys: pytest.CaptureFixture[str], explicit: bool
) -> None:
    port = port_of(taken)
    config = make_config(extra=listen(port))
    option = ["--listen", f"127.0.0.1:{port}"] if explicit else []
    assert cli.main(["--config", str(config.path), "serve", *option]) == 2
    err = capsys.readouterr().err
    assert f"can't listen on 127.0.0.1:{port}: the address is already in use" in err, err
    assert f"Fix: pick another with --listen HOST:PORT, e.g. --listen 127.0.0.1:{port + 1}" in err or (
        not explicit and f"e.g. --listen 127.0.0.1:{port + 1}" in err
    )
    if not explicit:
        assert "serve's default address is [server] listen" in err
    assert "Traceback" not in err and "Errno" not in err


def test_a_second_daemon_on_the_host_stands_by_without_the_address_then_takes_it_over(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, daemons: Callable[[Config], Daemon]
) -> None:
    source.set(["u1"])
    port = free_port()
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE + listen(port))
    active = daemons(config)
    wait_for(lambda: healthz(port).startswith("ok"), what="the active daemon's /healthz")
    standby = daemons(config)
    wait_for(lambda: "standby: the store is held by" in standby.output, what="the standby message")
    # It left the address to the active daemon: no crash, no error; the store's /healthz is the active one's.
    assert standby.process.poll() is None, standby.output
    assert "Traceback" not in standby.output and "can't listen" not in standby.output
    assert "serving the status pages" not in standby.output
    assert healthz(port).startswith("ok")

    active.process.kill()
    active.process.wait()
    wait_for(lambda: "active:" in standby.output, timeout=15, what="the takeover")
    wait_for(lambda: healthz(port).startswith("ok"), timeout=15, what="the new active daemon's /healthz")
    served = "serving the status pages, /healthz and /metrics on http://127.0.0.1:"
    wait_for(lambda: served in standby.output, timeout=15, what="the log line")  # logged after the start
    source.set(["u1", "u2"])
    wait_for(lambda: members_true(gleap) == {"u1", "u2"}, timeout=15, what="the new daemon's cycle")
    assert standby.stop() == 0


def test_an_active_daemon_whose_address_is_taken_works_on_says_so_and_listens_once_it_is_free(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    taken: socket.socket,
) -> None:
    source.set(["u1"])
    port = port_of(taken)
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE + listen(port))
    daemon = daemons(config)
    wait_for(lambda: "not serving the status pages" in daemon.output, what="the error about the address")
    wait_for(lambda: members_true(gleap) == {"u1"}, what="a sync without the address")
    assert daemon.process.poll() is None and "Traceback" not in daemon.output
    line = next(line for line in daemon.output.splitlines() if "not serving the status pages" in line)
    assert f"can't listen on 127.0.0.1:{port}: the address is already in use" in line
    assert ". Fix: stop what listens there, or set [server] listen to a free address" in line
    assert daemon.output.count("not serving the status pages") == 1  # once, not at each retry

    taken.close()  # the other program stops
    wait_for(lambda: healthz(port).startswith("ok"), timeout=15, what="the daemon to listen once free")
    # Logged just after the server starts: it can answer a moment before.
    wait_for(lambda: "(the address is free again)" in daemon.output, timeout=15, what="the log line")
    assert daemon.stop() == 0


def steal(engine: sa.Engine, host: str, pid: int) -> None:
    """Another daemon takes the store's lease, for an hour."""
    until = datetime.now(UTC) + timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE leases SET holder = 'thief', host = :host, pid = :pid, role = 'daemon', "
                "expires_at = :until"
            ),
            {"host": host, "pid": pid, "until": until},
        )


def can_listen(port: int) -> bool:
    with socket.socket() as sock:
        # As a server binds: connections /healthz answered may linger in TIME_WAIT on the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def test_a_standby_keeps_the_address_behind_another_host_and_lets_go_of_it_for_this_one(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    daemons: Callable[[Config], Daemon],
    store_url: str,
) -> None:
    source.set(["u1"])
    port = free_port()
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE + listen(port))
    daemon = daemons(config)
    wait_for(lambda: healthz(port).startswith("ok"), what="the active daemon's /healthz")
    engine = sa.create_engine(store_url)
    try:
        # A daemon on another host takes the store: this one stands by and still answers, as a
        # standby in a container of its own does (the image's HEALTHCHECK asks it).
        steal(engine, "elsewhere", 1)
        wait_for(lambda: healthz(port).startswith("standby"), timeout=15, what="/healthz: standby")
        # A daemon on this host takes it: it needs the address, and the standby lets go of it.
        steal(engine, socket.gethostname(), os.getpid())
        wait_for(lambda: can_listen(port), timeout=15, what="the standby to let go of the address")
        # Logged just after the socket is closed: the address can be free a moment before.
        wait_for(
            lambda: "no longer listening on 127.0.0.1:" in daemon.output, timeout=15, what="the log line"
        )
        assert daemon.process.poll() is None and "can't listen" not in daemon.output
        with engine.begin() as conn:  # ...and gives the store back
            conn.execute(sa.text("DELETE FROM leases"))
        wait_for(
            lambda: daemon.output.count("active:") == 2, timeout=15, what="the daemon to take over again"
        )
        wait_for(lambda: healthz(port).startswith("ok"), timeout=15, what="the address listened on again")
    finally:
        engine.dispose()
    assert daemon.stop() == 0


def test_the_systemd_status_line_says_the_active_daemon_is_not_serving_its_address(
    make_config: ConfigFactory, taken: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    from audiencesync.daemon.listener import Listener
    from audiencesync.daemon.scheduler import Daemon as DaemonCore

    port = port_of(taken)
    core = DaemonCore(make_config(extra=listen(port)))
    try:
        core.listener = Listener("127.0.0.1", port, core._web(), retry_seconds=0)
        core.active = True
        assert not core.listener.open(active=True) and not core.listener.open(active=True)
        assert (
            core.service_status()
            == f"active; not serving on 127.0.0.1:{port} (in use or refused), trying again"
        )
        assert caplog.text.count("not serving the status pages") == 1  # once, not at each attempt
        taken.close()
        assert core.listener.open(active=True)
        assert core.service_status() == "active"
    finally:
        if core.listener is not None:
            core.listener.close()
        core.engine.dispose()
