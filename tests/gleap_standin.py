"""A loopback HTTP server that speaks Gleap's admin API and misbehaves on demand.

Tests talk to it over real sockets (not a mocked transport) so that connection
pooling, keep-alive, timeouts and dropped connections behave as they do in
production. Stdlib only, so it can also run as a plain subprocess::

    python tests/gleap_standin.py --port 0 --token T --state-file PATH

which prints ``READY http://127.0.0.1:<port>`` and rewrites PATH whenever
contacts change, until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hmac
import json
import os
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Final
from urllib.parse import unquote, urlsplit

AUTH_PATH: Final = "/admin/auth"
IDENTIFY_PATH: Final = "/admin/identify"
CONTACTS_PATH: Final = "/admin/contacts/"  # DELETE /admin/contacts/<userId>
TRACK_PATH: Final = "/admin/track"
# An event's date as Gleap's docs and admin SDK send it: UTC, milliseconds, Z.
EVENT_DATE: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
RATE_WINDOW_SECONDS: Final = 60.0
# Gleap's documented limits on an identify call's custom data.
MAX_CUSTOM_KEYS: Final = 35
CONTACT_FIELDS: Final = frozenset(
    {"userId", "email", "name", "phone", "companyName", "companyId", "lang", "plan", "value",
     "createdAt", "lastActivity", "lastPageView"}
)  # fmt: skip
_JSON: Final = "application/json"
_ROUTE_KINDS: Final = {IDENTIFY_PATH: "identify", TRACK_PATH: "track", AUTH_PATH: "auth"}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased header names
    body: Any  # parsed JSON or None
    status: int  # status answered (0 when the connection was dropped)


@dataclass(frozen=True)
class _Reply:
    status: int  # 0 means: drop the connection without answering
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Faults:
    """What the fault rules decided for one request (``GleapStandIn._faults``)."""

    delay: float | None
    drop: bool
    failure: _Reply | None
    lost: bool  # applied, then the answer is lost
    ok: int  # the success status (a script may ask for 201 or 204)
    limit_headers: dict[str, str]
    limited: bool


@dataclass(frozen=True)
class BackgroundFaults:
    """Faults drawn at random for every identify, track and DELETE that no other rule answered
    (``GleapStandIn.set_background_faults``): a flaky Gleap, as a soak test wants it. Shares are
    of all such requests, from 0 to 1; ``seed`` makes a run repeatable."""

    server_error: float = 0.0  # answered a 5xx (one of ``statuses``), unapplied
    rate_limited: float = 0.0  # answered 429 with ``Retry-After: retry_after``, unapplied
    lost: float = 0.0  # applied, then the connection dropped: the answer is lost
    statuses: tuple[int, ...] = (500, 502, 503, 504)
    retry_after: str = "1"
    seed: int | None = None


@dataclass
class _UserFault:
    status: int
    body: str
    remaining: int | None  # None: never used up


class _Invalid:
    """Marks a body that is not valid JSON, which is not the same as a JSON ``null``."""


_INVALID: Final = _Invalid()


def _json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), {"Content-Type": _JSON, **(headers or {})})


def _text_reply(status: int, text: str, headers: dict[str, str] | None = None) -> _Reply:
    extra = dict(headers or {})
    if text:
        try:
            json.loads(text)
            extra.setdefault("Content-Type", _JSON)
        except ValueError:
            extra.setdefault("Content-Type", "text/plain; charset=utf-8")
    return _Reply(status, text.encode(), extra)


def _ok_reply(status: int, payload: Any, headers: dict[str, str]) -> _Reply:
    """A success: 200 unless a script asked for another 2xx (204 has no body)."""
    if status == 204:
        return _Reply(204, b"", dict(headers))
    return _json_reply(status, payload, headers)


def _reject_constant(name: str) -> Any:
    # JSON.parse on Gleap's side refuses NaN/Infinity; Python would accept them silently.
    raise ValueError(f"not JSON: {name}")


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return _INVALID


def _take(rules: deque[Any]) -> Any:
    """Pop the next rule whose count is not spent; rules are ``[count, value]`` lists."""
    while rules:
        rule = rules[0]
        if rule[0] <= 0:
            rules.popleft()
            continue
        rule[0] -= 1
        if rule[0] == 0:
            rules.popleft()
        return rule[1]
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connection attempts when more
    # clients connect at once, and each drop costs the client a 1 s SYN retry.
    request_queue_size = 64
    standin: GleapStandIn

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up and stop() cutting connections are expected here, not worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx's pool expects
    server_version = "GleapStandIn/1"
    # Headers and body go out in two writes; with Nagle on, each answer waits for
    # the client's delayed ACK (~40 ms), which would cap throughput at a crawl.
    disable_nagle_algorithm = True
    sys_version = ""
    server: _Server

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
            reply = _json_reply(400, {"message": "Bad request body framing"})
            parsed: Any = None
        else:
            parsed = _parse_json(raw)
            reply = standin._answer(self.command, self.path, headers, parsed)
        recorded_body = None if parsed is _INVALID else parsed
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


class GleapStandIn:
    """Gleap's ``/admin/auth``, ``/admin/identify`` and ``DELETE /admin/contacts/<id>`` on 127.0.0.1,
    with fault injection.

    Fault rules are consumed per kind in FIFO order, and only by identify requests
    carrying a valid token. For one identify the order of evaluation is: set_down (Gleap down:
    every call answered the same status), script_next (which, while it has steps, replaces
    drop_next, fail_next, lose_answer_next, the background faults and the rate limit),
    drop_next, fail_next, the background faults' 5xx and 429 (set_background_faults), rate limit,
    body validation (400), fail_user, success (its answer lost by lose_answer_next, else by the
    background faults' share of lost answers). delay_next is
    orthogonal: it postpones whatever the answer turns out to be (a drop included).
    ``latency_seconds`` postpones every identify's answer the same way, as a distant
    Gleap would (the benchmark's "50 ms per answer").
    """

    def __init__(
        self,
        token: str = "test-token",
        *,
        rate_limit_per_minute: int | None = None,
        latency_seconds: float = 0.0,
        keep_log: bool = True,
    ) -> None:
        self._lock = threading.Lock()
        # False: no request log and no identify bodies kept (a long soak run would grow them
        # without bound); the counts (answer_counts, last_ack_at) and the contacts are kept.
        self._keep_log = keep_log
        self._answer_counts: Counter[tuple[str, int]] = Counter()
        self._last_ack_at: float | None = None  # time.monotonic() of the last 2xx identify answered
        self._background: BackgroundFaults | None = None
        self._rng = random.Random()
        self._down: _Reply | None = None  # set_down(): every call answered this
        self._token = token
        self.rate_limit_per_minute = rate_limit_per_minute
        self.latency_seconds = latency_seconds
        self._requests: dict[int, RecordedRequest] = {}
        self._next_seq = 0
        # Requests by route as they arrive, before any fault or answer: wait_arrived() lets a
        # test know a call has left the client, which no mark in the store can say.
        self._arrivals: Counter[str] = Counter()
        self._arrived_changed = threading.Condition(self._lock)
        # Requests that arrived before reset_log() belong to the old log even if they finish later.
        self._log_epoch = 0
        self._identify_calls: list[dict[str, Any]] = []
        self._deleted_contacts: list[str] = []  # each DELETE of a contact that was answered (404 too)
        self._track_calls: list[list[dict[str, Any]]] = []  # each accepted track call's events
        self._bad_event_users: set[str] = set()
        self._track_fail_rules: deque[list[Any]] = deque()  # only track calls consume these
        self._track_lose_rules: deque[list[Any]] = deque()
        self._auth_fail_rules: deque[list[Any]] = deque()  # only GET /admin/auth consumes these
        self._contacts: dict[str, dict[str, Any]] = {}
        self._fail_rules: deque[list[Any]] = deque()
        self._delay_rules: deque[list[Any]] = deque()
        self._drop_rules: deque[list[Any]] = deque()
        self._lose_rules: deque[list[Any]] = deque()
        self._user_faults: dict[str, deque[_UserFault]] = {}
        self._script: deque[int | str] = deque()  # script_next(): one step per identify or DELETE
        self._every: tuple[int, _Reply] | None = None  # fail_every(): (n, the failure), until cleared
        self._every_seen = 0  # requests counted by fail_every()
        self._cookie: str | None = None  # set_cookie(): a Set-Cookie header on every answer
        self._window: deque[float] = deque()
        self._connections: set[socket.socket] = set()
        self._connections_opened = 0  # ever, since start(): how many the clients' pools opened
        self._stopping = threading.Event()
        # hold(): identify requests wait here, unanswered, until release().
        self._gate = threading.Event()
        self._gate.set()
        self._held = 0
        self._let_through = 0
        self._held_changed = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> GleapStandIn:
        """Serve on 127.0.0.1; after a stop() it comes back on the same port (an outage that ends)."""
        if self._server is not None:
            raise RuntimeError("GleapStandIn is already running")
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.standin = self
        self._port = server.server_address[1]
        self._stopping.clear()
        self._server = server
        # A short poll interval keeps stop() (and so every test using the fixture) quick.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="gleap-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        # Idle keep-alive connections would otherwise go on being answered by a "stopped" server.
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> GleapStandIn:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("GleapStandIn is not running; call start() first")
        return f"http://127.0.0.1:{self._port}"

    # -- state for assertions ----------------------------------------------------------------------

    @property
    def token(self) -> str:
        with self._lock:
            return self._token

    @token.setter
    def token(self, token: str) -> None:
        self.set_token(token)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [self._requests[seq] for seq in sorted(self._requests)]

    @property
    def contacts(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._contacts)

    @property
    def identify_calls(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._identify_calls)

    @property
    def deleted_contacts(self) -> list[str]:
        with self._lock:
            return list(self._deleted_contacts)

    @property
    def track_calls(self) -> list[list[dict[str, Any]]]:
        """The events of each accepted (2xx) track call, in arrival order."""
        with self._lock:
            return copy.deepcopy(self._track_calls)

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event accepted, in arrival order."""
        return [event for batch in self.track_calls for event in batch]

    @property
    def connections_opened(self) -> int:
        """The connections clients opened to the stand-in, all told (a pool that keeps its
        connections between calls opens each once)."""
        with self._lock:
            return self._connections_opened

    def answer_counts(self) -> dict[tuple[str, int], int]:
        """How many requests got each answer, by (route, status): route is ``identify``,
        ``track``, ``delete``, ``auth`` or ``other``; status 0 is a dropped or lost answer."""
        with self._lock:
            return dict(self._answer_counts)

    @property
    def last_ack_at(self) -> float | None:
        """When (``time.monotonic()``) an identify was last answered a 2xx; None before any."""
        with self._lock:
            return self._last_ack_at

    def reset_log(self) -> None:
        with self._lock:
            self._requests.clear()
            self._identify_calls.clear()
            self._deleted_contacts.clear()
            self._track_calls.clear()
            self._log_epoch = self._next_seq

    # -- fault injection ---------------------------------------------------------------------------

    def fail_next(self, count: int, status: int, *, retry_after: str | None = None, body: str = "") -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self._fail_rules.append([count, _text_reply(status, body, headers)])

    def fail_every(self, n: int, status: int, *, body: str = "") -> None:
        """From now until clear_faults(), every ``n``-th identify, track or DELETE request (after
        the other failure rules) is answered ``status``: a Gleap failing a share of its calls."""
        with self._lock:
            self._every, self._every_seen = (n, _text_reply(status, body)), 0

    def fail_user(self, user_id: str, status: int, *, body: str = "", times: int | None = None) -> None:
        with self._lock:
            self._user_faults.setdefault(user_id, deque()).append(_UserFault(status, body, times))

    def fail_track_next(self, count: int, status: int, *, body: str = "") -> None:
        """The next ``count`` track calls are answered ``status`` (0: the connection is dropped)."""
        with self._lock:
            self._track_fail_rules.append([count, _text_reply(status, body) if status else _Reply(0)])

    def fail_auth_next(self, count: int, status: int, *, body: str = "") -> None:
        """The next ``count`` token checks (GET /admin/auth, a valid token) are answered ``status``."""
        with self._lock:
            self._auth_fail_rules.append([count, _text_reply(status, body)])

    def lose_track_answer_next(self, count: int) -> None:
        """Accept the next ``count`` track calls, then drop the connection: the answer is lost."""
        with self._lock:
            self._track_lose_rules.append([count, True])

    def reject_events_of(self, user_id: str) -> None:
        """A track call carrying an event of this user is answered 400 as a whole."""
        with self._lock:
            self._bad_event_users.add(user_id)

    def delay_next(self, count: int, seconds: float) -> None:
        with self._lock:
            self._delay_rules.append([count, seconds])

    def lose_answer_next(self, count: int) -> None:
        """Apply the next ``count`` identifies, then drop the connection: the answer is lost."""
        with self._lock:
            self._lose_rules.append([count, True])

    def script_next(self, *steps: int | str) -> None:
        """The next identify, track or DELETE requests, one step each, in order, before any other rule:
        ``"lose"`` applies it and drops the answer; ``0`` drops it unapplied; a 2xx applies it and
        answers that status (204 with no body); any other status answers it, unapplied."""
        with self._lock:
            self._script.extend(steps)

    def set_cookie(self, cookie: str | None) -> None:
        """Every answer from now on carries ``Set-Cookie: <cookie>`` (None: no more)."""
        with self._lock:
            self._cookie = cookie

    def set_background_faults(self, faults: BackgroundFaults | None) -> None:
        """From now on, draw ``faults`` for every identify, track and DELETE that no rule above
        answers (None: no more). The explicit rules (script_next, drop_next, fail_next, ...)
        come first, the sliding-window rate limit after."""
        with self._lock:
            self._background = faults
            if faults is not None:
                self._rng = random.Random(faults.seed)

    def set_down(self, status: int | None) -> None:
        """Gleap down: every identify, track, DELETE and token check is answered ``status``
        (e.g. 503), unapplied, before any other rule, until ``set_down(None)``."""
        with self._lock:
            self._down = None if status is None else _json_reply(status, {"message": "Service unavailable"})

    def drop_next(self, count: int) -> None:
        with self._lock:
            self._drop_rules.append([count, True])

    def clear_faults(self) -> None:
        """Forget every pending fault rule (fail_user(times=None) is otherwise permanent)."""
        with self._lock:
            self._fail_rules.clear()
            self._delay_rules.clear()
            self._drop_rules.clear()
            self._lose_rules.clear()
            self._user_faults.clear()
            self._script.clear()
            self._every = None
            self._bad_event_users.clear()
            self._track_fail_rules.clear()
            self._track_lose_rules.clear()
            self._auth_fail_rules.clear()

    def hold(self, after: int = 0) -> None:
        """Answer the next ``after`` identify requests, then keep every later one
        waiting, unanswered, until release() (or stop()). wait_held() counts from here: a
        second hold() must not find the requests of the first one still counted."""
        with self._lock:
            self._let_through = after
            self._held = 0
            self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def wait_held(self, count: int = 1, timeout: float = 30) -> bool:
        """Block until ``count`` identify requests have arrived and are waiting at the last hold()."""
        with self._held_changed:
            return self._held_changed.wait_for(lambda: self._held >= count, timeout)

    def set_token(self, token: str) -> None:
        with self._lock:
            self._token = token

    # -- request handling (called from handler threads) --------------------------------------------

    def _connection_opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            self._connections_opened += 1

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _set_cookie(self) -> str | None:
        with self._lock:
            return self._cookie

    def _scripted(self) -> tuple[bool, _Reply | None, bool, int]:
        """The next script step, under the lock: (drop, failure, lose, success status)."""
        step = self._script.popleft()
        if step == "lose":
            return False, None, True, 200
        assert isinstance(step, int), step
        if step == 0:
            return True, None, False, 200
        if 200 <= step < 300:
            return False, None, False, step
        return False, _text_reply(step, ""), False, 200

    def _arrived(self, path: str) -> int:
        with self._arrived_changed:
            seq = self._next_seq
            self._next_seq += 1
            self._arrivals[urlsplit(path).path] += 1
            self._arrived_changed.notify_all()
            return seq

    def arrivals(self, route: str) -> int:
        """How many requests to ``route`` (a path) have arrived, answered or not."""
        with self._lock:
            return self._arrivals[route]

    def wait_arrived(self, route: str, count: int, timeout: float = 30) -> bool:
        """Block until ``count`` requests to ``route`` have arrived in all (see arrivals())."""
        with self._arrived_changed:
            return self._arrived_changed.wait_for(lambda: self._arrivals[route] >= count, timeout)

    def _record(self, seq: int, request: RecordedRequest) -> None:
        # Recorded before the answer goes out, so a test that has its response can assert on the log.
        route = urlsplit(request.path).path
        kind = _ROUTE_KINDS.get(route, "delete" if route.startswith(CONTACTS_PATH) else "other")
        with self._lock:
            self._answer_counts[(kind, request.status)] += 1
            if kind == "identify" and 200 <= request.status < 300:
                self._last_ack_at = time.monotonic()
            if seq >= self._log_epoch and self._keep_log:
                self._requests[seq] = request

    def _answer(self, method: str, path: str, headers: dict[str, str], body: Any) -> _Reply:
        with self._lock:
            token = self._token
        offered = headers.get("api-token")
        if offered is None or not hmac.compare_digest(offered.encode(), token.encode()):
            return _json_reply(401, {"message": "Unauthorized"})
        route = urlsplit(path).path
        if route == AUTH_PATH:
            if method != "GET":
                return _json_reply(405, {"message": "Method not allowed"}, {"Allow": "GET"})
            with self._lock:
                failure = self._down or _take(self._auth_fail_rules)
            return failure if failure is not None else _json_reply(200, {"ok": True})
        if route == IDENTIFY_PATH:
            if method != "POST":
                return _json_reply(405, {"message": "Method not allowed"}, {"Allow": "POST"})
            return self._identify(headers, body)
        if route.startswith(CONTACTS_PATH) and len(route) > len(CONTACTS_PATH):
            if method != "DELETE":
                return _json_reply(405, {"message": "Method not allowed"}, {"Allow": "DELETE"})
            return self._delete_contact(unquote(route[len(CONTACTS_PATH) :]))
        if route == TRACK_PATH:
            if method != "POST":
                return _json_reply(405, {"message": "Method not allowed"}, {"Allow": "POST"})
            return self._track(headers, body)
        return _json_reply(404, {"message": f"Not found: {route}"})

    def _faults(self, fail: tuple[deque[Any], ...], lose: tuple[deque[Any], ...]) -> _Faults:
        """This request's faults, taken under the lock in the order every route applies them:
        a script step, or drop, then a failure (the first of ``fail`` that has one), then the
        rate limit, then a lost answer (the first of ``lose`` that has one)."""
        with self._lock:
            delay: float | None = _take(self._delay_rules)
            if self._down is not None:
                return _Faults(delay, False, self._down, False, 200, {}, False)
            if self._script:
                drop, failure, lost, ok = self._scripted()
                return _Faults(delay, drop, failure, lost, ok, {}, False)
            drop = _take(self._drop_rules) is not None
            failure = None if drop else next((f for f in map(_take, fail) if f is not None), None)
            if not drop and failure is None and self._every is not None:
                self._every_seen += 1
                if self._every_seen % self._every[0] == 0:
                    failure = self._every[1]
            background = self._background
            if background is not None and not drop and failure is None:
                failure = self._background_failure(background)
            limit_headers, limited = ({}, False) if drop or failure else self._admit()
            lost = not (drop or failure or limited) and (
                any(_take(rules) is not None for rules in lose)
                or (background is not None and self._rng.random() < background.lost)
            )
            return _Faults(delay, drop, failure, lost, 200, limit_headers, limited)

    def _background_failure(self, background: BackgroundFaults) -> _Reply | None:
        """A drawn 5xx or 429, or None (under the lock)."""
        roll = self._rng.random()
        if roll < background.server_error:
            return _text_reply(self._rng.choice(background.statuses), "")
        if roll < background.server_error + background.rate_limited:
            return _json_reply(429, {"message": "Too many requests"}, {"Retry-After": background.retry_after})
        return None

    def _early(self, faults: _Faults, latency: float = 0.0) -> _Reply | None:
        """The answer a fault gives before the request is looked at, or None to go on."""
        delay = (faults.delay or 0.0) + latency
        if delay and self._stopping.wait(delay):
            return _Reply(0)  # stopped mid-request: a dead server answers nothing
        if faults.drop:
            return _Reply(0)
        if faults.failure is not None:
            return faults.failure
        if faults.limited:
            headers = {"Retry-After": "1", **faults.limit_headers}
            return _json_reply(429, {"message": "Too many requests"}, headers)
        return None

    def _delete_contact(self, user_id: str) -> _Reply:
        """DELETE a contact: 404 when unknown. Takes the same fault rules as identify (not hold())."""
        faults = self._faults((self._fail_rules,), (self._lose_rules,))
        early = self._early(faults)
        if early is not None:
            return early
        ok, lose, limit_headers = faults.ok, faults.lost, faults.limit_headers
        with self._lock:
            fault = self._user_fault(user_id)
            known = fault is None and self._contacts.pop(user_id, None) is not None
            if fault is None:
                self._deleted_contacts.append(user_id)
        if fault is not None:
            return _text_reply(fault.status, fault.body, limit_headers)
        self._contacts_changed()
        if lose:
            return _Reply(0)  # deleted, but the answer never reaches the client
        if not known:
            return _json_reply(404, {"message": "Contact not found"}, limit_headers)
        return _ok_reply(ok, {"userId": user_id, "deleted": True}, limit_headers)

    def _identify(self, headers: dict[str, str], body: Any) -> _Reply:
        with self._held_changed:
            wait = not self._gate.is_set() and self._let_through <= 0
            if wait:
                self._held += 1
                self._held_changed.notify_all()
            elif not self._gate.is_set():
                self._let_through -= 1
        if wait:
            while not self._gate.wait(0.05):
                if self._stopping.is_set():
                    return _Reply(0)
        faults = self._faults((self._fail_rules,), (self._lose_rules,))
        early = self._early(faults, self.latency_seconds)
        if early is not None:
            return early
        ok, lose, limit_headers = faults.ok, faults.lost, faults.limit_headers

        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != _JSON:
            return _json_reply(400, {"message": "Content-Type must be application/json"}, limit_headers)
        if not isinstance(body, dict):
            return _json_reply(400, {"message": "Body must be a JSON object"}, limit_headers)
        user_id = body.get("userId")
        if not isinstance(user_id, str) or not user_id:
            return _json_reply(400, {"message": "userId must be a non-empty string"}, limit_headers)
        custom = {k: v for k, v in body.items() if k not in CONTACT_FIELDS}
        if len(custom) > MAX_CUSTOM_KEYS:
            message = f"At most {MAX_CUSTOM_KEYS} custom data keys per call, got {len(custom)}"
            return _json_reply(400, {"message": message}, limit_headers)
        # null: what a trait sends for a user who lost their value (as Engage does). Gleap
        # documents only strings, numbers and booleans; the stand-in takes null and keeps it,
        # the README tells users to set the trait's `missing` to be sure.
        if not all(v is None or isinstance(v, str | int | float | bool) for v in custom.values()):
            return _json_reply(400, {"message": "Custom data values must be strings, numbers or booleans"})

        with self._lock:
            fault = self._user_fault(user_id)
            if fault is None:
                self._contacts.setdefault(user_id, {}).update(copy.deepcopy(body))
                if self._keep_log:
                    self._identify_calls.append(copy.deepcopy(body))
        if fault is not None:
            return _text_reply(fault.status, fault.body, limit_headers)
        self._contacts_changed()
        if lose:
            return _Reply(0)  # applied, but the answer never reaches the client
        return _ok_reply(ok, {"userId": user_id, "ok": True}, limit_headers)

    def _track(self, headers: dict[str, str], body: Any) -> _Reply:
        """Events, with the same fault rules as identify (but not hold()), and their own
        (fail_track_next, lose_track_answer_next, reject_events_of): drop, fail, rate limit,
        validation, reject_events_of, then success (or a lost answer)."""
        faults = self._faults(
            (self._track_fail_rules, self._fail_rules), (self._track_lose_rules, self._lose_rules)
        )
        early = self._early(faults)
        if early is not None:
            return early
        ok, lose, limit_headers = faults.ok, faults.lost, faults.limit_headers
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != _JSON:
            return _json_reply(400, {"message": "Content-Type must be application/json"})
        problem = _track_problem(body)
        if problem is not None:
            return _json_reply(400, {"message": problem})
        with self._lock:
            bad = sorted({e["userId"] for e in body["events"]} & self._bad_event_users)
            if not bad:
                self._track_calls.append(copy.deepcopy(body["events"]))
        if bad:
            return _json_reply(400, {"message": f"Invalid event for user {bad[0]}"})
        self._contacts_changed()
        if lose:
            return _Reply(0)
        return _ok_reply(ok, {"ok": True}, limit_headers)

    def _user_fault(self, user_id: str) -> _UserFault | None:
        faults = self._user_faults.get(user_id)
        if not faults:
            return None
        fault = faults[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                faults.popleft()
        return fault

    def _admit(self) -> tuple[dict[str, str], bool]:
        """Sliding-window limiter; only admitted requests count, so a client that backs off gets through."""
        limit = self.rate_limit_per_minute
        if limit is None:
            return {}, False
        now = time.monotonic()
        while self._window and now - self._window[0] >= RATE_WINDOW_SECONDS:
            self._window.popleft()
        limited = len(self._window) >= limit
        if not limited:
            self._window.append(now)
        headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(limit - len(self._window))}
        return headers, limited

    def _contacts_changed(self) -> None:
        """Hook for subclasses; runs after each successful identify, before the answer is sent."""


def _track_problem(body: Any) -> str | None:
    """Why a track body is not what Gleap takes, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("events"), list) or not body["events"]:
        return 'Body must be {"events": [...]} with at least one event'
    for event in body["events"]:
        if not isinstance(event, dict) or set(event) != {"name", "date", "userId", "data"}:
            return "Each event has exactly name, date, userId and data"
        if not isinstance(event["name"], str) or not event["name"]:
            return "name must be a non-empty string"
        if not isinstance(event["userId"], str) or not event["userId"]:
            return "userId must be a non-empty string"
        if not isinstance(event["date"], str) or not EVENT_DATE.fullmatch(event["date"]):
            return f"date must be ISO 8601 UTC with milliseconds, got {event['date']!r}"
        data = event["data"]
        if not isinstance(data, dict) or not all(
            isinstance(v, str | int | float | bool) for v in data.values()
        ):
            return "data must be flat: strings, numbers and booleans"
    return None


class _StateFileStandIn(GleapStandIn):
    """The standalone process's view for a parent test: contacts mirrored into a JSON file."""

    def __init__(
        self, state_file: Path, token: str, rate_limit_per_minute: int | None, latency_seconds: float = 0.0
    ) -> None:
        super().__init__(token, rate_limit_per_minute=rate_limit_per_minute, latency_seconds=latency_seconds)
        self.state_file = state_file
        # Serialises writers, and each snapshots inside it, so an older state never lands last.
        self._write_lock = threading.Lock()

    def _contacts_changed(self) -> None:
        with self._write_lock:
            with self._lock:
                state = {
                    "contacts": self._contacts,
                    "identify_calls": len(self._identify_calls),
                    "track_calls": self._track_calls,
                }
                text = json.dumps(state, sort_keys=True)
            # Written whole then renamed, so a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=self.state_file.parent, prefix=f".{self.state_file.name}.")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(text)
                os.replace(tmp, self.state_file)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Gleap stand-in as a process.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--rate-limit", type=int, default=None, help="identify requests per minute")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each identify's answer")
    args = parser.parse_args(argv)

    # Blocked before any thread starts, so every thread inherits the mask and sigwait() receives them.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    standin = _StateFileStandIn(args.state_file, args.token, args.rate_limit, args.latency)
    standin._port = args.port
    standin._contacts_changed()  # the file exists from READY on, so a parent can read it at any time
    standin.start()
    print(f"READY {standin.base_url}", flush=True)
    signal.sigwait(stop_signals)
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
