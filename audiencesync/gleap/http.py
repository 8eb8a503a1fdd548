"""Gleap's HTTP rules apart from the client's flow: which statuses are retried, how long a
``Retry-After`` asks to wait, and an httpx client with no cookie jar."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime
from typing import Any

import httpx

MAX_RETRY_AFTER = 300.0


def retryable(status: int) -> bool:
    """408, 429 and every 5xx but 501 may succeed when tried again (GLEAP_API.md).

    501 Not Implemented means a wrong URL, not a passing fault; every other 4xx
    is a verdict on the call itself.
    """
    return status in (408, 429) or (500 <= status < 600 and status != 501)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class Cookieless(httpx.Cookies):
    """No cookie jar: Gleap's admin API authenticates by token, so a cookie it set would only be
    carried along. httpx otherwise parses every answer for Set-Cookie through urllib's cookie
    machinery: 7% of the client's CPU per call (measured)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class AdminClient(httpx.AsyncClient):
    """httpx's client, without cookies (``Cookieless``)."""

    _no_cookies = Cookieless()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("the Gleap client keeps no cookies")
