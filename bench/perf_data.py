"""The benchmark's data: the source tables, their churn, the stores, and the config files.

Each function here runs in a phase process of its own (bench/perf_phases.py), never in the
parent: a million shuffled ids would otherwise raise the parent's peak RSS, which Linux carries
over into every child it starts (the CLI's measured peak would be the parent's).

A source is a table ``members (pos INTEGER PRIMARY KEY, user_id TEXT)``: in a SQLite file (the
streamed path) and, for PostgreSQL, also in schema ``bench_src`` of the store's own database (the
same-database source, where pushdown applies). ``pos`` gives churn a cheap key, and the ids go in
shuffled, as a real query returns them: sorted ids would flatter the staging inserts.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TOKEN = "bench-token"
KEY = "bench"
PG_SCHEMA = "bench_src"


def user_id(i: int) -> str:
    return f"user-{i:09d}"  # fixed width: sorted as text is sorted by number, up to 1G members


def plain_pg(url: str) -> str:
    """The SQLAlchemy URL as libpq takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def write_sqlite_source(path: Path, members: int, seed: int = 1) -> None:
    """``members`` shuffled ids in ``members``; the next table names are free for other phases."""
    order = list(range(1, members + 1))
    random.Random(seed).shuffle(order)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE IF EXISTS members")
        conn.execute("CREATE TABLE members (pos INTEGER PRIMARY KEY, user_id TEXT NOT NULL)")
        conn.executemany(
            "INSERT INTO members VALUES (?, ?)", ((p, user_id(i)) for p, i in enumerate(order, 1))
        )


def write_id_table(path: Path, table: str, ids: Iterator[str]) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (user_id TEXT NOT NULL)")
        conn.executemany(f"INSERT INTO {table} VALUES (?)", ((i,) for i in ids))


def copy_source_to_pg(sqlite_path: Path, pg_url: str) -> None:
    """The same rows, in the same order, into ``bench_src.members`` of the store's database."""
    import psycopg

    with (
        contextlib.closing(sqlite3.connect(sqlite_path)) as src,
        psycopg.connect(plain_pg(pg_url), autocommit=True) as pg,
    ):
        pg.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")
        pg.execute(f"CREATE SCHEMA {PG_SCHEMA}")
        pg.execute(f"CREATE TABLE {PG_SCHEMA}.members (pos INTEGER PRIMARY KEY, user_id TEXT NOT NULL)")
        with pg.cursor() as cur, cur.copy(f"COPY {PG_SCHEMA}.members (pos, user_id) FROM STDIN") as copy:
            for row in src.execute("SELECT pos, user_id FROM members ORDER BY pos"):
                copy.write_row(row)
        pg.execute(f"ANALYZE {PG_SCHEMA}.members")


def drop_pg_source(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(plain_pg(pg_url), autocommit=True) as pg:
        pg.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")


def churn(sqlite_path: Path, pg_url: str | None, members: int, half: int, turn: int = 0) -> None:
    """``half`` members leave and as many new ones enter, alike in every copy of the source.

    Each ``turn`` takes other members out (of the first ``members``) and brings other new ones in.
    """
    leaving = random.Random(2).sample(range(1, members + 1), half * (turn + 1))[half * turn :]
    first = members + 1 + half * turn
    entering = [(p, user_id(p)) for p in range(first, first + half)]
    with contextlib.closing(sqlite3.connect(sqlite_path)) as conn, conn:
        conn.executemany("DELETE FROM members WHERE pos = ?", ((p,) for p in leaving))
        conn.executemany("INSERT INTO members VALUES (?, ?)", entering)
    if pg_url is not None:
        import psycopg

        with psycopg.connect(plain_pg(pg_url)) as pg, pg.cursor() as cur:
            cur.execute(f"DELETE FROM {PG_SCHEMA}.members WHERE pos = ANY(%s)", (leaving,))
            cur.executemany(f"INSERT INTO {PG_SCHEMA}.members VALUES (%s, %s)", entering)


def fresh_store(url: str) -> str:
    """An empty store at the head schema (its database's version is returned); on PostgreSQL
    schema public is dropped first."""
    import sqlalchemy as sa

    from audiencesync.store import store as store_mod

    if url.startswith("postgresql"):
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        engine.dispose()
    else:
        path = url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)
    engine = store_mod.create_engine(url, create=True)
    store_mod.upgrade(engine)
    with engine.connect() as conn:
        version = conn.exec_driver_sql(
            "SHOW server_version" if url.startswith("postgresql") else "SELECT sqlite_version()"
        ).scalar_one()
    engine.dispose()
    return str(version)


def ack_all(url: str) -> int:
    """Mark every pending membership acknowledged, as a sync that delivered everything leaves it."""
    import sqlalchemy as sa

    from audiencesync.store.schema import memberships

    engine = sa.create_engine(url)
    m = memberships.c
    with engine.begin() as conn:
        done = conn.execute(
            sa.update(memberships)
            .where(m.pending == sa.true())
            .values(acked=m.desired, acked_value=m.value, acked_at=m.changed_at)
        ).rowcount
    if engine.dialect.name == "postgresql":
        # Vacuumed here, as the days of a real delivery would have let autovacuum do: the
        # update leaves a dead version of every row (10M at 10M members), and autovacuum
        # would otherwise go through them during the measured phases that follow.
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                "VACUUM (ANALYZE) memberships"
            )
    engine.dispose()
    return done


def write_config(
    path: Path,
    store_url: str,
    source_url: str,
    gleap_url: str,
    audiences: dict[str, str],
    gleap: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """A config file (not Config(...) directly, so the bench survives new config fields).

    ``audiences``: key -> query, all on one source. ``gleap``: extra [gleap] settings; by default
    the limiter is set far above what the stand-in serves, so that it is not what is measured.
    ``source``: extra settings of the source.
    """
    settings = {"requests_per_minute": 10_000_000} | (gleap or {})
    lines = "\n".join(f"{k} = {v!r}" for k, v in settings.items())
    source_lines = "".join(f"{k} = {v!r}\n" for k, v in (source or {}).items())
    blocks = "\n".join(
        f'[[audiences]]\nname = "{key}"\nsource = "src"\nquery = "{query}"\n'
        for key, query in audiences.items()
    )
    path.write_text(
        textwrap.dedent(
            f"""\
            [store]
            url = "{store_url}"

            [gleap]
            base_url = "{gleap_url}"
            api_token = "{TOKEN}"
            """
        )
        + lines
        + f'\n\n[sources.src]\nurl = "{source_url}"\n{source_lines}\n'
        + blocks
    )
    path.chmod(0o600)  # it holds a token
    return path
