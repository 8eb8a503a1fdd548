"""Create demo_source.db, the source database that config.example.toml reads.

    python examples/make_demo_source.py [PATH]

It holds an ``orders`` table of 2,000 users with orders spread over the last
90 days (dates relative to today, so the 30-day audience is never empty), and
a ``users`` table of their contact details (name, email, plan, language,
company, sign-up time), which the example's "High Value Users" audience sends
as contact fields.
Deterministic: the same day gives the same data.
"""

from __future__ import annotations

import random
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "demo_source.db"


FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Linus")
LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman")
COMPANIES = ("Analytical Engines", "Cobol Works", "Bletchley Labs", "Semaphore GmbH", None)
PLANS = ("free", "starter", "pro", "enterprise")
LANGS = ("en", "de", "fr", "es")


def build(path: Path, users: int = 2000) -> int:
    rng = random.Random(42)
    today = datetime.now(UTC).date()
    rows = []
    people = []
    for user in range(1, users + 1):
        user_id = f"user-{user:05d}"
        for _ in range(rng.randint(0, 4)):
            day = today - timedelta(days=rng.randint(0, 90))
            rows.append((user_id, day.isoformat(), round(rng.uniform(5, 400), 2)))
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        # Fixed sign-up times (not relative to today): the fields don't change from one day to the next.
        signed_up = datetime(2024, 1, 1, 9, 0, tzinfo=UTC) + timedelta(minutes=rng.randint(0, 500_000))
        people.append(
            (
                user_id,
                first,
                last,
                f"{first}.{last}{user}@example.com".lower(),
                rng.choice(PLANS),
                rng.choice(LANGS),
                rng.choice(COMPANIES),
                signed_up.strftime("%Y-%m-%d %H:%M:%S"),
                rng.randint(1, 50),
            )
        )
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(tmp) as conn:
        conn.execute("CREATE TABLE orders (user_id TEXT, completed_at TEXT, amount REAL)")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?)", rows)
        conn.execute(
            "CREATE TABLE users (user_id TEXT PRIMARY KEY, first_name TEXT, last_name TEXT, email TEXT, "
            "plan TEXT, lang TEXT, company TEXT, signed_up_at TEXT, seats INTEGER)"
        )
        conn.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", people)
    conn.close()
    tmp.replace(path)  # atomically, so a reader never sees a half-built file
    return len(rows)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_PATH
    count = build(target)
    print(f"wrote {count} orders and their users to {target}")
