"""audience_counts (migration 0008) equals the memberships rows after every kind of write, on both
databases, and `status` reads the same from the counters as from a scan of every row; a run counts
every answer of a batch recorded at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import command

from audiencesync.lifecycle.forget import Forgetter
from audiencesync.lifecycle.renames import Renames
from audiencesync.store import database, events as events_mod, status as status_mod, store as store_mod
from audiencesync.store.schema import audience_counts, audiences, events, sync_runs
from audiencesync.store.store import Audience, Backoff, Outcome, Store
from audiencesync.store.utc_time import UtcDateTime
from audiencesync.values import encode

COUNTERS = ("members", "pending", "parked", "unknown", "fields_pending", "events_pending", "events_parked")


def assert_counters_exact(store: Store) -> dict[str, tuple[int, ...]]:
    """Every audience's counters equal a count of its rows, and status says the same both ways.
    Returns key -> counters, for the scenario's own assertions."""
    scanned = status_mod.scanned_counts()
    with store.engine.connect() as conn:
        kept = {
            r.key: tuple(int(v) for v in r[1:])
            for r in conn.execute(
                sa.select(audiences.c.key, *(audience_counts.c[c] for c in COUNTERS)).join(
                    audience_counts, audience_counts.c.audience_id == audiences.c.id, isouter=True
                )
            )
        }
        rows = conn.execute(
            sa.select(audiences.c.id, audiences.c.key, *(scanned.c[c] for c in COUNTERS[:5])).join(
                scanned, scanned.c.audience_id == audiences.c.id, isouter=True
            )
        )
        events = events_mod.counts_by_audience(conn, scan=True)
        counted = {r.key: (*(int(v or 0) for v in r[2:]), *events.get(r.id, (0, 0))) for r in rows}
        assert kept == counted
        assert status_mod.audience_status(conn) == status_mod.audience_status(conn, scan=True)
    return {key: counts[:5] for key, counts in kept.items()}


def events_of(store: Store, key: str) -> tuple[int, int]:
    with store.engine.connect() as conn:
        counted = assert_counters_exact(store)
        assert key in counted
        audience_id = conn.execute(sa.select(audiences.c.id).where(audiences.c.key == key)).scalar_one()
        kept = events_mod.counts_by_audience(conn, [audience_id]).get(audience_id, (0, 0))
        # Its rows scanned, this audience's alone, say the same (an audience with none has no row).
        scanned = events_mod.counts_by_audience(conn, [audience_id], scan=True)
        assert set(scanned) <= {audience_id} and scanned.get(audience_id, (0, 0)) == kept
        return kept


def refresh(store: Store, audience: Audience, ids: list[str], *, full: bool = False) -> None:
    run_id = store.start_run("cycle", audience, "incremental")
    store.refresh(audience, run_id, iter([ids]), full=full)


def refresh_values(store: Store, audience: Audience, rows: list[tuple[str, str | None]]) -> None:
    run_id = store.start_run("cycle", audience, "incremental")
    store.refresh(audience, run_id, iter([rows]), full=False, valued=True)


def answer(store: Store, audience: Audience, answers: dict[str, int], *, permanent: bool = False) -> None:
    """Gleap answers each user's pending change with this status."""
    run_id = store.start_run("cycle", audience, "delivery")
    rows = store.pending_page(audience.id, [audience.id], "", 1000)
    outcomes = [
        Outcome((c,), answers[c.user_id], None if answers[c.user_id] < 300 else "bad", permanent=permanent)
        for c in rows
        if c.user_id in answers
    ]
    store.record(outcomes, {audience.id: run_id}, max_attempts=2, backoff=Backoff())


def test_every_write_path_keeps_the_counters_exact(store: Store) -> None:
    a = store.ensure_audience("a", "A")
    b = store.ensure_audience("b", "B")
    assert assert_counters_exact(store) == {"a": (0,) * 5, "b": (0,) * 5}
    # apply_stage: an initial refresh inserts; members with contact fields (_apply_values).
    refresh(store, a, [f"u{i}" for i in range(6)])
    refresh_values(store, b, [(f"u{i}", encode({"plan": "pro"})) for i in range(4)])
    assert assert_counters_exact(store) == {"a": (6, 6, 0, 0, 0), "b": (4, 4, 0, 0, 4)}
    # outcomes: acknowledged (upsert), rejected twice to parking, unknown (write-ahead marks first).
    changes = store.pending_page(a.id, [a.id], "", 1000)
    store.mark_unknown(changes)
    assert assert_counters_exact(store)["a"] == (6, 6, 0, 6, 0)
    store.restore_unknown(changes)
    assert assert_counters_exact(store)["a"] == (6, 6, 0, 0, 0)
    answer(store, a, {"u0": 200, "u1": 200, "u2": 200, "u3": 400}, permanent=True)
    answer(store, b, {"u0": 200, "u1": 200, "u2": 0})
    later = Store(store.engine, clock=lambda: store_mod.utc_now() + timedelta(hours=1))
    answer(later, a, {"u3": 400}, permanent=True)
    assert assert_counters_exact(store) == {"a": (6, 2, 1, 0, 0), "b": (4, 2, 0, 1, 2)}
    # Incremental: leavers (never told: settled away; told: owed a false), a joiner, new values.
    refresh(store, a, ["u0", "u3", "u4", "u6"])
    refresh_values(
        store, b, [("u0", encode({"plan": "free"})), ("u1", encode({"plan": "pro"})), ("u9", None)]
    )
    assert assert_counters_exact(store) == {"a": (4, 4, 1, 0, 0), "b": (3, 3, 0, 1, 1)}
    # The leavers' false acknowledged: their rows go (the DELETE after an acknowledgement).
    answer(store, a, {"u1": 200, "u2": 200})
    answer(store, b, {"u2": 200, "u3": 200})
    assert assert_counters_exact(store) == {"a": (4, 2, 1, 0, 0), "b": (3, 2, 0, 0, 1)}
    # A full resync (resend), then `retry` (requeue) of the parked change.
    refresh(store, a, ["u0", "u3", "u4", "u6"], full=True)
    assert store.requeue("a") == 1
    assert assert_counters_exact(store) == {"a": (4, 4, 0, 0, 0), "b": (3, 2, 0, 0, 1)}
    # A rename: the old key's row takes the users Gleap may hold it for, the new one starts over.
    Renames(store.engine).apply("b2", ["b"])
    counts = assert_counters_exact(store)
    assert counts["b2"][0] == 3 and sum(counts[k][0] for k in counts if k not in ("a", "b2")) == 0
    # `forget` deletes users everywhere.
    Forgetter(store.engine).forget(["u0", "u4", "u9"])
    counts = assert_counters_exact(store)
    assert counts["a"][0] == 2


def test_a_run_counts_every_answer_of_a_batch_recorded_at_once(store: Store) -> None:
    # The deliverer records up to RECORD_BATCH answers in one transaction: each counts in the
    # run (the summary's sent, failed, unknown, retries and 429s; run_history), not only the last.
    a = store.ensure_audience("a", "A")
    run_id = store.start_run("cycle", a, "initial")
    store.refresh(a, run_id, iter([["u1", "u2", "u3", "u4"]]), full=False)
    due = {c.user_id: c for c in store.pending_page(a.id, [a.id], "", 100)}
    # u2 and u3 got no verdict (unknown); u4 a verdict, last, so it is not unknown.
    answers = {"u1": 200, "u2": 503, "u3": 0, "u4": 400}
    store.record(
        [
            Outcome((due[u],), s, None if s == 200 else "bad", s == 400, retries=1, rate_limited=i)
            for i, (u, s) in enumerate(answers.items())
        ],
        {a.id: run_id},
        max_attempts=3,
        backoff=Backoff(),
    )
    c = sync_runs.c
    tallies = (c.sent, c.failed, c.unknown, c.retries, c.rate_limited)
    with store.engine.connect() as conn:
        counted = conn.execute(sa.select(*tallies).where(sync_runs.c.id == run_id)).one()
    assert tuple(counted) == (1, 3, 2, 4, 0 + 1 + 2 + 3)
    assert assert_counters_exact(store) == {"a": (4, 3, 0, 2, 0)}


def test_the_events_writes_keep_their_counters_exact(store: Store) -> None:
    a = store.ensure_audience("a", "A")
    names = events_mod.EventNames("Audience Entered", "Audience Exited")
    b = store.ensure_audience("b", "B")  # another audience's event, which a's counts leave out
    store.refresh(b, store.start_run("cycle", b, "initial"), iter([["u9"]]), full=False, events=names)
    assert events_of(store, "b") == (1, 0)
    run_id = store.start_run("cycle", a, "initial")
    store.refresh(a, run_id, iter([["u1", "u2", "u3", "u4"]]), full=False, events=names)
    assert events_of(store, "a") == (4, 0)
    outbox = events_mod.Outbox(store.engine, clock=lambda: store_mod.utc_now() + timedelta(hours=1))
    answer(store, a, {"u1": 200, "u2": 200, "u3": 200, "u4": 200})  # identify first: events wait on it
    due = outbox.due([a.id], 0, 100)
    assert len(due) == 4
    outbox.mark_unknown(due)
    assert events_of(store, "a") == (4, 0)
    outbox.restore_unknown(due)
    record = outbox.record
    record(events_mod.EventOutcome(tuple(due[:2]), 200), lambda _: run_id, max_attempts=1, backoff=(1, 60))
    record(
        events_mod.EventOutcome(tuple(due[2:3]), 400, "bad", permanent=True),
        lambda _: run_id,
        max_attempts=1,
        backoff=(1, 60),
    )
    assert events_of(store, "a") == (1, 1)
    run_id = store.start_run("cycle", a, "incremental")  # u3 leaves: the exit is made parked behind
    store.refresh(a, run_id, iter([["u1", "u2", "u4"]]), full=False, events=names)
    assert events_of(store, "a") == (1, 2)
    assert store.requeue("a") == 2
    assert events_of(store, "a") == (3, 0)
    refresh(store, a, ["u1"])  # leavers: their exits, when told (no events= here: none made)
    Forgetter(store.engine).forget(["u4"])
    assert events_of(store, "a") == (2, 0)


def test_an_audience_deleted_takes_its_counters(store: Store) -> None:
    store.ensure_audience("a", "A")
    with store.engine.begin() as conn:
        conn.execute(sa.delete(audiences).where(audiences.c.key == "a"))
        assert conn.execute(sa.select(sa.func.count()).select_from(audience_counts)).scalar_one() == 0


def test_pending_and_due_counts_come_from_counters_and_the_backoff_index(store: Store) -> None:
    a = store.ensure_audience("a", "A")
    refresh(store, a, ["u1", "u2", "u3"])
    assert store.pending_count([a.id]) == 3 and store.due_count([a.id]) == 3
    answer(store, a, {"u1": 500})  # a passing fault: backoff (60 s at first)
    assert store.pending_count([a.id]) == 3 and store.due_count([a.id]) == 2
    later = Store(store.engine, clock=lambda: store_mod.utc_now() + timedelta(minutes=5))
    assert later.due_count([a.id]) == 3
    assert store.pending_count([]) == 0 and store.due_count([]) == 0


T1 = datetime(2026, 11, 30, 10, 0, 0, tzinfo=UTC)


# --- the outbox's counts and backoff, exactly ----------------------------------------------------------


def owe_events(store: Store, audience: Audience, users: list[str]) -> list[int]:
    """An Audience Entered owed for each user, with no identify owed (no memberships row): due at
    once. Returns their ids."""
    run_id = store.start_run("cycle", audience, "incremental")
    rows = [
        {"audience_id": audience.id, "user_id": u, "run_id": run_id, "change": "entered"}
        | {"name": "Audience Entered", "audience_name": audience.name, "at": T1}
        for u in users
    ]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(events), rows)
        return list(conn.execute(sa.select(events.c.id).where(events.c.run_id == run_id)).scalars())


def fail(
    outbox: events_mod.Outbox, audience: Audience, ids: list[int], *, status: int = 500, max_attempts: int = 9
) -> None:
    """Gleap answers these due events ``status`` (0: none); the backoff: 10 s, doubling, at most 35 s."""
    due = [e for e in outbox.due([audience.id], 0, 100) if e.id in ids]
    assert sorted(e.id for e in due) == sorted(ids)
    outcome = events_mod.EventOutcome(tuple(due), status, f"HTTP {status}", permanent=400 <= status < 500)
    outbox.record(outcome, lambda _: 1, max_attempts=max_attempts, backoff=(10, 35))


def test_the_outbox_counts_the_events_due_now_in_the_audiences_asked(store: Store) -> None:
    a, b = store.ensure_audience("a", "A"), store.ensure_audience("b", "B")
    now = [T1]
    outbox = events_mod.Outbox(store.engine, clock=lambda: now[0])
    assert outbox.due_count([a.id]) == 0
    first, *_ = owe_events(store, a, ["u1", "u2", "u3"])
    assert first == 1  # a fresh store: a due count that starts after the first id would miss it
    assert (outbox.due_count([a.id]), outbox.due_count([a.id], cap=2), outbox.due_count([b.id])) == (3, 2, 0)
    owe_events(store, b, ["u9"])
    assert (outbox.due_count([b.id]), outbox.due_count([a.id, b.id]), outbox.due_count([])) == (1, 4, 0)
    # u1's event fails: it waits 10 s, and u1's next event in a waits behind it; u2's and u3's don't.
    owe_events(store, a, ["u1"])
    fail(outbox, a, [first])
    assert outbox.due_count([a.id]) == 2
    now[0] = T1 + timedelta(seconds=9.999)
    assert outbox.due_count([a.id]) == 2
    now[0] = T1 + timedelta(seconds=10)  # its backoff is over, by the outbox's clock
    assert outbox.due_count([a.id]) == 4
    # An event waits for its own identify (u3 in a), not for the user's identify in another audience.
    refresh(store, b, ["u2"])
    assert outbox.due_count([a.id]) == 4
    refresh(store, a, ["u3"])
    assert outbox.due_count([a.id]) == 3


def test_the_outbox_counts_at_most_a_thousand_due_events_by_default(store: Store) -> None:
    a = store.ensure_audience("a", "A")
    owe_events(store, a, [f"u{i:04d}" for i in range(1001)])
    outbox = events_mod.Outbox(store.engine, clock=lambda: T1)
    assert (outbox.due_count([a.id]), outbox.due_count([a.id], cap=5000)) == (1000, 1001)


def test_the_outbox_counts_pending_and_parked_events_per_audience(store: Store) -> None:
    a, b, c = (store.ensure_audience(k, k.upper()) for k in "abc")
    outbox = events_mod.Outbox(store.engine, clock=lambda: T1)
    ids = owe_events(store, a, ["u1", "u2", "u3"])
    owe_events(store, b, ["u1"])
    fail(outbox, a, ids[:1], status=400, max_attempts=1)  # a verdict with one attempt allowed: parked
    assert outbox.counts([a.id]) == {a.id: (2, 1)}
    assert outbox.counts([a.id, b.id, c.id]) == {a.id: (2, 1), b.id: (1, 0), c.id: (0, 0)}
    assert outbox.counts([]) == {}


def test_an_events_backoff_doubles_from_its_first_failure_up_to_the_maximum(store: Store) -> None:
    a = store.ensure_audience("a", "A")
    now = [T1]
    outbox = events_mod.Outbox(store.engine, clock=lambda: now[0])
    [event] = owe_events(store, a, ["u1"])
    waits: list[float] = []
    for status in (500, 400, 0, 503):  # verdicts and passing faults alike (max_attempts not reached)
        fail(outbox, a, [event], status=status)
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(events).where(events.c.id == event)).one()
        assert row.failures == len(waits) + 1 and row.acked_at is None and row.parked_at is None
        waits.append((row.next_attempt_at - now[0]).total_seconds())
        now[0] = row.next_attempt_at
    assert waits == [10, 20, 35, 35]


def test_the_outbox_marks_a_batch_unknown_then_gives_each_event_back_its_own_mark(store: Store) -> None:
    a = store.ensure_audience("a", "A")
    now = [T1]
    outbox = events_mod.Outbox(store.engine, clock=lambda: now[0])
    ids = owe_events(store, a, ["u1", "u2", "u3"])

    def rows() -> list[tuple[bool, datetime | None, datetime | None]]:
        with store.engine.connect() as conn:
            query = sa.select(events.c.unknown, events.c.sent_at, events.c.acked_at).order_by(events.c.id)
            return [(bool(r.unknown), r.sent_at, r.acked_at) for r in conn.execute(query)]

    fail(outbox, a, ids[:1], status=0)  # u1's was sent, and no answer came: Gleap may have it
    assert [r[0] for r in rows()] == [True, False, False]
    now[0] = T1 + timedelta(seconds=10)
    due = outbox.due([a.id], 0, 100)
    outbox.mark_unknown(due[1:])  # write-ahead, before the request carrying them leaves
    assert [r[0] for r in rows()] == [True, True, True]
    outbox.restore_unknown(due)  # never sent after all
    assert [r[0] for r in rows()] == [True, False, False]
    sent = T1 + timedelta(seconds=12)
    now[0] = T1 + timedelta(seconds=13)
    outbox.record(
        events_mod.EventOutcome(tuple(due), 200, sent_at=sent), lambda _: 1, max_attempts=3, backoff=(10, 35)
    )
    assert rows() == [(False, sent, now[0])] * 3


def test_0008_counts_the_rows_of_a_0007_store(store_url: str) -> None:
    engine = store_mod.create_engine(store_url, create=True)
    with engine.begin() as conn:
        command.upgrade(database._alembic_config(conn), "0007_loose")
        conn.execute(
            sa.text(
                "INSERT INTO audiences (id, key, name, created_at) "
                "VALUES (1, 'a', 'A', :t), (2, 'b', 'B', :t)"
            ).bindparams(sa.bindparam("t", type_=UtcDateTime)),
            {"t": T1},
        )
        rows = [
            # audience, user, desired, acked, value, acked value, unknown, parked
            (1, "u1", True, None, None, None, False, None),
            (1, "u2", True, True, None, None, False, None),
            (1, "u3", False, True, None, None, True, None),
            (1, "u4", True, None, None, None, False, T1),
            (1, "u5", True, True, '{"p":1}', '{"p":2}', False, None),
        ]
        conn.execute(
            sa.text(
                "INSERT INTO memberships (audience_id, user_id, desired, acked, value, acked_value, "
                "unknown, parked_at, changed_at) VALUES (:a, :u, :d, :k, :v, :kv, :x, :p, :t)"
            ).bindparams(sa.bindparam("t", type_=UtcDateTime), sa.bindparam("p", type_=UtcDateTime)),
            [dict(zip(("a", "u", "d", "k", "v", "kv", "x", "p"), r, strict=True)) | {"t": T1} for r in rows],
        )
    store_mod.upgrade(engine)
    store = Store(engine)
    assert assert_counters_exact(store) == {"a": (4, 3, 1, 1, 1), "b": (0,) * 5}
    (a,) = [s for s in store.status() if s.key == "a"]
    assert a.oldest_pending_at == T1
    # And the triggers carry on from there.
    refresh(store, store.ensure_audience("a", "A"), ["u1"])
    assert_counters_exact(store)
    with engine.begin() as conn:
        command.downgrade(database._alembic_config(conn), "0007_loose")
        assert "audience_counts" not in sa.inspect(conn).get_table_names()
    engine.dispose()
