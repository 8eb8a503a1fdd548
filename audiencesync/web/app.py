"""The web status page: a WSGI app that routes, checks the token, and renders ``web_pages`` with Jinja2.

Served by the daemon beside /healthz and /metrics (``server.py``), and by
`audiencesync serve`, which only reads the store. Read-only: every request is
a GET in one read transaction (``audit.snapshot``), and nothing on a page
changes the store.

Jinja2 because it escapes by default (autoescape): every value from a source
or from Gleap (user ids, Gleap's texts, audience names) is escaped without a
call to forget, in the pages and in the SVG charts alike. The pages load no
script and nothing from elsewhere; the Content-Security-Policy says so to the
browser, so an injected ``<script>`` would not run even if escaping failed.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote

import jinja2
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from audiencesync import values
from audiencesync.alerts import attention as attention_mod
from audiencesync.alerts.attention import Attention
from audiencesync.config.secret import Secret
from audiencesync.errors import AudienceSyncError, brief
from audiencesync.store import audit
from audiencesync.web import charts, pages as web_pages
from audiencesync.web.attention import GLOBALS as ATTENTION

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Health = Callable[[], tuple[bool, str]]

# Nothing but this server's own stylesheet and icon; no script at all; never in a frame.
SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'none'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    # Pages hold user ids: no shared cache keeps them.
    ("Cache-Control", "no-store"),
]
STATIC = {"style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
OPEN_PATHS = ("/healthz",)  # a load balancer's probe carries no token


def _utc(value: object) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S} UTC" if isinstance(value, datetime) else "-"


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float) or seconds != seconds or seconds < 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _took(run: dict[str, Any] | None) -> str:
    if not run or run.get("finished_at") is None:
        return "-"
    return _duration((run["finished_at"] - run["started_at"]).total_seconds())


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("audiencesync.web", "templates"),
        autoescape=True,  # every template, .html and .svg alike
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the tests, not the reader
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        utc=_utc,
        duration=_duration,
        took=_took,
        count=_count,
        value=values.shown,
        value_text=values.shown_text,
    )
    env.globals.update(
        members_chart=charts.members, changes_chart=charts.changes, statuses=web_pages.RUN_STATUSES
    )
    env.globals.update(ATTENTION)
    return env


class WebApp:
    """The pages, /healthz, and /metrics when given one; a WSGI callable.

    ``configured``: the state of each key the config has now (``lifecycle.states``: live,
    paused or renamed; any other key of the store is retired; a reload changes them);
    ``this_process``: the daemon's own state (active or standby), None under `serve`;
    ``attention``: what needs a person (attention.py), as `status` and /healthz read it: the
    daemon's, with what only it knows; by default (`serve`), read from the store in the page's
    own snapshot. Read once per page.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        token: Secret | None,
        configured: Callable[[], Mapping[str, str]],
        health: Health,
        clock: Callable[[], datetime],
        metrics: WsgiApp | None = None,
        this_process: Callable[[], str] | None = None,
        mode: str = "daemon",
        attention: Callable[[], Attention] | None = None,
    ) -> None:
        self.engine = engine
        self._token = token.reveal().encode() if token is not None else None
        self.configured = configured
        self.health = health
        self.attention = attention
        self.clock = clock
        self.metrics = metrics
        self.this_process = this_process
        self.mode = mode  # daemon | serve: said in the footer
        self.env = environment()

    # --- WSGI -------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return self._plain(
                start_response, "405 Method Not Allowed", "read-only: GET only\n", [("Allow", "GET, HEAD")]
            )
        if path not in OPEN_PATHS and not self.authorized(environ):
            return self._plain(
                start_response,
                "401 Unauthorized",
                "a token is required: HTTP Basic with the token as the password, "
                "or Authorization: Bearer TOKEN\n",
                [("WWW-Authenticate", 'Basic realm="audiencesync", charset="UTF-8"')],
            )
        if path == "/healthz":
            ok, reason = self.health()
            return self._plain(start_response, "200 OK" if ok else "503 Service Unavailable", reason + "\n")
        if path == "/metrics" and self.metrics is not None:
            return self.metrics(environ, start_response)
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"), start_response)
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        try:
            return self._page(path, query, start_response)
        except (SQLAlchemyError, AudienceSyncError) as exc:
            # The reason goes to the log; a page says only what to do (no SQL, no URL in it).
            log.error("status page %s: the store can't be read: %s", path, brief(exc))
            return self._render(
                start_response, "error.html", "503 Service Unavailable", title="The store can't be read",
                message="The store did not answer. The log of this process says why; "
                "`audiencesync check` tests the store. This page tries again when reloaded.",
            )  # fmt: skip

    def authorized(self, environ: dict[str, Any]) -> bool:
        if self._token is None:
            return True
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, credentials = header.partition(" ")
        given = b""
        if scheme.lower() == "bearer":
            given = credentials.strip().encode()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            given = decoded.partition(b":")[2]  # any user name; the password is the token
        # Constant time: the comparison takes as long whatever prefix of the token was right.
        return hmac.compare_digest(given, self._token)

    # --- pages ------------------------------------------------------------------------

    def _page(self, path: str, query: dict[str, str], start_response: StartResponse) -> Iterable[bytes]:
        configured = self.configured()
        now = self.clock()
        with audit.snapshot(self.engine) as conn:
            if path == "/":
                state = self.this_process() if self.this_process is not None else None
                data = web_pages.overview(conn, configured, now, state)
                seen = self._attention(conn, configured, now)
                return self._render(start_response, "overview.html", title="Overview", page=data, seen=seen)
            if path.startswith("/audiences/"):
                key = unquote(path.removeprefix("/audiences/"))
                audience = web_pages.audience_page(conn, key, configured, before=_int(query.get("before")))
                if audience is None:
                    return self._not_found(start_response, f"No audience or trait {key!r} in the store.")
                seen = self._attention(conn, configured, now)
                return self._render(
                    start_response, "audience.html", title=key, page=audience, now=now, seen=seen
                )
            if path == "/users":
                user_id = query.get("id", "")
                user = web_pages.user_page(conn, user_id) if user_id else None
                return self._render(
                    start_response, "user.html", title="User lookup", page=user, asked=user_id
                )
            if path == "/runs":
                status = query.get("status") or None
                if status is not None and status not in web_pages.RUN_STATUSES:
                    status = None
                runs = web_pages.runs_page(conn, status, _int(query.get("before")))
                return self._render(start_response, "runs.html", title="Runs", page=runs)
        return self._not_found(start_response, "No such page.")

    def _attention(self, conn: Connection, configured: Mapping[str, str], now: datetime) -> Attention:
        if self.attention is not None:
            return self.attention()
        return attention_mod.read(conn, configured, now)

    def _render(
        self, start_response: StartResponse, template: str, status: str = "200 OK", **context: Any
    ) -> Iterable[bytes]:
        body = (
            self.env.get_template(template)
            .render(mode=self.mode, generated=self.clock(), **context)
            .encode("utf-8")
        )
        start_response(
            status,
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(body))),
                *SECURITY_HEADERS,
            ],
        )
        return [body]

    def _not_found(self, start_response: StartResponse, message: str) -> Iterable[bytes]:
        return self._render(start_response, "error.html", "404 Not Found", title="Not found", message=message)

    def _static(self, name: str, start_response: StartResponse) -> Iterable[bytes]:
        if name not in STATIC:
            return self._plain(start_response, "404 Not Found", "not found\n")
        body = resources.files("audiencesync.web").joinpath("static", name).read_bytes()
        start_response(
            "200 OK",
            [("Content-Type", STATIC[name]), ("Content-Length", str(len(body))), *SECURITY_HEADERS[:-1],
             ("Cache-Control", "max-age=300")],
        )  # fmt: skip
        return [body]

    @staticmethod
    def _plain(
        start_response: StartResponse, status: str, text: str, headers: list[tuple[str, str]] | None = None
    ) -> Iterable[bytes]:
        body = text.encode()
        start_response(
            status, [("Content-Type", "text/plain; charset=utf-8"), *SECURITY_HEADERS, *(headers or [])]
        )
        return [body]


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None
