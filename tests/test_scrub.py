"""The Gleap token is scrubbed from alerts as whole occurrences only (issue 21, item 7): a short token
must not mangle every message ("2026-12-06***01:25:56", "H******P 400"), a real one never leaves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime

import pytest

from audiencesync.alerts.alerts import Alerts
from audiencesync.cli import main as cli
from audiencesync.config.alerts import AlertConfig
from audiencesync.config.secret import Secret, scrub
from audiencesync.store import store as store_mod
from tests.alert_receiver import AlertReceiver
from tests.conftest import TOKEN, ConfigFactory

MESSAGE = 'HTTP 400: {"error": "bad request"} at 2026-12-06T01:25:56+00:00 (attempt 10 of 20)'


@pytest.fixture
def receiver() -> Iterator[AlertReceiver]:
    with AlertReceiver() as server:
        yield server


@pytest.mark.parametrize("token", ["T", "0", "H", "P", "06", "_", "a"])
def test_a_short_token_inside_words_numbers_and_timestamps_leaves_them_as_they_are(token: str) -> None:
    assert scrub(MESSAGE, [token]) == MESSAGE


# A token of digits only, joined by ".", ":" or "-" to more digits, is part of a longer number, a
# time or an address: "0" in 0.5 and 127.0.0.1, "12" in 2026-12-06, "00" in +00:00.
NUMBERS = "fraction 0.5 at 2026-12-06T01:25:56+00:00 on 127.0.0.1:9464, version 3.0.1, 12.5% done"


@pytest.mark.parametrize("token", ["0", "00", "12", "2026", "25", "1", "5", "9464", "3"])
def test_a_token_of_digits_inside_a_number_a_time_or_an_address_leaves_it_as_it_is(token: str) -> None:
    assert scrub(NUMBERS, [token]) == NUMBERS


@pytest.mark.parametrize("token", ["T", "0", "12", TOKEN, "tok.en", "abc=", "-x-"])
def test_every_whole_occurrence_of_the_token_is_scrubbed(token: str) -> None:
    text = f'{token} refused; Authorization: Bearer {token}; url ?key={token}&x=1; json ["{token}"] {token}'
    scrubbed = scrub(text, [token])
    assert scrubbed == ('*** refused; Authorization: Bearer ***; url ?key=***&x=1; json ["***"] ***'), (
        scrubbed
    )


def test_a_token_with_non_word_ends_is_scrubbed_even_glued_to_a_word() -> None:
    # Its own "=" or "-" ends the occurrence: no boundary to ask for on that side.
    assert scrub("key abc=1 and x-y-z", ["abc=", "-y-"]) == "key ***1 and x***z"


def test_every_secret_is_scrubbed_and_an_empty_one_is_ignored() -> None:
    assert scrub(f"old {TOKEN} new tok2", ["", TOKEN, "tok2"]) == "old *** new ***"


def alert_to(receiver: AlertReceiver, store: store_mod.Store, token: str) -> dict[str, object]:
    alerts = Alerts([AlertConfig(url=Secret(receiver.url()))], store.engine, secrets=[token])
    alerts.gleap(f"HTTP 400 from Gleap: invalid token {token}")
    alerts.close(30)
    (post,) = receiver.posts()
    body: dict[str, object] = json.loads(post.raw)
    return body


@pytest.mark.parametrize("token", ["T", "0", "00"])  # "00": every time's +00:00
def test_an_alert_with_a_short_token_keeps_its_timestamps_and_status_codes(
    receiver: AlertReceiver, store: store_mod.Store, token: str
) -> None:
    body = alert_to(receiver, store, token)
    datetime.fromisoformat(str(body["time"]))  # "2026-12-06T01:25:56+00:00", not "...06***01..."
    datetime.fromisoformat(str(body["opened_at"]))
    summary = str(body["summary"])
    assert "HTTP 400 from Gleap: invalid token ***" in summary, summary
    assert body["details"] == {"error": "HTTP 400 from Gleap: invalid token ***"}
    assert set(body) >= {"event", "state", "time", "host", "summary"}  # the keys themselves untouched


def test_an_alert_never_holds_a_realistic_token(receiver: AlertReceiver, store: store_mod.Store) -> None:
    body = alert_to(receiver, store, TOKEN)
    assert TOKEN not in json.dumps(body)
    assert "invalid token ***" in str(body["summary"])
    datetime.fromisoformat(str(body["time"]))


def test_alert_test_scrubs_whole_occurrences_of_a_short_token(
    make_config: ConfigFactory, receiver: AlertReceiver
) -> None:
    hook = f'[[alerts]]\nurl = "{receiver.url("/hook")}"\n'
    config = make_config(token="T", extra=hook, create_store=False)
    assert cli.main(["--config", str(config.path), "alert-test"]) == 0
    (post,) = receiver.posts()
    datetime.fromisoformat(post.body["time"])
    assert "***" not in post.body["summary"], post.body["summary"]
