"""The HTTP endpoint: a WSGI app (``web.WebApp``: status pages, /healthz, /metrics) on a thread of its own.

The daemon runs one beside its work (``[server] listen``); `audiencesync serve` runs
one alone. Each request gets a thread, so a slow page never holds up /healthz.
"""

from __future__ import annotations

import errno
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from audiencesync.errors import ListenError
from audiencesync.web.app import WsgiApp


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request in flight never keeps the process alive


class _IPv6Server(_ThreadingServer):
    address_family = socket.AF_INET6


def address(host: str, port: int) -> str:
    """HOST:PORT as --listen and [server] listen write it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(exc: OSError, port: int) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            "the address is already in use, by a daemon (`audiencesync run`, whose [server] listen "
            f"it is), `audiencesync serve`, or another program (`ss -ltnp 'sport = :{port}'` shows which)"
        )
    if exc.errno == errno.EACCES:
        return "permission denied (a port below 1024 needs privileges)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "it is not an address of this host"
    if isinstance(exc, socket.gaierror):
        return f"the host name can't be resolved ({exc.strerror})"
    return exc.strerror or str(exc)


class Server:
    def __init__(self, host: str, port: int, app: WsgiApp, *, fix: str = "pick another address") -> None:
        """Listen on HOST:PORT (bound here, served from ``start``); ``ListenError`` when it can't,
        with ``fix``: what the caller's user changes for another address."""
        server_class = _IPv6Server if ":" in host else _ThreadingServer
        try:
            self._server: WSGIServer = make_server(
                host, port, app, server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ListenError(
                address(host, port), _why(exc, port), fix, in_use=exc.errno == errno.EADDRINUSE
            ) from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve on this thread until ``stop`` (from another thread or a signal handler)."""
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
