"""A loopback webhook receiver for the alerts' tests: records every POST, and fails or hangs on demand."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Post:
    path: str
    headers: dict[str, str]  # lower-cased names
    raw: bytes
    status: int  # what was answered; 0: the request was held until released, then dropped

    @property
    def body(self) -> Any:
        return json.loads(self.raw)


class AlertReceiver:
    """Answers ``status`` (200 by default) to every POST; ``hang()`` holds each request until
    ``release()``, answering nothing (a webhook that never answers)."""

    def __init__(self) -> None:
        self.status = 200
        self.statuses: list[int] = []  # answered first, one each, before ``status``
        self._posts: list[Post] = []
        self._lock = threading.Condition()
        self._hanging = threading.Event()
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver._hanging.is_set():
                    receiver._record(Post(self.path, headers, raw, 0))
                    receiver._released.wait(60)
                    self.close_connection = True
                    return
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.status
                receiver._record(Post(self.path, headers, raw, status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> AlertReceiver:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def hang(self) -> None:
        self._hanging.set()

    def release(self) -> None:
        self._hanging.clear()
        self._released.set()

    def _record(self, post: Post) -> None:
        with self._lock:
            self._posts.append(post)
            self._lock.notify_all()

    def posts(self, path: str | None = None) -> list[Post]:
        with self._lock:
            return [p for p in self._posts if path is None or p.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 30) -> list[Post]:
        """At least ``count`` posts (to ``path``) have arrived; fails after ``timeout`` seconds."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.posts(path)) >= count, timeout):
                got = self.posts(path)
                raise AssertionError(f"expected {count} post(s) to {path or 'any path'}, got {got}")
            return self.posts(path)
