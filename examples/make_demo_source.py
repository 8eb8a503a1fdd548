"""Create demo_source.db, the source database that config.example.toml reads.

    python examples/make_demo_source.py [PATH]

It holds an ``orders`` table of 2,000 users with orders spread over the last
90 days (dates relative to today, so the 30-day audience is never empty).
Deterministic: the same day gives the same data.
"""

from __future__ import annotations

import random
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "demo_source.db"


def build(path: Path, users: int = 2000) -> int:
    rng = random.Random(42)
    today = datetime.now(UTC).date()
    rows = []
    for user in range(1, users + 1):
        for _ in range(rng.randint(0, 4)):
            day = today - timedelta(days=rng.randint(0, 90))
            rows.append((f"user-{user:05d}", day.isoformat(), round(rng.uniform(5, 400), 2)))
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(tmp) as conn:
        conn.execute("CREATE TABLE orders (user_id TEXT, completed_at TEXT, amount REAL)")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", rows)
    conn.close()
    tmp.replace(path)  # atomically, so a reader never sees a half-built file
    return len(rows)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH
    count = build(target)
    print(f"wrote {count} orders to {target}")
