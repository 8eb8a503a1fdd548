"""Fresh migrated stores for the tests, copied from a template instead of migrated each time.

Running every Alembic migration takes about 0.3 s on SQLite and 1 s on PostgreSQL, and most
store tests start from a fresh migrated store. So each test process migrates one template per
store, once, and copies it: SQLite's file, or PostgreSQL's database (``CREATE DATABASE ...
TEMPLATE``). A copy is taken only where the store is still exactly what ``store_url`` handed out
(no SQLite file yet; a PostgreSQL database with nothing in it and nobody connected); otherwise the
store is migrated as before, so a test that wrote into its store first gets what it always got.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from audiencesync.store import store as store_mod

# Anything a test could have left in a PostgreSQL database: other schemas, or objects in public.
_LEFT_IN_DATABASE = """
SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'public') <> 1
    OR EXISTS (SELECT FROM pg_namespace
               WHERE nspname NOT IN ('public', 'information_schema') AND left(nspname, 3) <> 'pg_')
    OR EXISTS (SELECT FROM pg_class WHERE relnamespace = 'public'::regnamespace)
    OR EXISTS (SELECT FROM pg_proc WHERE pronamespace = 'public'::regnamespace)
    OR EXISTS (SELECT FROM pg_type WHERE typnamespace = 'public'::regnamespace)
    OR EXISTS (SELECT FROM pg_extension WHERE extname <> 'plpgsql')
"""


def admin_engine(url: str) -> sa.Engine:
    """An autocommit engine on the server's maintenance database (``postgres``): databases are
    made and dropped from there, never from the one being dropped or one that may not exist yet."""
    return sa.create_engine(
        sa.make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )


def recreate_database(url: str) -> None:
    """Drop ``url``'s database (a leftover of a crashed run; sessions still in it are ended) and
    create it empty."""
    name = sa.make_url(url).database
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()


def drop_database(url: str) -> None:
    name = sa.make_url(url).database
    engine = admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()


def _migrate(url: str) -> None:
    """What an admin's ``audiencesync db upgrade`` does, the slow way."""
    engine = store_mod.create_engine(url, create=True)
    try:
        store_mod.upgrade(engine)
    finally:
        engine.dispose()


class Templates:
    """One test process's migrated templates, made on first use and removed by ``close``."""

    def __init__(self) -> None:
        self._sqlite: Path | None = None
        # server (URL without database) -> the template's URL, None where none can be made
        self._postgres: dict[str, str | None] = {}

    def migrate(self, url: str) -> None:
        """Leave ``url``'s store exactly as a fresh one migrated to head."""
        copied = self._copy_sqlite(url) if url.startswith("sqlite") else self._clone_postgres(url)
        if not copied:
            _migrate(url)

    def _copy_sqlite(self, url: str) -> bool:
        parsed = sa.make_url(url)
        if not parsed.database or parsed.database.startswith(("file:", ":memory:")) or parsed.query:
            return False
        path = Path(parsed.database)
        if not path.parent.is_dir() or any(
            Path(f"{path}{suffix}").exists() for suffix in ("", "-wal", "-shm", "-journal")
        ):
            return False
        if self._sqlite is None:
            template = Path(tempfile.mkdtemp(prefix="audiencesync-template-")) / "store.db"
            _migrate(f"sqlite:///{template}")  # the last connection closed: no -wal left beside it
            self._sqlite = template
        # The mode too: 0600, as store_mod.create_engine(create=True) makes a new store's file.
        shutil.copy2(self._sqlite, path)
        return True

    def _clone_postgres(self, url: str) -> bool:
        parsed = sa.make_url(url)
        name = parsed.database
        if not name:
            return False
        engine = sa.create_engine(url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                if conn.exec_driver_sql(_LEFT_IN_DATABASE).scalar():
                    return False
        finally:
            engine.dispose()
        template = self._postgres_template(url)
        if template is None:
            return False
        admin = admin_engine(url)
        try:
            with admin.connect() as conn:
                try:
                    conn.exec_driver_sql(f'DROP DATABASE "{name}"')
                except sa.exc.DBAPIError:
                    return False  # someone is still connected (a test's engine): migrate it in place
                try:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
                except sa.exc.DBAPIError:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
                    return False
        finally:
            admin.dispose()
        return True

    def _postgres_template(self, url: str) -> str | None:
        """The template's name, or None where it can't be made (no CREATEDB right, no access to the
        maintenance database): the stores are then migrated in place, as before."""
        parsed = sa.make_url(url)
        server = parsed.set(database="").render_as_string(hide_password=False)
        if server not in self._postgres:
            # Named after the first database it serves (a test database, tests/postgres_guard.py),
            # so each xdist worker has its own; a leftover of a crashed run is replaced.
            template = parsed.set(database=f"{parsed.database}_template")
            rendered = template.render_as_string(hide_password=False)
            try:
                recreate_database(rendered)
            except sa.exc.DBAPIError:
                self._postgres[server] = None
                return None
            _migrate(rendered)
            self._postgres[server] = rendered
        made = self._postgres[server]
        return None if made is None else str(sa.make_url(made).database)

    def close(self) -> None:
        if self._sqlite is not None:
            shutil.rmtree(self._sqlite.parent, ignore_errors=True)
            self._sqlite = None
        for template in self._postgres.values():
            if template is not None:
                drop_database(template)
        self._postgres.clear()


def fingerprint(url: str) -> dict[str, list[str]]:
    """Every row of every table of the store at ``url``, in a canonical order."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        metadata = sa.MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            return {
                name: sorted(repr(tuple(row)) for row in conn.execute(sa.select(table)))
                for name, table in sorted(metadata.tables.items())
            }
    finally:
        engine.dispose()
