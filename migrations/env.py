"""Alembic environment. audiencesync runs migrations through ``audiencesync.migrate``,
which hands over an open connection; the ``alembic`` CLI works too, given
``-x url=...`` (see docs/development.md)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from audiencesync.store.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite can't ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("pass the store URL: alembic -x url=sqlite:///audiencesync.db upgrade head")
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()
