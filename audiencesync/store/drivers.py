"""Making a SQLAlchemy engine, with a missing driver as an error that says what to install.

SQLAlchemy imports a URL's DBAPI module (``pymysql`` for ``mysql+pymysql://``)
when the engine is made; a module that is not installed would surface as a
bare ``ModuleNotFoundError``. Here it becomes a ``DriverMissingError`` naming
the URL's scheme (never the URL: it may hold a password), the module and the
pip command; a driver that is there but fails to load, with its own message.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import NoSuchModuleError

from audiencesync.errors import DriverMissingError

POSTGRES_EXTRA = "pip install 'audiencesync[postgres]'"

# A DBAPI module's pip package, where the two names differ; any other is installed by its own name.
PACKAGES = {
    "psycopg": None,  # audiencesync's [postgres] extra: the version it is tested with
    "psycopg2": "psycopg2-binary",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "cx_Oracle": "cx-Oracle",
}


def install_command(module: str) -> str:
    """The command that installs ``module`` into audiencesync's environment."""
    package = PACKAGES.get(module, module)
    return POSTGRES_EXTRA if package is None else f"pip install {package}"


def create_engine(url: str, *, where: str | None = None, **kwargs: Any) -> Engine:
    """``sqlalchemy.create_engine``, raising ``DriverMissingError`` (about ``where``) when the URL's
    dialect or its driver is not installed."""
    parsed = make_url(url)
    scheme = parsed.drivername
    try:
        return sa.create_engine(url, **kwargs)
    except NoSuchModuleError:
        raise DriverMissingError(
            scheme=scheme,
            module=None,
            install="check the URL's scheme (e.g. sqlite, postgresql+psycopg, mysql+pymysql); "
            "a dialect from another package needs that package installed",
            where=where,
        ) from None
    except ImportError as exc:
        module = (exc.name or "").split(".")[0]
        if module:  # the module the driver needs is not there
            raise DriverMissingError(
                scheme=scheme, module=module, install=install_command(module), where=where
            ) from None
        # It is there, but failed to load (psycopg without its binary and no libpq: "no pq
        # wrapper available"): its own message, and the install that brings what it needs.
        driver = parsed.get_driver_name()
        raise DriverMissingError(
            scheme=scheme, module=driver, install=install_command(driver), where=where, broken=str(exc)
        ) from None


def release_idle_sqlite_memory(engine: Engine) -> None:
    """Hand back each SQLite connection's page cache as the pool takes it back.

    An idle pooled connection keeps its page cache (up to ``cache_size``, 2 MB) until its next
    use, and that use throws the cache away first whenever another connection wrote since: for
    the store, nearly always; for a source read once per refresh, always (its application wrote
    in between). So the caches only grew with the databases, for hours (issue 22): the store's
    pooled connections', and a SQLite source's, by ~0.7 MB in 12 minutes at the soak's pace
    (heaptrack). ``PRAGMA shrink_memory`` frees them at checkin; an engine of another backend is
    left alone.
    """
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_connection: Any, _record: Any) -> None:
        if dbapi_connection is None:  # invalidated: closed, nothing to hand back
            return
        # A connection that can't shrink is no worse for it: its next use says what is wrong.
        with contextlib.suppress(sqlite3.Error):
            dbapi_connection.execute("PRAGMA shrink_memory")
