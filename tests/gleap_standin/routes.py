"""What each request is answered, and what it leaves behind: the contacts, the events, the
request log and the counts. Called from the HTTP handler's threads (``server``). Imports
``wire`` and ``faults``."""

from __future__ import annotations

import copy
import hmac
import socket
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import unquote, urlsplit

from tests.gleap_standin.faults import FaultRules, take
from tests.gleap_standin.wire import (
    AUTH_PATH,
    CONTACT_FIELDS,
    CONTACTS_PATH,
    IDENTIFY_PATH,
    JSON,
    MAX_CUSTOM_KEYS,
    ROUTE_KINDS,
    TRACK_PATH,
    RecordedRequest,
    Reply,
    json_reply,
    ok_reply,
    text_reply,
    track_problem,
)


class Routes(FaultRules):
    """Gleap's routes on top of the fault rules: ``GET /admin/auth``, ``POST /admin/identify``,
    ``DELETE /admin/contacts/<id>`` and ``POST /admin/track``."""

    def __init__(
        self, token: str, *, rate_limit_per_minute: int | None, latency_seconds: float, keep_log: bool
    ) -> None:
        super().__init__(rate_limit_per_minute)
        self._token = token
        self.latency_seconds = latency_seconds
        # False: no request log and no identify or track bodies kept (a long soak run would grow
        # them without bound); the counts (answer_counts, last_ack_at) and the contacts are kept.
        self._keep_log = keep_log
        self._answer_counts: Counter[tuple[str, int]] = Counter()
        self._last_ack_at: float | None = None  # time.monotonic() of the last 2xx identify answered
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
        self._contacts: dict[str, dict[str, Any]] = {}
        self._connections: set[socket.socket] = set()
        self._connections_opened = 0  # ever, since start(): how many the clients' pools opened

    def _connection_opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            self._connections_opened += 1

    def _connection_closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _arrived(self, path: str) -> int:
        with self._arrived_changed:
            seq = self._next_seq
            self._next_seq += 1
            self._arrivals[urlsplit(path).path] += 1
            self._arrived_changed.notify_all()
            return seq

    def _record(self, seq: int, request: RecordedRequest) -> None:
        # Recorded before the answer goes out, so a test that has its response can assert on the log.
        route = urlsplit(request.path).path
        kind = ROUTE_KINDS.get(route, "delete" if route.startswith(CONTACTS_PATH) else "other")
        with self._lock:
            self._answer_counts[(kind, request.status)] += 1
            if kind == "identify" and 200 <= request.status < 300:
                self._last_ack_at = time.monotonic()
            if seq >= self._log_epoch and self._keep_log:
                self._requests[seq] = request

    def _answer(self, method: str, path: str, headers: dict[str, str], body: Any) -> Reply:
        with self._lock:
            token = self._token
        offered = headers.get("api-token")
        if offered is None or not hmac.compare_digest(offered.encode(), token.encode()):
            return json_reply(401, {"message": "Unauthorized"})
        route = urlsplit(path).path
        if route == AUTH_PATH:
            if method != "GET":
                return json_reply(405, {"message": "Method not allowed"}, {"Allow": "GET"})
            with self._lock:
                failure = self._down or take(self._auth_fail_rules)
            return failure if failure is not None else json_reply(200, {"ok": True})
        if route == IDENTIFY_PATH:
            if method != "POST":
                return json_reply(405, {"message": "Method not allowed"}, {"Allow": "POST"})
            return self._identify(headers, body)
        if route.startswith(CONTACTS_PATH) and len(route) > len(CONTACTS_PATH):
            if method != "DELETE":
                return json_reply(405, {"message": "Method not allowed"}, {"Allow": "DELETE"})
            return self._delete_contact(unquote(route[len(CONTACTS_PATH) :]))
        if route == TRACK_PATH:
            if method != "POST":
                return json_reply(405, {"message": "Method not allowed"}, {"Allow": "POST"})
            return self._track(headers, body)
        return json_reply(404, {"message": f"Not found: {route}"})

    def _delete_contact(self, user_id: str) -> Reply:
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
            return text_reply(fault.status, fault.body, limit_headers)
        self._contacts_changed()
        if lose:
            return Reply(0)  # deleted, but the answer never reaches the client
        if not known:
            return json_reply(404, {"message": "Contact not found"}, limit_headers)
        return ok_reply(ok, {"userId": user_id, "deleted": True}, limit_headers)

    def _identify(self, headers: dict[str, str], body: Any) -> Reply:
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
                    return Reply(0)
        faults = self._faults((self._fail_rules,), (self._lose_rules,))
        early = self._early(faults, self.latency_seconds)
        if early is not None:
            return early
        ok, lose, limit_headers = faults.ok, faults.lost, faults.limit_headers

        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != JSON:
            return json_reply(400, {"message": "Content-Type must be application/json"}, limit_headers)
        if not isinstance(body, dict):
            return json_reply(400, {"message": "Body must be a JSON object"}, limit_headers)
        user_id = body.get("userId")
        if not isinstance(user_id, str) or not user_id:
            return json_reply(400, {"message": "userId must be a non-empty string"}, limit_headers)
        custom = {k: v for k, v in body.items() if k not in CONTACT_FIELDS}
        if len(custom) > MAX_CUSTOM_KEYS:
            message = f"At most {MAX_CUSTOM_KEYS} custom data keys per call, got {len(custom)}"
            return json_reply(400, {"message": message}, limit_headers)
        # null: what a trait sends for a user who lost their value (as Engage does). Gleap
        # documents only strings, numbers and booleans; the stand-in takes null and keeps it,
        # the README tells users to set the trait's `missing` to be sure.
        if not all(v is None or isinstance(v, str | int | float | bool) for v in custom.values()):
            return json_reply(400, {"message": "Custom data values must be strings, numbers or booleans"})

        with self._lock:
            fault = self._user_fault(user_id)
            if fault is None:
                self._contacts.setdefault(user_id, {}).update(copy.deepcopy(body))
                if self._keep_log:
                    self._identify_calls.append(copy.deepcopy(body))
        if fault is not None:
            return text_reply(fault.status, fault.body, limit_headers)
        self._contacts_changed()
        if lose:
            return Reply(0)  # applied, but the answer never reaches the client
        return ok_reply(ok, {"userId": user_id, "ok": True}, limit_headers)

    def _track(self, headers: dict[str, str], body: Any) -> Reply:
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
        if content_type != JSON:
            return json_reply(400, {"message": "Content-Type must be application/json"})
        problem = track_problem(body)
        if problem is not None:
            return json_reply(400, {"message": problem})
        with self._lock:
            bad = sorted({e["userId"] for e in body["events"]} & self._bad_event_users)
            if not bad and self._keep_log:
                self._track_calls.append(copy.deepcopy(body["events"]))
        if bad:
            return json_reply(400, {"message": f"Invalid event for user {bad[0]}"})
        self._contacts_changed()
        if lose:
            return Reply(0)
        return ok_reply(ok, {"ok": True}, limit_headers)

    def _contacts_changed(self) -> None:
        """Hook for subclasses; runs after each successful identify, before the answer is sent."""
