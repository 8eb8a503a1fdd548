"""The model: what Gleap should hold, computed from the operations alone.

Deliberately simple and independent of the engine: it never reads the store. It knows the
sources (who is in which audience's table, with which `plan`; each user's trait value), the
config (the audiences in order, paused, removed, renamed, with events or not), and which
refreshes ran, so it can say which entries and exits a refresh saw (the events owed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

USERS = ("u1", "u2", "u3")
PLANS = ("basic", "pro", "team")
TIERS = ("gold", "silver")
TRAIT_KEY = "tier"
MISSING = "none"
ENTERED, EXITED = "Audience Entered", "Audience Exited"

# Defects known and not yet fixed, by name ("A1".."A5", "B2": issue 19's). While one is listed,
# the machine leaves out the operation/fault combinations that trigger it, so a long run can look
# for other bugs meanwhile. Empty on main: every defect found so far is fixed, and each stays in
# tests/test_model.py as an explicit example.
KNOWN_DEFECTS: set[str] = set()


@dataclass
class Slot:
    """One audience as the admin sees it: a source table of its own, one key at a time."""

    name: str
    keys: list[str]  # the current key last; the earlier ones are its previous_keys
    state: str = "live"  # live | paused | removed | retired_unset | retired_kept
    events: bool = False
    # Its query returns `user_id` alone, so it gives no plan; on PostgreSQL, where the source is
    # the store's own database, it is refreshed inside the store (pushdown).
    bare: bool = False
    members: dict[str, str] = field(default_factory=dict)  # user -> plan, the source now
    seen: set[str] = field(default_factory=set)  # members at the last refresh (the store's view)
    stored_key: str | None = None  # the key of its last refresh: the store has it
    events_since_settle: bool = False  # a refresh of it made an event since the last settle
    retiring: bool = False  # a retire --unset-in-gleap that did not finish yet

    @property
    def key(self) -> str:
        return self.keys[-1]

    @property
    def configured(self) -> bool:
        return self.state in ("live", "paused")


@dataclass
class Model:
    slots: dict[str, Slot] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # configured slots, in config order
    trait: dict[str, str] = field(default_factory=dict)
    events: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # user -> (name, slot)
    forgets: set[str] = field(default_factory=set)  # forgets that did not finish yet
    disturbed: bool = False  # a pause, removal, retire or reorder since the start (A5's cases)
    next_slot: int = 0
    renames: int = 0

    def add_slot(self, events: bool = False, bare: bool = False) -> Slot:
        self.next_slot += 1
        name = f"s{self.next_slot}"
        slot = Slot(name, [f"k_{name}"], events=events, bare=bare)
        self.slots[name] = slot
        self.order.append(name)
        return slot

    def configured(self) -> list[Slot]:
        return [self.slots[n] for n in self.order]

    def live(self) -> list[Slot]:
        return [s for s in self.configured() if s.state == "live"]

    def refresh(self) -> None:
        """A refresh of every live audience, in config order: it sees each entry and exit."""
        for slot in self.live():
            now = set(slot.members)
            if slot.events:
                for user in sorted(now - slot.seen):
                    self.events.setdefault(user, []).append((ENTERED, slot.name))
                    slot.events_since_settle = True
                for user in sorted(slot.seen - now):
                    self.events.setdefault(user, []).append((EXITED, slot.name))
                    slot.events_since_settle = True
            slot.seen = now
            slot.stored_key = slot.key

    def forgotten(self, user: str) -> None:
        """The store holds nothing of the user any more: they come back as a new member."""
        for slot in self.slots.values():
            slot.seen.discard(user)
        self.events[user] = []

    def slot_of_key(self, key: str) -> Slot | None:
        return next((s for s in self.slots.values() if key in s.keys), None)

    # -- what Gleap should hold after settling ---------------------------------------------------

    def expected_values(self) -> dict[tuple[str, str], object]:
        """(user, key) -> the value Gleap must hold, `False` standing for false or absent.
        Keys whose value Gleap may keep as it was (paused, removed, retired without unset) are left out."""
        expected: dict[tuple[str, str], object] = {}
        for slot in self.slots.values():
            for user in USERS:
                if slot.state == "live":
                    expected[(user, slot.key)] = user in slot.members
                    for old in slot.keys[:-1]:
                        expected[(user, old)] = False
                elif slot.state == "retired_unset":
                    for key in slot.keys:
                        expected[(user, key)] = False
        for user in USERS:
            expected[(user, TRAIT_KEY)] = self.trait.get(user, MISSING)
        return expected

    def expected_plan(self, user: str) -> str | None:
        """The first configured audience that gives the user a plan wins; None: not checked
        (a member of none: Gleap keeps what it had; or a paused audience decides). A bare
        audience gives no plan, so it never decides."""
        for slot in self.configured():
            if slot.bare:
                continue
            if slot.state != "live":
                if user in slot.seen:
                    return None  # its frozen rows decide: not modelled
                continue
            if user in slot.members:
                return slot.members[user]
        return None

    def events_checkable(self) -> bool:
        """Events owed by a paused or removed audience wait for it; the check waits with them."""
        return all(s.state in ("live", "retired_unset", "retired_kept") for s in self.slots.values())

    def expected_events(self, user: str) -> list[tuple[str, str]]:
        return [e for e in self.events.get(user, []) if self.slots[e[1]].state == "live"]
