"""The fault rules: what a test asks the stand-in to get wrong, and what they decide for each
request. Imports only ``wire``."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tests.gleap_standin.wire import RATE_WINDOW_SECONDS, Reply, json_reply, text_reply


@dataclass(frozen=True)
class Faults:
    """What the fault rules decided for one request (``GleapStandIn._faults``)."""

    delay: float | None
    drop: bool
    failure: Reply | None
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
class UserFault:
    status: int
    body: str
    remaining: int | None  # None: never used up


def take(rules: deque[Any]) -> Any:
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


class FaultRules:
    """The stand-in's fault injection (``GleapStandIn`` is one).

    Fault rules are consumed per kind in FIFO order, and only by requests carrying a valid
    token. For one identify the order of evaluation is: set_down (Gleap down: every call
    answered the same status), script_next (which, while it has steps, replaces drop_next,
    fail_next, lose_answer_next, the background faults and the rate limit), drop_next,
    fail_next, fail_every, the background faults' 5xx and 429 (set_background_faults), rate
    limit, body validation (400), fail_user, success (its answer lost by lose_answer_next, else
    by the background faults' share of lost answers). delay_next is orthogonal: it postpones
    whatever the answer turns out to be (a drop included), as ``latency_seconds`` does for
    every identify.
    """

    def __init__(self, rate_limit_per_minute: int | None) -> None:
        # One lock for the stand-in's whole state, the rules here and what routes.py keeps.
        self._lock = threading.Lock()
        self.rate_limit_per_minute = rate_limit_per_minute
        self._background: BackgroundFaults | None = None
        self._rng = random.Random()
        self._down: Reply | None = None  # set_down(): every call answered this
        self._bad_event_users: set[str] = set()
        self._track_fail_rules: deque[list[Any]] = deque()  # only track calls consume these
        self._track_lose_rules: deque[list[Any]] = deque()
        self._auth_fail_rules: deque[list[Any]] = deque()  # only GET /admin/auth consumes these
        self._fail_rules: deque[list[Any]] = deque()
        self._delay_rules: deque[list[Any]] = deque()
        self._drop_rules: deque[list[Any]] = deque()
        self._lose_rules: deque[list[Any]] = deque()
        self._user_faults: dict[str, deque[UserFault]] = {}
        self._script: deque[int | str] = deque()  # script_next(): one step per identify or DELETE
        self._every: tuple[int, Reply] | None = None  # fail_every(): (n, the failure), until cleared
        self._every_seen = 0  # requests counted by fail_every()
        self._cookie: str | None = None  # set_cookie(): a Set-Cookie header on every answer
        self._window: deque[float] = deque()
        # Set while stop() runs: a delayed or held request gives up and answers nothing.
        self._stopping = threading.Event()
        # hold(): identify requests wait here, unanswered, until release().
        self._gate = threading.Event()
        self._gate.set()
        self._held = 0
        self._let_through = 0
        self._held_changed = threading.Condition(self._lock)

    def fail_next(self, count: int, status: int, *, retry_after: str | None = None, body: str = "") -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self._lock:
            self._fail_rules.append([count, text_reply(status, body, headers)])

    def fail_every(self, n: int, status: int, *, body: str = "") -> None:
        """From now until clear_faults(), every ``n``-th identify, track or DELETE request (after
        the other failure rules) is answered ``status``: a Gleap failing a share of its calls."""
        with self._lock:
            self._every, self._every_seen = (n, text_reply(status, body)), 0

    def fail_user(self, user_id: str, status: int, *, body: str = "", times: int | None = None) -> None:
        with self._lock:
            self._user_faults.setdefault(user_id, deque()).append(UserFault(status, body, times))

    def fail_track_next(self, count: int, status: int, *, body: str = "") -> None:
        """The next ``count`` track calls are answered ``status`` (0: the connection is dropped)."""
        with self._lock:
            self._track_fail_rules.append([count, text_reply(status, body) if status else Reply(0)])

    def fail_auth_next(self, count: int, status: int, *, body: str = "") -> None:
        """The next ``count`` token checks (GET /admin/auth, a valid token) are answered ``status``."""
        with self._lock:
            self._auth_fail_rules.append([count, text_reply(status, body)])

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
            self._down = None if status is None else json_reply(status, {"message": "Service unavailable"})

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

    # -- what the rules decide for one request (called from handler threads) -----------------------

    def _set_cookie(self) -> str | None:
        with self._lock:
            return self._cookie

    def _scripted(self) -> tuple[bool, Reply | None, bool, int]:
        """The next script step, under the lock: (drop, failure, lose, success status)."""
        step = self._script.popleft()
        if step == "lose":
            return False, None, True, 200
        assert isinstance(step, int), step
        if step == 0:
            return True, None, False, 200
        if 200 <= step < 300:
            return False, None, False, step
        return False, text_reply(step, ""), False, 200

    def _faults(self, fail: tuple[deque[Any], ...], lose: tuple[deque[Any], ...]) -> Faults:
        """This request's faults, taken under the lock in the order every route applies them:
        a script step, or drop, then a failure (the first of ``fail`` that has one), then the
        rate limit, then a lost answer (the first of ``lose`` that has one)."""
        with self._lock:
            delay: float | None = take(self._delay_rules)
            if self._down is not None:
                return Faults(delay, False, self._down, False, 200, {}, False)
            if self._script:
                drop, failure, lost, ok = self._scripted()
                return Faults(delay, drop, failure, lost, ok, {}, False)
            drop = take(self._drop_rules) is not None
            failure = None if drop else next((f for f in map(take, fail) if f is not None), None)
            if not drop and failure is None and self._every is not None:
                self._every_seen += 1
                if self._every_seen % self._every[0] == 0:
                    failure = self._every[1]
            background = self._background
            if background is not None and not drop and failure is None:
                failure = self._background_failure(background)
            limit_headers, limited = ({}, False) if drop or failure else self._admit()
            lost = not (drop or failure or limited) and (
                any(take(rules) is not None for rules in lose)
                or (background is not None and self._rng.random() < background.lost)
            )
            return Faults(delay, drop, failure, lost, 200, limit_headers, limited)

    def _background_failure(self, background: BackgroundFaults) -> Reply | None:
        """A drawn 5xx or 429, or None (under the lock)."""
        roll = self._rng.random()
        if roll < background.server_error:
            return text_reply(self._rng.choice(background.statuses), "")
        if roll < background.server_error + background.rate_limited:
            return json_reply(429, {"message": "Too many requests"}, {"Retry-After": background.retry_after})
        return None

    def _early(self, faults: Faults, latency: float = 0.0) -> Reply | None:
        """The answer a fault gives before the request is looked at, or None to go on."""
        delay = (faults.delay or 0.0) + latency
        if delay and self._stopping.wait(delay):
            return Reply(0)  # stopped mid-request: a dead server answers nothing
        if faults.drop:
            return Reply(0)
        if faults.failure is not None:
            return faults.failure
        if faults.limited:
            headers = {"Retry-After": "1", **faults.limit_headers}
            return json_reply(429, {"message": "Too many requests"}, headers)
        return None

    def _user_fault(self, user_id: str) -> UserFault | None:
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
