"""The memory probe's world (bench/memory_probe.py): the daemon's config at the soak's settings,
a free port for its web server, and a SQLite source whose memberships churn."""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import sqlite3
from pathlib import Path

from bench.memory_standin import TOKEN


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(
    path: Path, store_url: str, source: Path, base_url: str, args: argparse.Namespace, port: int
) -> None:
    audiences = "".join(
        f"""
[[audiences]]
name = "Segment {s.upper()}"
source = "main"
query = "SELECT user_id, email FROM members WHERE segment = '{s}'"
"""
        for s in "abc"[: args.audiences]
    )
    path.write_text(
        f"""
[store]
url = "{store_url}"

[gleap]
base_url = "{base_url}"
api_token = "{TOKEN}"
requests_per_minute = {args.rpm}
max_concurrency = 4
timeout_seconds = 5
max_retries = 3
events = true

[sync]
retry_backoff = "1s"
retry_backoff_max = "10s"
lease_seconds = {args.lease_seconds}

[schedule]
interval = "{args.refresh}s"
jitter = "1s"
shutdown_grace_seconds = 5

[server]
listen = "127.0.0.1:{port}"

[sources.main]
url = "sqlite:///{source}"
{audiences}"""
    )
    path.chmod(0o600)


class Source:
    """A SQLite source whose memberships move: ``churn`` of them every call of ``move``."""

    def __init__(self, path: Path, users: int, audiences: int) -> None:
        self.path = path
        self.users = users
        self.segments = "abc"[:audiences]
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("CREATE TABLE members (user_id TEXT, email TEXT, segment TEXT)")
            conn.executemany(
                "INSERT INTO members VALUES (?, ?, ?)",
                [
                    (f"u{i}", f"u{i}@example.com", s)
                    for s in self.segments
                    for i in range(users)
                    if random.random() < 0.5
                ],
            )

    def move(self, share: float) -> None:
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            for s in self.segments:
                for _ in range(max(1, int(self.users * share))):
                    user = f"u{random.randrange(self.users)}"
                    gone = conn.execute(
                        "DELETE FROM members WHERE segment = ? AND user_id = ?", (s, user)
                    ).rowcount
                    if not gone:
                        conn.execute("INSERT INTO members VALUES (?, ?, ?)", (user, f"{user}@example.com", s))
