"""The one rule for wiping a PostgreSQL database in tests and benchmarks: only a test database.

The suite and the benchmarks (``bench/perf.py``, ``bench/prune_bench.py``) run
``DROP SCHEMA public CASCADE`` on the URL they are given. A URL pasted from production must
not be wiped by mistake.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sqlalchemy.engine import make_url

ENV_ALLOW_ANY = "AUDIENCESYNC_TEST_POSTGRES_ALLOW_ANY_DATABASE"


def refusal(url: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why ``url``'s database must not be wiped, or None when it may be."""
    database = make_url(url).database or ""
    if "test" in database.lower() or environ.get(ENV_ALLOW_ANY) == "1":
        return None
    return (
        f"refusing to wipe the PostgreSQL database {database!r}: the tests drop and recreate its "
        "schema public, and its name does not contain 'test'. Fix: point "
        "AUDIENCESYNC_TEST_POSTGRES_URL (or --postgres-url) at a scratch database whose name "
        f"contains 'test', e.g. .../audiencesync_test; or, if this database really is "
        f"disposable, set {ENV_ALLOW_ANY}=1."
    )
