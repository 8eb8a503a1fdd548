"""The soak test's world: the churning SQL source, the daemon's config and process, the store lock,
and the daemon's own surfaces (/healthz, /metrics, its RSS).

``bench/soak.py`` puts them together on a schedule.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

TOKEN = "soak-token-5f1e0c"
TRACEBACK = "Traceback (most recent call last)"
# What Python prints between an exception and the one it caused (or that came while handling it).
_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


def audience_key(index: int) -> str:
    return f"soak_{chr(ord('a') + index)}"


class Source:
    """A SQLite source: ``memberships(user_id, audience)``, churned in place.

    WAL, so that the daemon's reads never wait on a churn's write (nor fail on it).
    """

    def __init__(self, path: Path, users: int, audiences: int, seed: int) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.users = [f"u{n:06d}" for n in range(users)]
        self.audiences = [audience_key(i) for i in range(audiences)]
        self.random = random.Random(seed)
        self.moved = 0  # memberships moved by churn(), in all
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE memberships (user_id TEXT NOT NULL, audience TEXT NOT NULL)")
            conn.execute("CREATE UNIQUE INDEX memberships_key ON memberships (audience, user_id)")
            rows = [(u, a) for a in self.audiences for u in self.users if self.random.random() < 0.5]
            conn.executemany("INSERT INTO memberships VALUES (?, ?)", rows)

    def query(self, key: str) -> str:
        return f"SELECT user_id FROM memberships WHERE audience = '{key}'"

    def members(self) -> dict[str, set[str]]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            rows = conn.execute("SELECT audience, user_id FROM memberships").fetchall()
        members: dict[str, set[str]] = {key: set() for key in self.audiences}
        for key, user in rows:
            members[key].add(user)
        return members

    def churn(self, share: float) -> int:
        """Move ``share`` of each audience's memberships: as many members leave as others enter."""
        members = self.members()
        moved = 0
        with contextlib.closing(sqlite3.connect(self.path, timeout=60)) as conn, conn:
            for key, current in members.items():
                count = max(1, round(len(current) * share))
                outsiders = [u for u in self.users if u not in current]
                leaving = self.random.sample(sorted(current), min(count, len(current)))
                entering = self.random.sample(outsiders, min(count, len(outsiders)))
                conn.executemany(
                    "DELETE FROM memberships WHERE audience = ? AND user_id = ?", [(key, u) for u in leaving]
                )
                conn.executemany("INSERT INTO memberships VALUES (?, ?)", [(u, key) for u in entering])
                moved += len(leaving)
        self.moved += moved
        return moved

    def mismatches(self, contacts: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool, Any]]:
        """Each (user, audience) where Gleap's boolean is not what the source says: a member must
        be ``true``; anyone else must not be (``false``, or never told: Gleap never had them)."""
        members = self.members()
        wrong = []
        for user in sorted(set(self.users) | set(contacts)):
            held = contacts.get(user, {})
            for key in self.audiences:
                expected = user in members[key]
                if (held.get(key) is True) != expected:
                    wrong.append((user, key, expected, held.get(key)))
        return wrong


@dataclass(frozen=True)
class DaemonConfig:
    """What the generated config sets; the rest is the daemon's defaults."""

    store_url: str
    gleap_url: str
    listen_port: int
    requests_per_minute: int
    interval: str
    jitter: str
    lease_seconds: int
    retry_backoff: str
    retry_backoff_max: str
    shutdown_grace_seconds: int
    timeout_seconds: float


def write_config(path: Path, settings: DaemonConfig, source: Source) -> Path:
    audiences = "".join(
        textwrap.dedent(
            f"""
            [[audiences]]
            name = "{key}"
            source = "src"
            query = "{source.query(key)}"
            """
        )
        for key in source.audiences
    )
    path.write_text(
        textwrap.dedent(
            f"""
            [store]
            url = "{settings.store_url}"

            [gleap]
            base_url = "{settings.gleap_url}"
            requests_per_minute = {settings.requests_per_minute}
            timeout_seconds = {settings.timeout_seconds}

            [sync]
            lease_seconds = {settings.lease_seconds}
            retry_backoff = "{settings.retry_backoff}"
            retry_backoff_max = "{settings.retry_backoff_max}"

            [schedule]
            interval = "{settings.interval}"
            jitter = "{settings.jitter}"
            shutdown_grace_seconds = {settings.shutdown_grace_seconds}

            [server]
            listen = "127.0.0.1:{settings.listen_port}"

            [sources.src]
            url = "{source.url}"
            """
        )
        + audiences
    )
    return path


def daemon_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("AUDIENCESYNC_FAILPOINT", "AUDIENCESYNC_CONFIG")}
    return keep | {"GLEAP_API_TOKEN": TOKEN}


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audiencesync", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=daemon_env(),
    )


class Daemon:
    """``audiencesync run`` as a subprocess, its log (stderr) in a file of its own."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "audiencesync", "--config", str(config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
                env=daemon_env(),
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float | None:
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return None

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, then wait for the exit: (status, seconds); status None if killed past ``timeout``."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            status: int | None = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            status = None
        return status, time.monotonic() - started

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (WARNING|ERROR|CRITICAL) (.*)$")


def problems_logged(logs: list[Path]) -> list[tuple[float, str]]:
    """The daemon's WARNING and ERROR lines: (Unix time, the line from its level on). The log's
    times are the host's local time, as the daemon's logging writes them."""
    found = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match:
                at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(match[2]) / 1000
                found.append((at, f"{match[3]} {match[4]}"))
    return sorted(found)


def tracebacks(log: Path) -> list[str]:
    """Each traceback in a daemon's log, as the log line before it and the exception's last line."""
    lines = log.read_text(errors="replace").splitlines()
    found = []
    for n, line in enumerate(lines):
        if TRACEBACK not in line:
            continue
        earlier = next((lines[k] for k in range(n - 1, -1, -1) if lines[k].strip()), "")
        if earlier.startswith(_CHAINED):
            continue  # the cause of the same error, printed with it: one traceback, not two
        before = lines[n - 1] if n and TRACEBACK not in lines[n - 1] else line
        end = n + 1
        while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
            end += 1
        last = lines[end] if end < len(lines) else ""
        found.append(f"{before.strip()[:200]} | {last.strip()[:200]}")
    return found


def healthz(port: int, timeout: float = 5) -> tuple[int | None, str]:
    """/healthz's status and first line; (None, why) when nothing answered."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
            return response.status, response.read().decode().split("\n", 1)[0]
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().split("\n", 1)[0]
    except (OSError, ValueError) as exc:
        return None, f"no answer: {type(exc).__name__}"


_PENDING = re.compile(r"^audiencesync_pending_changes\{[^}]*\} (\S+)$", re.MULTILINE)


def pending(port: int, timeout: float = 5) -> int | None:
    """The pending changes of every audience, as /metrics counts them; None when unread."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return None
    values = _PENDING.findall(text)
    return round(sum(float(v) for v in values)) if values else None


DEADLOCK_DETECTED = "40P01"  # PostgreSQL's SQLSTATE


class StoreLock:
    """The store locked against writes for a while, as a stuck migration or a backup would:
    SQLite, another connection's ``BEGIN EXCLUSIVE`` (readers go on, in WAL); PostgreSQL, a
    transaction holding ``LOCK TABLE ... IN EXCLUSIVE MODE`` on every table of the store (reads go
    on, writes wait: the lease's heartbeat included)."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url

    def hold(self, seconds: float, acquired: threading.Event) -> None:
        """Take the lock, set ``acquired``, hold it ``seconds``, release it."""
        with self.held():
            acquired.set()
            time.sleep(seconds)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The lock, held for the block (tests/test_store_pool.py holds it until threads wait)."""
        url = sa.make_url(self.store_url)
        if url.get_backend_name() == "sqlite":
            assert url.database
            with contextlib.closing(sqlite3.connect(url.database, timeout=120, isolation_level=None)) as lite:
                lite.execute("BEGIN EXCLUSIVE")
                try:
                    yield
                finally:
                    lite.execute("ROLLBACK")
            return
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                while True:
                    with conn.begin() as transaction:
                        tables = conn.exec_driver_sql(
                            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
                        ).scalars()
                        names = ", ".join(f'public."{t}"' for t in tables)
                        try:
                            conn.exec_driver_sql(f"LOCK TABLE {names} IN EXCLUSIVE MODE")
                        except sa.exc.OperationalError as error:
                            # LOCK TABLE takes the tables one by one: a daemon's transaction that
                            # holds a later one and waits on an earlier one is a deadlock, and
                            # PostgreSQL may cancel either side. A stuck migration would retry;
                            # so does the soak, or its outage would never happen.
                            if getattr(error.orig, "sqlstate", None) != DEADLOCK_DETECTED:
                                raise
                            transaction.rollback()
                            time.sleep(0.05)
                            continue
                        try:
                            yield
                        finally:
                            transaction.rollback()
                        return
        finally:
            engine.dispose()


def reset_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()
