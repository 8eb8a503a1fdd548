"""The HTTP endpoint: a WSGI app (``web.WebApp``: status pages, /healthz, /metrics) on a thread of its own.

The daemon runs one beside its work (``[server] listen``); `audiencesync serve` runs
one alone. Each request gets a thread, so a slow page never holds up /healthz.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from audiencesync.web import WsgiApp


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request in flight never keeps the process alive


class _IPv6Server(_ThreadingServer):
    address_family = socket.AF_INET6


class Server:
    def __init__(self, host: str, port: int, app: WsgiApp) -> None:
        server_class = _IPv6Server if ":" in host else _ThreadingServer
        self._server: WSGIServer = make_server(
            host, port, app, server_class=server_class, handler_class=_QuietHandler
        )
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
