"""Posting alerts to webhooks without ever holding up a sync.

Each webhook has its own thread and bounded queue: a webhook that hangs or
fails delays only its own messages. A failed post (no answer, 429 or 5xx) is
retried with backoff (tenacity), then dropped with a warning; another 4xx is
dropped at once. Nothing here logs a header value or the webhook's full URL.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from audiencesync import __version__, tls
from audiencesync.config.alerts import AlertConfig

log = logging.getLogger(__name__)

QUEUE_SIZE = 100  # messages waiting per webhook; more are dropped (and logged)
TIMEOUT_SECONDS = 5.0
ATTEMPTS = 4
BACKOFF = (1.0, 30.0)  # the first retry's wait, and the longest


class _Retryable(Exception):
    pass


class _Refused(Exception):
    pass


@dataclass(frozen=True)
class Answer:
    """What one post got: the HTTP status, or why there was none."""

    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def __str__(self) -> str:
        if self.status is None:
            return f"no answer: {self.error}"
        reason = httpx.codes.get_reason_phrase(self.status)
        return f"HTTP {self.status}{f' {reason}' if reason else ''}"


class WebhookSender:
    """One webhook's queue and the thread that empties it."""

    def __init__(
        self,
        webhook: AlertConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = TIMEOUT_SECONDS,
        attempts: int = ATTEMPTS,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        self.webhook = webhook
        self.transport = transport
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._queue: queue.Queue[bytes | None] = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._abandon = threading.Event()  # past the exit grace: stop retrying, send nothing more
        self._in_flight = False

    def put(self, body: bytes) -> None:
        """Queue one message; never blocks."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"alerts {self.webhook.shown_url}", daemon=True
                )
                self._thread.start()
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            log.warning("alert to %s dropped: %d are already waiting", self.webhook.shown_url, QUEUE_SIZE)

    def close(self, deadline: float) -> int:
        """Send what is queued until ``deadline`` (time.monotonic), then give up; the number dropped."""
        with self._lock:
            thread = self._thread
        if thread is None:
            return 0
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        thread.join(max(0.0, deadline - time.monotonic()))
        if not thread.is_alive():
            return 0
        self._abandon.set()
        waiting = sum(1 for body in list(self._queue.queue) if body is not None)
        return waiting + self._in_flight

    def retire(self) -> None:
        """Stop after what is queued (a reload replaced this webhook); never blocks."""
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            self._abandon.set()

    def send(self, body: bytes) -> Answer:
        """One post, no retry: what the webhook answered (alert-test's question)."""
        try:
            with self._client() as client:
                response = client.post(self.webhook.url.reveal(), content=body)
            return Answer(response.status_code)
        except httpx.HTTPError as exc:
            return Answer(None, self._describe(exc))

    def _run(self) -> None:
        with self._client() as client:
            while True:
                body = self._queue.get()
                if body is None or self._abandon.is_set():
                    return
                self._in_flight = True
                try:
                    self._deliver(client, body)
                except Exception as exc:
                    if not self._abandon.is_set():  # else close() counted it
                        log.warning("alert to %s dropped: %s", self.webhook.shown_url, self._describe(exc))
                finally:
                    self._in_flight = False

    def _deliver(self, client: httpx.Client, body: bytes) -> None:
        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential_jitter(
                multiplier=self.backoff[0], max=self.backoff[1], jitter=self.backoff[0]
            ),
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                if self._abandon.is_set():
                    raise _Refused("the process is exiting")
                self._post(client, body, attempt.retry_state.attempt_number)

    def _post(self, client: httpx.Client, body: bytes, number: int) -> None:
        try:
            response = client.post(self.webhook.url.reveal(), content=body)
        except httpx.HTTPError as exc:
            raise _Retryable(f"attempt {number} of {self.attempts}: {self._describe(exc)}") from None
        answer = Answer(response.status_code)
        if answer.ok:
            return
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise _Retryable(f"attempt {number} of {self.attempts}: {answer}")
        raise _Refused(f"{answer} (not retried: fix the webhook's url, headers or format)")

    def _sleep(self, seconds: float) -> None:
        self._abandon.wait(seconds)

    def _client(self) -> httpx.Client:
        headers = {"Content-Type": "application/json", "User-Agent": f"audiencesync/{__version__}"}
        headers |= {name: value.reveal() for name, value in self.webhook.headers}
        return httpx.Client(
            headers=headers,
            timeout=self.timeout,
            transport=self.transport,
            follow_redirects=False,
            verify=tls.client_context(),  # the process's one (tls.py)
        )

    def _describe(self, exc: BaseException) -> str:
        """An error in one line, with the webhook's URL (a secret, for Slack) masked."""
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return text.replace(self.webhook.url.reveal(), self.webhook.shown_url)
