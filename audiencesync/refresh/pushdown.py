"""Pushdown: an audience's query run inside the store, when its source is the store's own database.

A common set-up keeps the store in the application's PostgreSQL database, and the
audiences query that same database. The ids then need not cross the wire twice
(out to audiencesync, back into the stage): ``INSERT INTO stage SELECT ...`` runs
the query where the data is, and the anti-join follows in the same database.

It applies only where the result is exactly the streamed read's (``sources``):
a PostgreSQL store, a source URL naming the same server and database, and a
query that returns ``user_id`` alone as text, an integer or a UUID, whose
canonical form (``user_ids.canonical_user_id``) is its text. Any other query
(contact fields, traits, numeric or float ids) is streamed as before. The checks
of the streamed read are made in SQL: blank ids are skipped and counted, ids
longer than 255 characters or holding control characters are skipped and
counted with samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection
from sqlalchemy.engine import make_url

# PostgreSQL type OIDs whose text form is the id's canonical form: text, varchar,
# name, int2, int4, int8, uuid. char(n) is not among them (the driver keeps its
# padding, the cast to text drops it), nor numeric and floats ("10.0" is "10").
TEXT_LIKE_TYPES = frozenset({25, 1043, 19, 21, 23, 20, 2950})

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


# Every character ``str.strip()`` takes away (``str.isspace()``; tests/test_sources.py checks
# the list against it), as PostgreSQL's regular expression escapes. Not ``[[:space:]]``: in the
# stage's "C" collation PostgreSQL knows only ASCII's whitespace, so an id of U+00A0 or U+3000
# alone was blank to the streamed read and an id to this one.
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_SPACE = "[" + "".join(f"\\u{ord(c):04x}" for c in WHITESPACE) + "]"

# As sources' checks, in PostgreSQL's regular expressions (PostgreSQL text never holds \x00).
_BLANK = f"user_id ~ '^{_SPACE}*$'"
_CONTROL = "user_id ~ '[\\x01-\\x1f\\x7f]'"
# What every blank or bad id has and a plain id has not: empty, too long, or a character
# outside printable ASCII (whitespace and control characters are). One class scan: the two
# patterns above then run only on the ids that have it, not on all of them (at 1M plain ids,
# 0.26 s against 0.53 s for the two counts).
_SUSPECT = "(user_id = '' OR {too_long} OR user_id ~ '[^!-~]')"


def applies(source_url: str, conn: Connection) -> bool:
    """Whether ``source_url`` names the database ``conn`` (the store) is connected to."""
    if conn.dialect.name != "postgresql":
        return False
    source, store = make_url(source_url), conn.engine.url
    if source.get_backend_name() != "postgresql":
        return False
    return (
        _host(source.host) == _host(store.host)
        and (source.port or 5432) == (store.port or 5432)
        and source.database == store.database
    )


def _host(host: str | None) -> str | None:
    if host is None:
        return None
    host = host.lower()
    return "loopback" if host in _LOOPBACK else host


def ids_only(conn: Connection, query: str) -> bool:
    """Whether the query returns ``user_id`` alone, of a type whose text is its canonical id.

    Asked of the planner with LIMIT 0, in a savepoint: a query that fails here is
    left to the streamed read, which reports the failure as a source's.
    """
    try:
        with conn.begin_nested():
            result = conn.exec_driver_sql(f"SELECT * FROM ({query}) AS audience_query LIMIT 0")
            columns = result.cursor.description if result.cursor is not None else None
            result.close()
    except Exception:
        return False
    if not columns or len(columns) != 1 or columns[0][0] != "user_id":
        return False
    return columns[0][1] in TEXT_LIKE_TYPES


@dataclass
class Loaded:
    """What ``load_stage`` read: rows, blank ids, bad ids (too long or with control
    characters), all skipped, and the first few bad ones (id, too long or else control
    characters) as samples."""

    rows: int = 0
    blank: int = 0
    bad: int = 0
    samples: list[tuple[str, bool]] = field(default_factory=list)


def load_stage(conn: Connection, stage: str, query: str, *, max_length: int, samples: int) -> Loaded:
    """Run the audience's query into ``stage``, then skip what the streamed read would.

    In a savepoint, so that a failure (the caller turns it into a ``SourceError``)
    leaves the caller's transaction usable and the stage as it was.
    """
    too_long = f"length(user_id) > {int(max_length)}"
    loaded = Loaded()
    with conn.begin_nested():
        # A NULL id is a blank one: kept as '' until counted, since the stage's ids are NOT NULL.
        loaded.rows = conn.exec_driver_sql(
            f"INSERT INTO {stage} (user_id) "
            f"SELECT coalesce(user_id::text, '') FROM ({query}) AS audience_query"
        ).rowcount
        loaded.blank, loaded.bad = conn.exec_driver_sql(
            f"SELECT count(*) FILTER (WHERE {_BLANK}), "
            f"count(*) FILTER (WHERE NOT {_BLANK} AND ({too_long} OR {_CONTROL})) FROM {stage} "
            f"WHERE {_SUSPECT.format(too_long=too_long)}"
        ).one()
        if not loaded.blank + loaded.bad:
            return loaded
        # Samples only: a broken source may give millions of bad ids, never held in memory.
        loaded.samples = [
            (user_id, long)
            for user_id, long in conn.exec_driver_sql(
                f"SELECT user_id, {too_long} FROM {stage} "
                f"WHERE NOT {_BLANK} AND ({too_long} OR {_CONTROL}) LIMIT {int(samples)}"
            )
        ]
        conn.exec_driver_sql(f"DELETE FROM {stage} WHERE {_BLANK} OR {too_long} OR {_CONTROL}")
    return loaded
