"""Gleap's admin API: identify and track calls and contact deletions, with rate limiting, concurrency
and retries."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from audiencesync import __version__, tls
from audiencesync.config.loading import GleapConfig, Secret
from audiencesync.errors import GleapAuthError, GleapError
from audiencesync.gleap.api import (
    AUTH_PATH,
    IDENTIFY_PATH,
    MAX_CUSTOM_KEYS,
    TRACK_PATH,
    delete_path,
    identify_body,
    identify_params,
)
from audiencesync.gleap.breaker import CircuitBreaker
from audiencesync.gleap.http import AdminClient, parse_retry_after, retryable
from audiencesync.gleap.ratelimit import TokenBucket

log = logging.getLogger(__name__)


# A 429 says "later", not "wrong": it doesn't use up a call's retries, but a
# call can't wait on the limiter for ever either.
MAX_RATE_LIMITED = 30


@dataclass(frozen=True)
class Try:
    """One request of a call, as the call log keeps it."""

    at: datetime  # when it went out
    status: int  # 0: no answer
    outcome: str  # acknowledged | rejected | unknown | not_sent
    error: str | None = None
    elapsed_ms: int | None = None


@dataclass(frozen=True)
class Answer:
    status: int  # 0 when no answer came (timeout, connection dropped)
    error: str | None = None
    retries: int = 0
    rate_limited: int = 0
    # Some attempt reached Gleap without a verdict (a timeout after sending, a
    # dropped answer, a 5xx): Gleap may have applied it.
    maybe_applied: bool = False
    tries: tuple[Try, ...] = ()
    # The circuit breaker opened while this call waited for the rate limiter, before any
    # request of it went out: nothing was sent, and nothing is to be recorded.
    halted: bool = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def permanent(self) -> bool:
        """Gleap refused this call's content; sending it again unchanged won't help."""
        return not self.ok and self.status != 0 and not retryable(self.status)


class _Budget:
    """Counts one call's failed attempts; tells tenacity when to stop."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries
        self.failures = 0
        self.rate_limited = 0

    def exhausted(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.status == 429:
            self.rate_limited += 1
            return self.rate_limited > MAX_RATE_LIMITED
        self.failures += 1
        return self.failures > self.max_retries


class _Halted(Exception):
    """The breaker opened while a request waited on the limiter: it does not go out."""


class _Transient(Exception):
    def __init__(
        self, status: int, detail: str, retry_after: float | None = None, *, sent: bool = True
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.retry_after = retry_after
        self.sent = sent  # False only when the request certainly never left (connect failed)

    @property
    def outcome(self) -> str:
        """What the call log says of this request."""
        if not self.sent:
            return "not_sent"
        return "rate_limited" if self.status == 429 else "unknown"


def _sent(tries: list[Try]) -> bool:
    """Sent at least once: some attempt may have reached Gleap (everything but a failed connect)."""
    return any(t.outcome in ("unknown", "rate_limited") for t in tries)


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


class GleapClient:
    """One long-lived HTTP client per cycle, shared by all delivery tasks."""

    def __init__(
        self,
        config: GleapConfig,
        token: Secret,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: TokenBucket | None = None,
        breaker: CircuitBreaker | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        before_send: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.before_send = before_send  # raises when no request may go out (the lease's check)
        self._now = now
        self._token = token
        self._transport = transport
        self.limiter = limiter or TokenBucket(config.requests_per_minute)
        self.breaker = breaker or CircuitBreaker(config.breaker_failures)
        self._params = identify_params(config)
        self._backoff = wait_exponential_jitter(
            multiplier=backoff_initial, max=backoff_max, jitter=backoff_initial
        )
        self._client: httpx.AsyncClient | None = None
        self._identify_url = self._track_url = httpx.URL(config.base_url)  # set on entering

    async def __aenter__(self) -> GleapClient:
        # The pool is as large as the concurrency, so no task ever waits on it (PoolTimeout).
        limits = httpx.Limits(
            max_connections=self.config.max_concurrency, max_keepalive_connections=self.config.max_concurrency
        )
        self._client = AdminClient(
            base_url=self.config.base_url,
            headers={"Api-Token": self._token.reveal(), "User-Agent": f"audiencesync/{__version__}"},
            timeout=httpx.Timeout(self.config.timeout_seconds),
            limits=limits,
            transport=self._transport,
            verify=tls.client_context(),  # the process's one: no new context and CA bundle per pass (tls.py)
        )
        # Absolute, with the query string: httpx then neither joins it to base_url nor merges
        # the params again on every call (two URL parses a call, measured).
        root = str(self._client.base_url).rstrip("/")
        self._identify_url = httpx.URL(root + IDENTIFY_PATH, params=self._params)
        self._track_url = httpx.URL(root + TRACK_PATH)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient):
            if exc.status == 429:
                return 0.0  # the shared limiter was paused for Retry-After; waiting here too would double it
            if exc.retry_after is not None:
                return exc.retry_after
        return float(self._backoff(state))

    async def identify(self, user_id: str, attributes: dict[str, Any]) -> Answer:
        """Send one identify call; retries transient failures, raises GleapAuthError on 401/403.

        Stops retrying as soon as the circuit breaker opens: Gleap is down for
        everyone, and the caller stops the delivery pass.
        """
        if len(attributes) > MAX_CUSTOM_KEYS:
            raise ValueError(f"{len(attributes)} custom keys in one call; Gleap takes {MAX_CUSTOM_KEYS}")
        body = identify_body(user_id, attributes)
        return await self._call(user_id, lambda: self._send("POST", self._identify_url, json=body))

    async def track(self, batch: list[dict[str, Any]]) -> Answer:
        """Send one batch of events (``track_event``s) with the identify calls' retries, limiter
        and breaker; raises GleapAuthError on 401/403."""
        if not batch:
            raise ValueError("a track call needs at least one event")
        body = {"events": batch}
        # The breaker counts failures per user; a batch counts as its first event's user.
        return await self._call(
            f"track:{batch[0]['userId']}", lambda: self._send("POST", self._track_url, json=body)
        )

    async def delete_contact(self, user_id: str) -> Answer:
        """Delete one contact (``[gleap] delete_path``), with identify's retries, limiter and breaker.

        A 404 comes back as it is: the caller takes it for "already gone".
        """
        return await self._call(user_id, lambda: self._send("DELETE", delete_path(self.config, user_id)))

    async def _call(self, user_id: str, send: Callable[[], Awaitable[Answer]]) -> Answer:
        """One call to Gleap, its transient failures retried (tenacity) through the shared limiter.

        The first attempt is made outside tenacity: nearly every call succeeds at once, and
        building a retry loop per call was a tenth of the client's CPU per call (measured).
        A first attempt that fails is replayed into tenacity as its attempt 1, so that the
        stop, wait and sleep rules see the same history as if tenacity had made it.
        """
        tries: list[Try] = []
        try:
            answer = await self._attempt(user_id, send, tries)
        except _Halted:
            return Answer(0, "not sent: Gleap is failing for everyone (circuit breaker open)", halted=True)
        except _Transient as exc:
            return await self._retry(user_id, send, tries, exc)
        # ``retries`` as the retry loop counts them: none, since nothing failed.
        return Answer(answer.status, answer.error, tries=(tries[0],))

    async def _attempt(self, user_id: str, send: Callable[[], Awaitable[Answer]], tries: list[Try]) -> Answer:
        """One request through the breaker and the limiter, noted in ``tries`` and told to the breaker."""
        # Before the limiter: a request waiting for a half-open breaker's verdict takes no token.
        if not await self.breaker.admit():
            raise _Halted()
        told = False
        try:
            await self.limiter.acquire()
            # The wait can be long (a 429's pause, a slowed rate): a breaker that opened meanwhile
            # stops this request too, not only those that start after it.
            if self.breaker.is_open:
                raise _Halted()
            if self.before_send is not None:
                self.before_send()  # after the limiter's wait, which may be long
            # Timed from when the request may go out, not from the wait for the limiter.
            at, started = self._now(), time.monotonic()
            try:
                answer = await send()
            except _Transient as exc:
                tries.append(Try(at, exc.status, exc.outcome, str(exc), _ms(started)))
                if exc.status != 429:
                    told = True
                    self.breaker.failure(user_id, str(exc))
                raise
            except GleapAuthError as exc:
                tries.append(Try(at, exc.status, "rejected", f"HTTP {exc.status}", _ms(started)))
                raise
            outcome = "acknowledged" if answer.ok else "rejected"
            tries.append(Try(at, answer.status, outcome, answer.error, _ms(started)))
            told = True
            self.breaker.success(user_id)
            return answer
        finally:
            if not told:
                # No verdict on Gleap's health (a 429, a refused token, never sent, cancelled):
                # a half-open breaker's trial goes to another request.
                self.breaker.void()

    async def _retry(
        self, user_id: str, send: Callable[[], Awaitable[Answer]], tries: list[Try], first: _Transient
    ) -> Answer:
        """The attempts after a failed first one, with tenacity's stop, wait and sleep rules."""
        budget = _Budget(self.config.max_retries)

        def stop(state: RetryCallState) -> bool:
            # The budget first: the failed attempt counts even when the breaker stops the call
            # (short-circuited, a call's first failure left retries at -1, which /metrics refused).
            exhausted = budget.exhausted(state)
            return self.breaker.is_open or exhausted

        retrying = AsyncRetrying(
            stop=stop,
            wait=self._wait,
            sleep=self.breaker.sleep,
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        )
        replay: _Transient | None = first
        last = first
        try:
            async for attempt in retrying:
                with attempt:
                    if replay is not None:
                        exc, replay = replay, None
                        raise exc  # attempt 1, already made (and noted) by ``_call``
                    try:
                        answer = await self._attempt(user_id, send, tries)
                    except _Transient as exc:
                        last = exc
                        raise
        except _Transient as exc:
            answer = Answer(
                exc.status, f"gave up after {budget.failures + budget.rate_limited} attempts: {exc}"
            )
        except _Halted:
            # The next attempt never went out: the call ends on the last answer it had.
            attempts = budget.failures + budget.rate_limited
            answer = Answer(last.status, f"gave up after {attempts} attempts (circuit breaker open): {last}")
        except GleapAuthError as exc:
            # A verdict on the token, not on this call: an earlier attempt may still have been applied.
            raise GleapAuthError(exc.status, maybe_applied=_sent(tries), tries=tuple(tries)) from None
        retries = budget.failures + budget.rate_limited - (0 if answer.ok or answer.permanent else 1)
        sent = _sent(tries)
        return Answer(
            answer.status,
            answer.error,
            retries=retries,
            rate_limited=budget.rate_limited,
            maybe_applied=sent and not answer.ok,
            tries=tuple(tries),
        )

    async def check_token(self) -> None:
        """Ask Gleap whether the token is valid; raises GleapAuthError or GleapError if not."""
        assert self._client is not None, "use GleapClient as an async context manager"
        try:
            response = await self._client.get(AUTH_PATH)
        except httpx.TransportError as exc:
            raise GleapError(
                f"cannot reach Gleap at {self.config.base_url} ({type(exc).__name__}). "
                "Fix: check [gleap] base_url and the network"
            ) from None
        if response.status_code in (401, 403):
            raise GleapAuthError(response.status_code, outcome=GleapAuthError.CHECKED)
        if not 200 <= response.status_code < 300:
            raise GleapError(
                f"Gleap answered {response.status_code} to {AUTH_PATH}: {response.text.strip()[:200]}"
            )

    async def _send(self, method: str, path: str | httpx.URL, **request: Any) -> Answer:
        assert self._client is not None, "use GleapClient as an async context manager"
        try:
            response = await self._client.request(method, path, **request)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Refused or never connected: the request did not leave this host.
            raise _Transient(0, f"cannot connect ({type(exc).__name__})", sent=False) from None
        except httpx.TimeoutException:
            raise _Transient(0, f"no answer within {self.config.timeout_seconds:g} s") from None
        except httpx.TransportError as exc:
            raise _Transient(0, f"connection failed ({type(exc).__name__})") from None
        status = response.status_code
        if 200 <= status < 300:
            self.limiter.recover()
            return Answer(status)
        if status in (401, 403):
            raise GleapAuthError(status)
        text = response.text.strip()[:500]
        if retryable(status):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if status == 429:
                # Everyone shares the project's limit: hold back every task, not just this one.
                self.limiter.slow_down(retry_after if retry_after is not None else 1.0)
            raise _Transient(status, f"HTTP {status} {text}".strip(), retry_after)
        return Answer(status, f"HTTP {status}: {text}" if text else f"HTTP {status}")
