"""`audiencesync serve`: the web status page alone, reading the store, beside a daemon or on another host.

It never takes the writer lease and never writes: it opens the store as `status`
does, and each page is one read transaction.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from audiencesync.alerts import attention as attention_mod
from audiencesync.cli.help import add_command
from audiencesync.cli.output import EXIT_OK
from audiencesync.config.loading import Config
from audiencesync.config.sections import ENV_SERVER_TOKEN, MIN_SERVER_TOKEN, parse_listen
from audiencesync.config.urls import is_loopback
from audiencesync.errors import ConfigError, StoreError, brief
from audiencesync.lifecycle import states as lifecycle
from audiencesync.store import audit, store

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9464"

DESCRIPTION = (
    "Serve the web status page (the same pages `run` serves on [server] listen), reading the store "
    "only: run it beside a daemon, or on another host pointed at the same PostgreSQL store. It never "
    "takes the writer lease and never writes. Pages: / (every audience at a glance, the daemon, a "
    "delivery in progress), /audiences/KEY, /runs?status=STATUS, /users?id=USER_ID; and /healthz. "
    f"The token: ${ENV_SERVER_TOKEN} (preferred) or [server] auth_token. Without one the pages are "
    "open to anyone who can reach the address, so serve refuses any address but loopback without "
    "one. With one, a browser asks for it (any user name, the token as the password: HTTP Basic); "
    'tools send "Authorization: Bearer TOKEN".'
)


def add_serve_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = add_command(
        commands,
        "serve",
        help="serve the web status page from the store, read-only (never takes the writer lease)",
        description=DESCRIPTION,
        example=[
            "audiencesync --config /etc/audiencesync/audiencesync.toml serve",
            f"{ENV_SERVER_TOKEN}=$(openssl rand -hex 16) audiencesync serve --listen 0.0.0.0:8080",
        ],
    )
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address to serve on (default: [server] listen, else {DEFAULT_LISTEN}); an address "
        f"other than loopback needs the token ([server] auth_token or ${ENV_SERVER_TOKEN})",
    )
    serve.set_defaults(handler=cmd_serve)


def listen_address(args: argparse.Namespace, config: Config) -> tuple[str, int]:
    if args.listen is None:
        if config.server is not None:
            return config.server.host, config.server.port
        args.listen = DEFAULT_LISTEN
    host, port = parse_listen(args.listen)
    if host is None:
        raise ConfigError(
            f"--listen {args.listen!r} is not HOST:PORT", fix=f"write --listen {DEFAULT_LISTEN}"
        )
    return host, port


def _another_address(args: argparse.Namespace, host: str, port: int) -> str:
    """How to serve elsewhere: beside a daemon, serve's default ([server] listen) is the daemon's own."""
    from audiencesync.web.server import address  # see cmd_serve

    other = f"--listen {address(host, port + 1 if port < 65535 else 8080)}"
    if args.listen is None:
        return (
            f"serve's default address is [server] listen, which a running daemon serves on already "
            f"(the same pages): pick another with --listen HOST:PORT, e.g. {other}"
        )
    return f"pick another with --listen HOST:PORT, e.g. {other}, or stop what listens there"


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    # The web pages (Jinja2) are imported by the command that serves them, not by every command
    # at start-up (cli/__init__.py).
    from audiencesync.web.app import WebApp
    from audiencesync.web.server import Server

    host, port = listen_address(args, config)
    token = config.pages_token  # also without [server] listen: --listen gives the address
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"serving on {host}:{port} would show the store to anyone who can reach it, and no token is set",
            where="[server] auth_token",
            fix=f"set {ENV_SERVER_TOKEN} to a secret of at least {MIN_SERVER_TOKEN} characters "
            "(e.g. `openssl rand -hex 16`), or --listen 127.0.0.1:PORT and a reverse proxy in front",
        )
    engine = store.engine_for(config.store)  # never creates a store: a typo must not serve an empty one
    try:
        current, head = store.schema_revisions(engine)
        if current is None:
            raise StoreError(
                "the store has no schema yet: nothing to show. Fix: run `audiencesync db upgrade` "
                "(or a first sync), then serve again."
            )
        if current != head:
            log.warning(
                "the store is at schema revision %s, this audiencesync's is %s: some pages may fail "
                "until `audiencesync db upgrade` (serve never migrates it)",
                current,
                head,
            )

        def attention() -> attention_mod.Attention:
            """What needs a person, from the store alone: serve knows nothing of a daemon's own."""
            with audit.snapshot(engine) as conn:
                return attention_mod.read(conn, lifecycle.states(config), store.utc_now())

        def health() -> tuple[bool, str]:
            """Whether this page can read the store; what needs a person is listed below it
            (attention.py), as the daemon's /healthz lists it, without making serve unhealthy."""
            try:
                seen = attention()
            except Exception as exc:
                return False, f"the store can't be read: {brief(exc)}"
            return True, "\n".join(["ok (serve: read-only status page)", *(c.line() for c in seen.concerns)])

        app = WebApp(
            engine,
            token=token,
            configured=lambda: lifecycle.states(config),
            health=health,
            attention=attention,
            clock=store.utc_now,
            mode="serve",
        )
        server = Server(host, port, app, fix=_another_address(args, host, port))

        def stop(signum: int, frame: FrameType | None) -> None:
            # shutdown() waits for serve_forever to return: from the signal handler on the same
            # thread it would wait for ever, so it runs on a thread of its own.
            threading.Thread(target=server.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        print(
            f"serving the status page on http://{host}:{server.port}/ (read-only); stop with Ctrl-C",
            file=sys.stderr,
        )
        server.serve_forever()
    finally:
        engine.dispose()
    return EXIT_OK
