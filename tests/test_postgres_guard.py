"""The suite wipes only a PostgreSQL database that is clearly a test database."""

from __future__ import annotations

import pytest

from tests import postgres_guard
from tests.conftest import _reset_postgres


@pytest.mark.parametrize(
    ("url", "environ", "refused"),
    [
        ("postgresql+psycopg://postgres@127.0.0.1/test_h1", {}, False),
        ("postgresql+psycopg://postgres@127.0.0.1/audiencesync_TEST", {}, False),
        ("postgresql+psycopg://postgres@127.0.0.1/audiencesync", {}, True),
        ("postgresql+psycopg://postgres@127.0.0.1/", {}, True),
        ("postgresql+psycopg://postgres@127.0.0.1/audiencesync", {postgres_guard.ENV_ALLOW_ANY: "1"}, False),
        ("postgresql+psycopg://postgres@127.0.0.1/audiencesync", {postgres_guard.ENV_ALLOW_ANY: "yes"}, True),
    ],
)
def test_only_a_test_database_may_be_wiped(url: str, environ: dict[str, str], refused: bool) -> None:
    reason = postgres_guard.refusal(url, environ)
    assert (reason is not None) == refused
    if reason:
        assert "does not contain 'test'" in reason and postgres_guard.ENV_ALLOW_ANY in reason


def test_reset_refuses_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(postgres_guard.ENV_ALLOW_ANY, raising=False)
    # Port 1: were the guard skipped, this would fail as "unreachable" instead.
    with pytest.raises(pytest.fail.Exception, match="refusing to wipe the PostgreSQL database 'production'"):
        _reset_postgres("postgresql+psycopg://postgres@127.0.0.1:1/production")
