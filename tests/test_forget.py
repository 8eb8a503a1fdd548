"""`audiencesync forget` (issue 11 item 4): users' rows out of the store, and out of Gleap with --in-gleap."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from audiencesync.cli import main as cli
from audiencesync.config.loading import Config
from audiencesync.config.secret import Secret
from audiencesync.errors import ConfigError
from audiencesync.gleap.client import GleapClient
from audiencesync.lifecycle.forget import NOT_PER_USER, PER_USER_TABLES, Forgetter, table_names
from audiencesync.lifecycle.forget_requests import ForgetDesk, ForgetQueue
from audiencesync.store import store as store_mod
from audiencesync.store.schema import metadata
from tests.conftest import SQLITE_ONLY, TOKEN, ConfigFactory, SourceDB
from tests.gleap_standin import GleapStandIn
from tests.test_daemon import SCHEDULE, SYNC, Daemon, daemons, members_true, wait_for
from tests.test_daemon_hardening import query
from tests.test_sync import cycle

__all__ = ["daemons"]  # the fixture, re-used

TWO_AUDIENCES = """
    [[audiences]]
    name = "Segment A"
    source = "main"
    query = "SELECT user_id, segment AS team FROM members WHERE segment = 'a'"

    [[audiences]]
    name = "Segment B"
    source = "main"
    query = "SELECT user_id FROM members WHERE segment = 'b'"
"""


def rows_of(url: str, user_ids: list[str]) -> dict[str, int]:
    """Rows per per-user table that belong to these users."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            counts = {}
            for name in table_names():
                if name == "call_values":
                    sql = (
                        "SELECT count(*) FROM call_values v JOIN calls c ON c.id = v.call_id "
                        "WHERE c.user_id IN :u"
                    )
                else:
                    sql = f"SELECT count(*) FROM {name} WHERE user_id IN :u"
                query = sa.text(sql).bindparams(sa.bindparam("u", expanding=True))
                counts[name] = conn.execute(query, {"u": user_ids}).scalar_one()
            return counts
    finally:
        engine.dispose()


def run(config: Config, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(["--config", str(config.path), *args])
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return status, out, err


def counts_of(out: str) -> dict[str, int]:
    return {row["table"]: row["deleted"] for row in json.loads(out)}


@pytest.fixture
def synced(make_config: ConfigFactory, source: SourceDB, gleap: GleapStandIn) -> Iterator[Config]:
    """Two audiences with events, u1..u4, history: u3 left a, u2 entered b later, u4 rejected once."""
    source.set(["u1", "u2", "u3", "u4"], "a")
    source.set(["u1"], "b")
    config = make_config(
        gleap.base_url, audiences=TWO_AUDIENCES, sync='retry_backoff = "0s"', extra_gleap="events = true"
    )
    cycle(config)
    source.set(["u1", "u2", "u4"], "a")
    source.set(["u1", "u2", "u4"], "b")
    gleap.fail_user("u4", 422, body="unprocessable", times=1)
    cycle(config)
    gleap.clear_faults()
    yield config


# --- the table list -------------------------------------------------------------------------------


def test_every_table_with_a_user_id_is_forgotten_or_named_as_left_alone() -> None:
    """A table added with a user_id column fails here until it is in PER_USER_TABLES (or NOT_PER_USER)."""
    covered = {entry.table.name for entry in PER_USER_TABLES}
    children = {child.name for entry in PER_USER_TABLES for child, _ in entry.children}
    with_user_id = {t.name for t in metadata.tables.values() if "user_id" in t.c}
    assert with_user_id - covered - set(NOT_PER_USER) == set(), "add the table to forget.PER_USER_TABLES"
    assert set(NOT_PER_USER) <= with_user_id  # no stale exemption
    # A table whose rows hang off a user's rows (a foreign key to them) goes with them.
    for table in metadata.tables.values():
        for fk in table.foreign_keys:
            if fk.column.table.name in covered and table.name not in covered | children:
                pytest.fail(f"{table.name} refers to {fk.column.table.name}: list it as a child there")
    assert set(table_names()) == covered | children


# --- the store's rows ------------------------------------------------------------------------------


def test_forget_removes_the_users_rows_in_every_table_and_nobody_elses(
    synced: Config, store_url: str, gleap: GleapStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    before = rows_of(store_url, ["u1", "u3"])
    others = rows_of(store_url, ["u2", "u4"])
    assert all(before.values()), before  # the test forgets rows of every kind
    status, out, err = run(synced, capsys, "forget", "u1", "u3", "nobody", "u1", "--format", "json")
    assert status == 0, err
    assert counts_of(out) == before
    assert rows_of(store_url, ["u1", "u3"]) == dict.fromkeys(table_names(), 0)
    assert rows_of(store_url, ["u2", "u4"]) == others
    assert "3 user id(s): 2 known to the store; 3 forgotten in the store" in err
    assert "comes back on the next cycle as a new member" in err
    assert gleap.deleted_contacts == []  # Gleap is asked only with --in-gleap

    # The audit still answers, for the others and for the forgotten (nothing).
    status, out, _ = run(synced, capsys, "audit", "user", "u2", "--format", "json")
    assert status == 0 and {row["audience"] for row in json.loads(out)} == {"segment_a", "segment_b"}
    status, out, _ = run(synced, capsys, "audit", "members", "segment_a", "--format", "json")
    assert status == 0 and {row["user_id"] for row in json.loads(out)} == {"u2", "u4"}
    status, out, _ = run(synced, capsys, "audit", "user", "u1", "--format", "json")
    assert status == 0 and json.loads(out) == []

    # Again: nothing left, nothing wrong.
    status, out, _ = run(synced, capsys, "forget", "u1", "--format", "csv")
    assert status == 0 and out.splitlines()[1:] == [f"{name},0" for name in table_names()]


def test_a_forgotten_user_still_in_the_source_comes_back_as_a_new_member(
    synced: Config, store_url: str, gleap: GleapStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(synced, capsys, "forget", "u1")
    assert status == 0 and "comes back on the next cycle" in out  # the table's notes go to stdout
    gleap.reset_log()
    report = cycle(synced)
    assert {a.key: a.entered for a in report.audiences} == {"segment_a": 1, "segment_b": 1}
    assert [body for body in gleap.identify_calls if body["userId"] == "u1"] == [
        # a first push, both audiences in one call, with the contact field segment_a gives
        {"userId": "u1", "segment_a": True, "segment_b": True, "team": "a"}
    ]
    rows = rows_of(store_url, ["u1"])
    assert rows["memberships"] == 2 and rows["membership_changes"] == 2  # one entry each, nothing older


def test_ids_from_a_file_and_stdin_are_read_like_source_ids(
    synced: Config,
    store_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listing = tmp_path / "ids.txt"
    listing.write_text("# privacy requests, week 48\n\n  u1  \r\n#u2\nunknown-one\n")
    status, out, err = run(synced, capsys, "forget", "--from-file", str(listing), "--format", "json")
    assert status == 0, err
    assert counts_of(out)["memberships"] == 2  # u1 in both audiences
    assert rows_of(store_url, ["u1"]) == dict.fromkeys(table_names(), 0)
    assert rows_of(store_url, ["u2"])["memberships"] == 2  # a comment is not an id
    assert "2 user id(s): 1 known to the store" in err

    monkeypatch.setattr("sys.stdin", io.StringIO("u3\nu4\n"))
    status, _, err = run(synced, capsys, "forget", "u2", "--from-file", "-", "--format", "json")
    assert status == 0, err
    assert "3 user id(s): 3 known to the store" in err
    assert rows_of(store_url, ["u2", "u3", "u4"]) == dict.fromkeys(table_names(), 0)

    status, _, err = run(synced, capsys, "forget", "--from-file", str(tmp_path / "missing.txt"))
    assert status == 2 and "missing.txt" in err and "Traceback" not in err
    status, _, err = run(synced, capsys, "forget")
    assert status == 2 and "no user to forget" in err


def test_thousands_of_ids_go_in_batches(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    store_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    members = [f"u{i}" for i in range(1500)]
    source.set(members)
    config = make_config(gleap.base_url)
    cycle(config)
    listing = tmp_path / "ids.txt"
    listing.write_text("".join(f"{u}\n" for u in members[:1000]) + "".join(f"gone{i}\n" for i in range(2000)))
    status, out, err = run(
        config, capsys, "forget", "--from-file", str(listing), "--batch-size", "400", "--format", "json"
    )
    assert status == 0, err
    assert counts_of(out)["memberships"] == 1000 and counts_of(out)["calls"] == 1000
    assert "3000 user id(s): 1000 known to the store; 3000 forgotten" in err
    assert rows_of(store_url, members[:1000]) == dict.fromkeys(table_names(), 0)
    assert rows_of(store_url, members[1000:])["memberships"] == 500


# --- in Gleap --------------------------------------------------------------------------------------


def test_in_gleap_deletes_the_contacts_then_the_rows(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    store_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    odd = "a/b c?d"  # one path segment, URL-encoded whole
    source.set(["u1", "u2", odd])
    config = make_config(gleap.base_url)
    cycle(config)
    before = rows_of(store_url, ["u1", odd])
    status, out, err = run(config, capsys, "forget", "u1", odd, "ghost", "--in-gleap", "--format", "json")
    assert status == 0, err
    assert counts_of(out) == before
    assert set(gleap.contacts) == {"u2"}
    assert sorted(gleap.deleted_contacts) == sorted(["u1", odd, "ghost"])  # ghost: 404, already gone
    deletes = [r for r in gleap.requests if r.method == "DELETE"]
    paths = {r.path for r in deletes}
    assert paths == {"/admin/contacts/u1", "/admin/contacts/a%2Fb%20c%3Fd", "/admin/contacts/ghost"}
    assert all(r.headers["api-token"] == TOKEN for r in deletes)
    assert "3 forgotten in Gleap and the store" in err
    assert rows_of(store_url, ["u1", odd]) == dict.fromkeys(table_names(), 0)


def test_no_verdict_keeps_the_rows_and_exits_1_naming_them_and_a_rerun_finishes(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    store_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source.set(["u1", "u2", "u3", "u4"])
    config = make_config(gleap.base_url)  # a generous client timeout: these answers all come
    cycle(config)
    gleap.fail_user("u1", 503, body="unavailable")  # every retry
    gleap.fail_user("u3", 400, body="bad contact")  # a verdict: Gleap did not delete it
    before = rows_of(store_url, ["u1", "u3"])
    status, out, err = run(config, capsys, "forget", "u1", "u2", "u3", "--in-gleap", "--format", "json")
    assert status == 1
    assert "not forgotten: u1 (unknown" in err and "not forgotten: u3 (refused: HTTP 400" in err
    assert "2 user(s) not forgotten (refused, unknown): u1, u3" in err and "Traceback" not in err
    assert rows_of(store_url, ["u1", "u3"]) == before
    assert rows_of(store_url, ["u2"]) == dict.fromkeys(table_names(), 0)
    assert set(gleap.contacts) == {"u1", "u3", "u4"}

    gleap.clear_faults()
    # Only here a short client timeout, under a delay well past it: every try times out.
    generous = config.path.read_text()
    assert "timeout_seconds = 30\n" in generous
    config.path.write_text(generous.replace("timeout_seconds = 30\n", "timeout_seconds = 0.3\n", 1))
    gleap.delay_next(20, 1.0)  # longer than the timeout: no answer, ever
    status, out, err = run(config, capsys, "forget", "u4", "--in-gleap")
    assert status == 1 and "not forgotten: u4 (unknown" in out and "(unknown): u4" in err
    assert rows_of(store_url, ["u4"])["memberships"] == 1
    gleap.clear_faults()
    config.path.write_text(generous)

    status, out, err = run(config, capsys, "forget", "u1", "u3", "u4", "--in-gleap", "--format", "json")
    assert status == 0, err  # u4 was deleted by the timed-out call: 404 now, which is done
    assert rows_of(store_url, ["u1", "u3", "u4"]) == dict.fromkeys(table_names(), 0)
    assert gleap.contacts == {}


def test_a_refused_token_stops_with_the_token_error(
    synced: Config, store_url: str, gleap: GleapStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    before = rows_of(store_url, ["u1", "u2"])
    gleap.set_token("rotated")
    status, out, err = run(synced, capsys, "forget", "u1", "u2", "--in-gleap")
    assert status == 1 and "not forgotten: u1 (not_attempted)" in out
    assert "Gleap answered 401" in err and "GLEAP_API_TOKEN" in err and "Traceback" not in err
    assert rows_of(store_url, ["u1", "u2"]) == before
    assert set(gleap.contacts) >= {"u1", "u2"}


@pytest.mark.parametrize("verdict", [401, 422])
def test_a_deletion_that_may_have_been_applied_is_unknown_whatever_its_retry_is_answered(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    store_url: str,
    capsys: pytest.CaptureFixture[str],
    verdict: int,
) -> None:
    """Gleap deletes the contact but the answer is lost; the retry is refused (a 401 on the token, a
    4xx on the call). The contact may be gone: unknown, not "not attempted" or "refused"."""
    source.set(["u1", "u2"])
    config = make_config(gleap.base_url)
    cycle(config)
    before = rows_of(store_url, ["u1"])
    gleap.script_next("lose", verdict)
    status, out, err = run(config, capsys, "forget", "u1", "--in-gleap")
    assert status == 1 and "not forgotten: u1 (unknown" in out, out + err
    assert "u1" not in gleap.contacts  # it was deleted
    assert rows_of(store_url, ["u1"]) == before  # kept until Gleap says so; a rerun gets its 404
    status, out, err = run(config, capsys, "forget", "u1", "--in-gleap")
    assert status == 0, out + err
    assert rows_of(store_url, ["u1"]) == dict.fromkeys(table_names(), 0)


def test_in_gleap_needs_a_token_and_delete_path_is_checked(
    make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(token=None)
    status, _, err = run(config, capsys, "forget", "u1", "--in-gleap")
    assert status == 2 and "GLEAP_API_TOKEN" in err
    custom = make_config(extra_gleap='delete_path = "/v3/contacts/{user_id}/erase"')
    assert custom.gleap.delete_path == "/v3/contacts/{user_id}/erase"
    for bad in ("admin/contacts/{user_id}", "/admin/contacts", "/admin/{user_id}/{id}", "/x/{user_id}?a=1"):
        with pytest.raises(ConfigError, match=r"\[gleap\]\.delete_path"):
            make_config(extra_gleap=f'delete_path = "{bad}"')


# Only a SQLite store can be missing.
@SQLITE_ONLY
def test_the_store_must_exist(make_config: ConfigFactory, capsys: pytest.CaptureFixture[str]) -> None:
    config = make_config(create_store=False)
    status, _, err = run(config, capsys, "forget", "u1")
    assert status == 3 and "does not exist" in err


# --- beside a running daemon ----------------------------------------------------------------------


def test_forget_while_the_daemon_runs_is_carried_out_between_passes_and_nothing_comes_back(
    make_config: ConfigFactory,
    source: SourceDB,
    gleap: GleapStandIn,
    store_url: str,
    daemons: Callable[[Config], Daemon],
) -> None:
    members = [f"u{i}" for i in range(6)]
    source.set(members)
    config = make_config(gleap.base_url, token=None, sync=SYNC, extra=SCHEDULE)
    daemon = daemons(config)
    wait_for(lambda: members_true(gleap) == set(members), what="the first sync")

    # u1 leaves, and its `false` is held in flight at Gleap while the forget is asked: an answer
    # recorded after the deletion would bring u1's call (and its row) back.
    gleap.hold()
    source.set([m for m in members if m != "u1"])
    assert gleap.wait_held(1), "the daemon did not send u1's change"
    command = ["forget", "u1", "u2", "--in-gleap", "--wait", "60", "--format", "json"]
    asked = subprocess.Popen(
        [sys.executable, "-m", "audiencesync", "--config", str(config.path), *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"GLEAP_API_TOKEN": TOKEN},
    )
    wait_for(lambda: scalar(store_url, "SELECT count(*) FROM forget_users") == 2, what="the queued forget")
    # Refreshes go on meanwhile (and the daemon looks at its requests); but the pass holding u1's
    # call has not ended, so the daemon has not started the forget.
    runs = scalar(store_url, "SELECT count(*) FROM sync_runs")
    wait_for(lambda: scalar(store_url, "SELECT count(*) FROM sync_runs") >= runs + 2, what="two more runs")
    assert scalar(store_url, "SELECT count(*) FROM admin_requests WHERE state = 'pending'") == 1
    assert rows_of(store_url, ["u1"])["membership_changes"] == 2 and gleap.deleted_contacts == []
    gleap.release()
    out, err = asked.communicate(timeout=120)
    assert asked.returncode == 0, out + err
    assert f"pid {daemon.process.pid}" in err and "asked it to forget" in err
    deleted = counts_of(out)
    # u1 entered and left, u2 entered; u1's held call may have timed out and been retried meanwhile.
    assert deleted["membership_changes"] == 3 and deleted["calls"] >= 3
    assert sorted(gleap.deleted_contacts) == ["u1", "u2"] and "u1" not in gleap.contacts

    # Refreshes and passes go on: u1 never re-appears; u2, still in the source, comes back as new.
    runs = scalar(store_url, "SELECT count(*) FROM sync_runs")
    wait_for(lambda: scalar(store_url, "SELECT count(*) FROM sync_runs") >= runs + 2, what="two more runs")
    wait_for(lambda: gleap.contacts.get("u2") == {"userId": "u2", "segment_a": True}, what="u2 back")
    assert rows_of(store_url, ["u1"]) == dict.fromkeys(table_names(), 0)
    assert scalar(store_url, "SELECT count(*) FROM forget_users") == 0  # no id kept after the fact
    assert [tuple(r) for r in query(store_url, "SELECT kind, state FROM admin_requests")] == [
        ("forget+gleap", "done")
    ]
    assert "u1" not in daemon.output and "u2" not in daemon.output  # the log says how many, not who
    assert daemon.stop() == 0
    assert TOKEN not in out + err + daemon.output


def scalar(url: str, sql: str) -> int:
    return int(query(url, sql)[0][0])


def test_the_daemons_desk_settles_each_request_and_keeps_no_id(
    synced: Config, store_url: str, gleap: GleapStandIn
) -> None:
    engine = store_mod.create_engine(store_url)
    queue = ForgetQueue(engine, store_mod.utc_now)
    desk = ForgetDesk(queue, lambda: Forgetter(engine))
    try:
        done = queue.submit(["u1", "nobody"], in_gleap=False, requested_by="test")
        orphan = queue.submit(["u3"], in_gleap=False, requested_by="test")
        assert queue.requests.claim(orphan)  # a holder that died while carrying it out
        assert desk.carry_out_waiting() == 2
        assert rows_of(store_url, ["u1", "u3"]) == dict.fromkeys(table_names(), 0)
        assert scalar(store_url, "SELECT count(*) FROM forget_users") == 0
        first = queue.outcome(done)
        assert first.request.state == "done" and (first.forgotten.asked, first.forgotten.found) == (2, 1)
        assert first.forgotten.counts["memberships"] == 2

        def broken() -> Forgetter:
            raise RuntimeError("a bug")

        failing = queue.submit(["u2"], in_gleap=False, requested_by="test")
        ForgetDesk(queue, broken).carry_out_waiting()  # fails the request, not the delivery loop
        outcome = queue.outcome(failing)
        assert outcome.request.state == "failed" and "a bug" in (outcome.request.result or {})["error"]
        assert [(k.user_id, k.outcome) for k in outcome.forgotten.kept] == [("u2", "not_attempted")]
        assert rows_of(store_url, ["u2"])["memberships"] == 2
        queue.discard(failing)
        assert scalar(store_url, "SELECT count(*) FROM forget_users") == 0
        assert queue.waiting() == []
    finally:
        engine.dispose()


def test_the_daemons_desk_stops_a_forget_at_a_refused_token(
    synced: Config, store_url: str, gleap: GleapStandIn
) -> None:
    engine = store_mod.create_engine(store_url)
    queue = ForgetQueue(engine, store_mod.utc_now)
    wrong = Secret("wrong-token-5678")
    desk = ForgetDesk(queue, lambda: Forgetter(engine, client=lambda: GleapClient(synced.gleap, wrong)))
    try:
        before = rows_of(store_url, ["u1"])
        request_id = queue.submit(["u1"], in_gleap=True, requested_by="test")
        desk.carry_out_waiting()
        outcome = queue.outcome(request_id)
        result = outcome.request.result or {}
        assert outcome.request.state == "failed" and result["token_status"] == 401
        assert "GLEAP_API_TOKEN" in result["error"] and wrong.reveal() not in json.dumps(result)
        assert [(k.user_id, k.outcome) for k in outcome.forgotten.kept] == [("u1", "not_attempted")]
        assert rows_of(store_url, ["u1"]) == before and "u1" in gleap.contacts
    finally:
        engine.dispose()
