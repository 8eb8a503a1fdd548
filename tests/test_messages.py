"""Messages say the right thing: a full stop before "Fix:", the fix each command really has, a trait
called a trait, and the host named once in alert-test's message."""

from __future__ import annotations

import ast
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest

import audiencesync
from audiencesync.alerts.messages import FIRING, Alert
from audiencesync.cli import main as cli
from audiencesync.errors import ConfigError, MissingTokenError
from tests.alert_receiver import AlertReceiver
from tests.conftest import ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn

PACKAGE = Path(audiencesync.__file__).parent


def literal_texts(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal in the module, adjacent literals joined as Python joins them; an
    f-string's placeholders written as {}. Docstrings are left out: they talk about messages."""
    texts = []
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    for node in ast.walk(tree):
        if id(node) in docstrings:
            continue
        if isinstance(node, ast.JoinedStr):
            parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
            texts.append((node.lineno, "".join(str(p) for p in parts)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append((node.lineno, node.value))
    return texts


def test_every_fix_in_the_source_follows_a_full_stop() -> None:
    """A literal either starts with "Fix:" (what it follows ends in ". ", see the builders) or has
    ". " right before it; errors.with_fix joins the rest, adding the full stop."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in literal_texts(ast.parse(path.read_text(), str(path))):
            start = 0
            while (at := text.find("Fix:", start)) != -1:
                if at > 0 and not text[:at].endswith(". ") and text != " Fix: ":
                    wrong.append(f"{path.relative_to(PACKAGE)}:{line}: {text[max(0, at - 40) : at + 10]!r}")
                start = at + 1
    assert wrong == []


def test_a_fix_is_joined_with_a_full_stop() -> None:
    assert str(ConfigError("is not HOST:PORT", where="[server].listen", fix="write x")) == (
        "[server].listen: is not HOST:PORT. Fix: write x"
    )
    assert str(ConfigError("ends with one.", fix="y")) == "ends with one. Fix: y"
    alert = Alert("held", FIRING, "a", "audience 'a' held", datetime(2026, 1, 1, tzinfo=UTC), "vm", fix="z")
    assert alert.slack_text() == ":rotating_light: audiencesync on vm: audience 'a' held. Fix: z"


def test_config_errors_have_a_full_stop_before_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[store]\nurl = "sqlite:///s.db"\n[server]\nlisten = "nowhere"\n')
    assert cli.main(["--config", str(path), "status"]) == 2
    err = capsys.readouterr().err
    assert "[server].listen: 'nowhere' is not HOST:PORT. Fix: write listen" in err


def test_check_without_a_token_suggests_what_check_can_do(
    make_config: ConfigFactory, source: SourceDB, capsys: pytest.CaptureFixture[str]
) -> None:
    source.set(["u1"])
    config = make_config(token=None)
    assert cli.main(["--config", str(config.path), "check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  gleap token\n      no Gleap API token is set. Fix: export GLEAP_API_TOKEN" in out
    assert "pass --dry-run" not in out  # check has no --dry-run
    assert "`audiencesync sync --dry-run` shows the calls a sync would make without one." in out
    # Nor has run, or forget.
    assert cli.main(["--config", str(config.path), "run"]) == 2
    assert "pass --dry-run" not in capsys.readouterr().err
    assert cli.main(["--config", str(config.path), "forget", "u1", "--in-gleap"]) == 2
    err = capsys.readouterr().err
    assert "pass --dry-run" not in err and "leave out --in-gleap" in err
    assert str(MissingTokenError()).endswith("or pass --dry-run to see the calls without sending them.")


def test_check_after_a_refused_token_says_nothing_was_sent(
    make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    source.set(["u1"])
    config = make_config(gleap.base_url, token="wrong-token-0123")
    assert cli.main(["--config", str(config.path), "check"]) == 1
    out = capsys.readouterr().out
    assert "Gleap answered 401: the API token is wrong or was revoked." in out
    assert "Only the token was checked: nothing was sent." in out
    assert "pending" not in out and "next run" not in out
    assert gleap.identify_calls == []


def test_a_traits_query_error_calls_it_a_trait(
    make_config: ConfigFactory, source: SourceDB, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(
        audiences="""
        [[traits]]
        name = "Lifetime Value"
        source = "main"
        query = "SELECT user_id, amount AS value FROM no_such_table"
        """
    )
    assert cli.main(["--config", str(config.path), "check"]) == 1
    out = capsys.readouterr().out
    assert (
        "FAIL  trait lifetime_value (source main)\n      trait 'lifetime_value' (source 'main'): the query"
        in out
    )
    assert cli.main(["--config", str(config.path), "sync", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "trait 'lifetime_value' (source 'main'): the query failed" in err
    assert "audience 'lifetime_value'" not in out + err


def test_alert_test_names_the_host_once(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    with AlertReceiver() as receiver:
        config = make_config(
            extra=f'[[alerts]]\nurl = "{receiver.url("/slack")}"\nformat = "slack"\n'
            f'[[alerts]]\nurl = "{receiver.url("/json")}"\n',
            create_store=False,
        )
        assert cli.main(["--config", str(config.path), "alert-test"]) == 0, capsys.readouterr().err
        (slack,) = receiver.posts("/slack")
        (plain,) = receiver.posts("/json")
    host = socket.gethostname()
    assert slack.body["text"] == (
        f":information_source: audiencesync on {host}: a test message from `audiencesync alert-test`: "
        "this webhook is set up"
    )
    assert plain.body["host"] == host and host not in plain.body["summary"]


def test_failures_on_a_store_with_no_schema_says_to_upgrade_it(
    make_config: ConfigFactory, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # An empty database (a PostgreSQL one just made, a SQLite file made by hand): no tables yet.
    config = make_config(create_store=False)
    if store_url.startswith("sqlite"):
        Path(store_url.removeprefix("sqlite:///")).touch()
    assert cli.main(["--config", str(config.path), "failures"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no such table" not in err
    assert "schema revision none" in err and "Fix: run `audiencesync db upgrade`" in err
