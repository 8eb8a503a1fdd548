"""The stateful randomized test of the whole engine (issue 19 part C): operations and faults
drawn by Hypothesis, the real engine against the real Gleap stand-in, beside the model."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.gleap_standin import GleapStandIn
from tests.model.expect import KNOWN_DEFECTS, MISSING, PLANS, TIERS, TRAIT_KEY, USERS, Model, Slot
from tests.model.world import TOKEN, Templates, World, workdir

users = st.sampled_from(USERS)
picks = st.integers(0, 7)  # an index into whatever candidates there are, modulo their number
# Faults that leave a call's outcome unknown (it may have been applied), and verdicts.
# "flaky": every third request answers 503 until the faults are cleared (Gleap back from an outage).
MAYBE_APPLIED = ("drop", "lose", "5xx", "408", "track_lose", "flaky", "kill")
VERDICTS = ("4xx", "401")
# Scripted (GleapStandIn.script_next): one step per request, in order, so one call's retry meets
# the second step (A2: an outcome unknown, then a verdict on the retry, keeps its unknown mark).
# The steps go to whichever requests come next (identify, track or DELETE, of any user).
SCRIPTS: dict[str, tuple[int | str, ...]] = {
    "lose_then_4xx": ("lose", 422),
    "lose_then_401": ("lose", 401),
    "5xx_then_401": (503, 401),
    "drop_then_4xx": (0, 422),
    "2xx_201": (201,),  # any 2xx acknowledges, not just 200
    "2xx_204": (204,),
}
FAULTS = (*MAYBE_APPLIED[:-1], "429", *VERDICTS, "track400", *SCRIPTS)
KILLS = ("before-record", "after-record", "event-batch", "before-event-record", "after-event-record")


def pick(candidates: list[Slot], index: int) -> Slot:
    return candidates[index % len(candidates)]


class EngineMachine(RuleBasedStateMachine):
    templates: ClassVar[Templates | None] = None  # set by the test for its store

    def __init__(self) -> None:
        super().__init__()
        assert self.templates is not None
        self.directory = directory = workdir()
        self.gleap = GleapStandIn(TOKEN).start()
        self.world = World(self.gleap, self.templates.fresh(directory), Path(directory))
        self.model = Model()
        self.armed: set[str] = set()  # fault kinds armed since the last settle
        self.cuts: dict[str, int] = {}  # user -> index in gleap.events from which their events count
        self.unknown_then: dict[tuple[str, str], int] = {}  # (key, user) -> 2xx carrying it, then

    @initialize(events=st.tuples(st.booleans(), st.booleans()), bare=st.tuples(st.booleans(), st.booleans()))
    def start(self, events: tuple[bool, bool], bare: tuple[bool, bool] = (False, False)) -> None:
        for on, ids_alone in zip(events, bare, strict=True):
            self.model.add_slot(events=on, bare=ids_alone)

    def teardown(self) -> None:
        try:
            if self.model.slots:
                self.settle()
        finally:
            self.world.close()
            self.gleap.stop()
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- the sources ---------------------------------------------------------------------------

    @precondition(lambda self: self.model.slots)
    @rule(index=picks, user=users, plan=st.sampled_from(PLANS))
    def enter_or_change_plan(self, index: int, user: str, plan: str) -> None:
        pick(list(self.model.slots.values()), index).members[user] = plan

    @precondition(lambda self: self.model.slots)
    @rule(index=picks, user=users)
    def leave(self, index: int, user: str) -> None:
        pick(list(self.model.slots.values()), index).members.pop(user, None)

    @rule(user=users, tier=st.one_of(st.none(), st.sampled_from(TIERS)))
    def trait_changes_or_drops(self, user: str, tier: str | None) -> None:
        if tier is None:
            self.model.trait.pop(user, None)
        else:
            self.model.trait[user] = tier

    # -- the config ----------------------------------------------------------------------------

    @precondition(lambda self: self.model.configured())
    @rule(index=picks)
    def events_on_or_off(self, index: int) -> None:
        slot = pick(self.model.configured(), index)
        slot.events = not slot.events

    @precondition(lambda self: self.model.configured())
    @rule(index=picks)
    def rename(self, index: int) -> None:
        slot = pick(self.model.configured(), index)
        self.model.renames += 1
        slot.keys.append(f"k_{slot.name}_r{self.model.renames}")

    def _may_stop(self, slot: Slot) -> bool:
        # A4: owed events of a paused or removed audience block the user's other events.
        return not ("A4" in KNOWN_DEFECTS and slot.events_since_settle)

    @precondition(lambda self: self.model.live())
    @rule(index=picks)
    def pause(self, index: int) -> None:
        slot = pick(self.model.live(), index)
        if self._may_stop(slot):
            slot.state, self.model.disturbed = "paused", True

    @precondition(lambda self: any(s.state == "paused" for s in self.model.configured()))
    @rule(index=picks)
    def resume(self, index: int) -> None:
        slot = pick([s for s in self.model.configured() if s.state == "paused"], index)
        slot.state, self.model.disturbed = "live", True

    @precondition(lambda self: self.model.configured())
    @rule(index=picks)
    def remove(self, index: int) -> None:
        slot = pick(self.model.configured(), index)
        if self._may_stop(slot):
            slot.state, self.model.disturbed = "removed", True
            self.model.order.remove(slot.name)

    @precondition(lambda self: len(self.model.slots) < 5)
    @rule(events=st.booleans(), bare=st.booleans())
    def add_audience(self, events: bool, bare: bool = False) -> None:
        self.model.add_slot(events=events, bare=bare)

    @precondition(lambda self: len(self.model.order) > 1)
    @rule(permutation=st.permutations(range(5)))
    def reorder(self, permutation: list[int]) -> None:
        order = self.model.order
        ranks = {name: permutation.index(i) if i < 5 else i for i, name in enumerate(order)}
        self.model.order = sorted(order, key=ranks.__getitem__)
        self.model.disturbed = True

    # -- faults --------------------------------------------------------------------------------

    @rule(kind=st.sampled_from(FAULTS), count=st.integers(1, 3), user=users)
    def fault(self, kind: str, count: int, user: str) -> None:
        if not self._may_arm(kind):
            return
        self.armed.add(kind)
        gleap = self.gleap
        if kind == "drop":
            gleap.drop_next(count)
        elif kind in ("lose", "track_lose"):
            (gleap.lose_answer_next if kind == "lose" else gleap.lose_track_answer_next)(count)
        elif kind in ("5xx", "408", "429"):
            status = 503 if kind == "5xx" else int(kind)
            gleap.fail_next(count, status, retry_after="0" if kind != "5xx" else None)
        elif kind == "flaky":
            gleap.fail_every(3, 503)
        elif kind == "4xx":
            gleap.fail_user(user, 422, body="unprocessable", times=1)
        elif kind == "401":
            gleap.fail_next(1, 401)
        elif kind in SCRIPTS:
            # A 2xx step repeats `count` times; a fault's pair is one call and its retry.
            gleap.script_next(*(SCRIPTS[kind] * (count if kind.startswith("2xx") else 1)))
        else:
            gleap.fail_track_next(count, 400)

    def _may_arm(self, kind: str) -> bool:
        if kind == "track400" and "A3" in KNOWN_DEFECTS:
            return False  # A3: a split batch delivers a user's later event before the refused one
        if "A2" in KNOWN_DEFECTS:
            # A2: a verdict on the retry of a call that may have been applied clears its mark.
            if kind in SCRIPTS and not kind.startswith("2xx"):
                return False
            if kind in VERDICTS and self.armed & set(MAYBE_APPLIED):
                return False
            if kind in MAYBE_APPLIED and self.armed & set(VERDICTS):
                return False
        return True

    # -- the engine ----------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.world.write_source(self.model)
        self.world.write_config(self.model)

    @precondition(lambda self: self.model.slots)
    @rule(full=st.booleans(), kill=st.one_of(st.none(), st.tuples(st.sampled_from(KILLS), st.integers(1, 3))))
    def sync(self, full: bool, kill: tuple[str, int] | None) -> None:
        if kill is not None and not self._may_arm("kill"):
            kill = None
        if kill is not None:
            self.armed.add("kill")
        self._prepare()
        self.world.sync(full=full, failpoint=f"{kill[0]}:{kill[1]}:raise" if kill else None)
        self.model.refresh()

    @precondition(lambda self: self.model.slots)
    @rule()
    def probe_sync(self) -> None:
        """A pass as the daemon's first after an outage: its breaker half-open, a few trial calls
        decide whether it closes (and the pass goes on) or opens again (everything stays pending)."""
        self._prepare()
        self.world.sync(probe=True)
        self.model.refresh()

    @precondition(lambda self: self.model.configured())
    @rule(index=picks, change=st.sampled_from(["rename", "events", "reorder"]))
    def sync_with_reload_mid_pass(self, index: int, change: str) -> None:
        # A1: the pass's answers land on the rows a reload renamed (a rename made earlier
        # and not yet seen by a refresh is applied by the reload too).
        # B2: on SQLite such a rename beside the pass can fail at once with "database is locked".
        renames = not ({"A1", "B2"} & KNOWN_DEFECTS)
        if not renames:
            change = "events" if change == "rename" else change
        self._prepare()
        self.model.refresh()  # the pass's refresh ran on the config before the reload
        if change == "rename":
            self.rename(index)
        elif change == "events":
            self.events_on_or_off(index)
        else:
            self.model.order.append(self.model.order.pop(0))
            self.model.disturbed = True
        self.world.sync_with_reload(self.model, renames=renames)

    @precondition(lambda self: any(s.state == "removed" for s in self.model.slots.values()))
    @rule(index=picks, unset=st.booleans())
    def retire(self, index: int, unset: bool) -> None:
        slot = pick([s for s in self.model.slots.values() if s.state == "removed"], index)
        slot.state = "retired_unset" if unset else "retired_kept"
        slot.retiring = unset
        self._prepare()
        self._retire(slot, settling=False)

    def _retire(self, slot: Slot, *, settling: bool) -> None:
        done = True
        for i, key in enumerate(reversed(slot.keys)):
            ran = self.world.cli("retire", key, *(["--unset-in-gleap"] if slot.retiring else []))
            if ran.status == 2:
                # Refused: a key the store never had (or an old key its rename already retired).
                assert "the store has no key" in ran.err, ran.err
                assert i > 0 or slot.stored_key != key, ran.err
                continue
            if ran.status != 0:
                assert not settling, f"retire {key} failed with faults cleared: {ran.err}"
                done = False
        slot.retiring = slot.retiring and not done

    @rule(user=users)
    def forget(self, user: str) -> None:
        self._prepare()
        ran = self.world.cli("forget", "--in-gleap", user)
        if ran.status == 0:
            self._forgotten(user)
        else:
            self.model.forgets.add(user)

    def _forgotten(self, user: str) -> None:
        self.model.forgets.discard(user)
        self.model.forgotten(user)
        self.cuts[user] = len(self.gleap.events)

    @rule()
    def settle(self) -> None:
        """Faults cleared, unfinished forgets and retires run again, `retry --all`, a sync: then
        Gleap must hold what the model says, and the store must owe nothing."""
        self.gleap.clear_faults()
        self._prepare()
        for user in sorted(self.model.forgets):
            ran = self.world.cli("forget", "--in-gleap", user)
            assert ran.status == 0, f"forget {user} with faults cleared: {ran.err}"
            self._forgotten(user)
        for slot in self.model.slots.values():
            if slot.retiring:
                self._retire(slot, settling=True)
        ran = self.world.cli("retry", "--all")
        assert ran.status in (0, 1), ran.err
        assert self.world.sync().status == 0, "a sync with faults cleared is incomplete"
        self.model.refresh()
        self.check_gleap()
        self.check_status()
        self.armed.clear()
        for slot in self.model.slots.values():
            slot.events_since_settle = False

    # -- the invariant after settling ------------------------------------------------------------

    def check_gleap(self) -> None:
        contacts = self.gleap.contacts
        for (user, key), want in self.model.expected_values().items():
            # Absent counts as false (an audience) or `missing` (the trait): Gleap never had it.
            held = contacts.get(user, {}).get(key, MISSING if key == TRAIT_KEY else False)
            assert held == want, f"Gleap holds {key}={held!r} for {user}, the model says {want!r}"
        check_plans = not ("A5" in KNOWN_DEFECTS and self.model.disturbed)
        for user in USERS:
            plan = self.model.expected_plan(user)
            if plan is not None and check_plans:
                held = contacts.get(user, {}).get("plan")
                assert held == plan, f"Gleap holds plan={held!r} for {user}, the model says {plan!r}"
        if self.model.events_checkable():
            received = self.gleap.events
            for user in USERS:
                # Order is promised per user and audience, not across audiences (README): a stable
                # sort by audience keeps each audience's own order and compares just that.
                got = sorted(self._events_of(user, received), key=lambda e: e[1])
                want = sorted(self.model.expected_events(user), key=lambda e: e[1])
                assert got == want, f"{user}'s events by audience: Gleap got {got}, the model says {want}"

    def _events_of(self, user: str, received: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """The user's events since they were last forgotten, each once (Gleap may get one twice,
        and a copy re-sent after a rename carries the new key: the same event, by its audience)."""
        seen: set[tuple[str, str, str]] = set()
        out: list[tuple[str, str]] = []
        for event in received[self.cuts.get(user, 0) :]:
            if event["userId"] != user:
                continue
            slot = self.model.slot_of_key(event["data"]["audience_key"])
            assert slot is not None, event
            ident = (event["name"], event["date"], slot.name)
            if ident in seen:
                continue
            seen.add(ident)
            if slot.state == "live":
                out.append((event["name"], slot.name))
        return out

    def check_status(self) -> None:
        rows = {row["key"]: row for row in self.world.status()["audiences"]}
        for slot in self.model.live():
            row = rows[slot.key]
            got = tuple(
                row[c] for c in ("members", "pending", "unknown", "parked", "events_pending", "events_parked")
            )
            assert got == (len(slot.members), 0, 0, 0, 0, 0), (slot.key, row)
        tier = rows[TRAIT_KEY]
        assert (tier["members"], tier["pending"], tier["unknown"]) == (len(self.model.trait), 0, 0), tier

    # -- cheap invariants, after every step --------------------------------------------------------

    @invariant()
    def nothing_acknowledged_without_a_2xx(self) -> None:
        if not self.model.slots:
            return
        told_list = self._told()
        told = set(told_list)
        counts = Counter((user, key) for user, key, _ in told_list)
        rows = self.world.rows()
        for row in rows:
            key, user = row["key"], row["user_id"]
            if row["kind"] == "audience" and row["acked"] is not None:
                assert (user, key, bool(row["acked"])) in told, (
                    f"{key}={row['acked']} acked for {user}, never 2xx"
                )
        # Unknown marks: one cleared needs a 2xx carrying its key since it was seen.
        for row in rows:
            mark = (row["key"], row["user_id"])
            if mark in self.unknown_then and not row["unknown"]:
                assert counts[(row["user_id"], row["key"])] > self.unknown_then[mark], (
                    f"unknown mark of {mark} cleared"
                )
        self.unknown_then = {
            (r["key"], r["user_id"]): counts[(r["user_id"], r["key"])] for r in rows if r["unknown"]
        }

    def _told(self) -> list[tuple[str, str, object]]:
        told = []
        for request in self.gleap.requests:
            if request.path.startswith("/admin/identify") and 200 <= request.status < 300:
                body = request.body
                told += [(body["userId"], k, v) for k, v in body.items() if k != "userId"]
        return told
