"""The HTTP side: a threading server on loopback and its handler, which frames each request
and hands it to the stand-in's routes (``routes``). Imports ``wire`` and ``routes``."""

from __future__ import annotations

import contextlib
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.gleap_standin.routes import Routes
from tests.gleap_standin.wire import INVALID, RecordedRequest, json_reply, parse_json


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connection attempts when more
    # clients connect at once, and each drop costs the client a 1 s SYN retry.
    request_queue_size = 64
    standin: Routes

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up and stop() cutting connections are expected here, not worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx's pool expects
    server_version = "GleapStandIn/1"
    # Headers and body go out in two writes; with Nagle on, each answer waits for
    # the client's delayed ACK (~40 ms), which would cap throughput at a crawl.
    disable_nagle_algorithm = True
    sys_version = ""
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.standin._connection_opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.standin._connection_closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # test output should show the test's own logs, not one line per request

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _read_body(self) -> bytes | None:
        """The whole body, or None when it cannot be framed (then the connection must close)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            return None
        if length < 0:
            return None
        raw = self.rfile.read(length)
        return raw if len(raw) == length else None

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        while True:
            size_line = self.rfile.readline(65537)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                return None
            if size == 0:
                # Skip trailers up to the blank line that ends the message.
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                return None
            parts.append(chunk)
            self.rfile.readline(3)  # the CRLF after each chunk

    def _dispatch(self) -> None:
        standin = self.server.standin
        seq = standin._arrived(self.path)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        raw = self._read_body()
        if raw is None:
            self.close_connection = True  # the stream is out of step; nothing after this can be trusted
            reply = json_reply(400, {"message": "Bad request body framing"})
            parsed: Any = None
        else:
            parsed = parse_json(raw)
            reply = standin._answer(self.command, self.path, headers, parsed)
        recorded_body = None if parsed is INVALID else parsed
        standin._record(seq, RecordedRequest(self.command, self.path, headers, recorded_body, reply.status))
        if reply.status == 0:
            self._drop()
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        cookie = standin._set_cookie()
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
        self.send_header("Content-Length", str(len(reply.body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(reply.body)

    def _drop(self) -> None:
        self.close_connection = True
        # Already gone is fine too: the client sees the same thing either way.
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
