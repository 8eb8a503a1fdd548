"""attention.py: the one reading of what needs a person, rule by rule (no store, no daemon).

The surfaces that show it (/healthz, `status`, /metrics, the web page) are tested with a
running daemon in test_attention_surfaces.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from audiencesync.alerts import attention
from audiencesync.alerts.conditions import Condition
from audiencesync.lifecycle import states as lifecycle
from audiencesync.store.lease_renewal import Failing
from audiencesync.store.status import AudienceStatus

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
LIVE = {"seg": lifecycle.LIVE, "other": lifecycle.LIVE}


def row(key: str = "seg", **kwargs: Any) -> AudienceStatus:
    values: dict[str, Any] = {
        "key": key, "name": key, "members": 10, "pending": 0, "parked": 0, "unknown": 0,
        "oldest_pending_at": None, "refreshed_at": NOW - timedelta(minutes=5),
        "next_run_at": NOW + timedelta(hours=2), "last_run": {"status": "succeeded"},
    }  # fmt: skip
    return AudienceStatus(**(values | kwargs))


def condition(kind: str, subject: str, summary: str = "what the alert said") -> Condition:
    return Condition(kind, subject, NOW - timedelta(minutes=1), NOW, summary)


HOLDER = {"host": "h1", "pid": 42, "expires_at": NOW + timedelta(seconds=30), "health": "ok"}


def test_all_quiet_is_ok_and_healthy() -> None:
    seen = attention.assess([row(), row("other")], [], LIVE, HOLDER, NOW)
    assert seen.healthy and seen.concerns == ()
    assert seen.daemon.state == attention.OK
    assert {k: v.state for k, v in seen.properties.items()} == {"seg": "ok", "other": "ok"}
    assert seen.health() == (True, "ok")


def test_pending_changes_are_delivering_in_progress() -> None:
    seen = attention.assess([row(pending=3, events_pending=1)], [], LIVE, HOLDER, NOW)
    verdict = seen.properties["seg"]
    assert (verdict.state, verdict.severity, verdict.reason) == (
        "delivering",
        "progress",
        "4 change(s) pending",
    )


def test_a_refused_token_is_daemon_wide_failing_and_blocks_what_waits() -> None:
    conditions = [condition("token_refused", "gleap", "Gleap refuses the API token")]
    seen = attention.assess([row(pending=5), row("other")], conditions, LIVE, HOLDER, NOW)
    assert not seen.healthy
    healthy, body = seen.health()
    assert not healthy and body.splitlines()[0] == "Gleap refuses the API token"
    (concern,) = seen.concerns
    assert (concern.state, concern.subject, concern.severity) == ("token_refused", None, "failing")
    assert "GLEAP_API_TOKEN" in concern.action
    assert seen.daemon.state == "token_refused"
    # What waits for Gleap is blocked, not "delivering"; nothing pending stays ok.
    assert seen.properties["seg"].state == "token_refused"
    assert seen.properties["seg"].reason.startswith("5 change(s) wait: ")
    assert seen.properties["other"].state == "ok"


def test_token_refused_comes_before_gleap_down() -> None:
    conditions = [condition("gleap_down", "gleap"), condition("token_refused", "gleap")]
    seen = attention.assess([row(pending=1)], conditions, LIVE, HOLDER, NOW)
    assert [c.state for c in seen.concerns] == ["token_refused", "gleap_down"]
    assert seen.properties["seg"].state == "token_refused"


def test_a_held_audience_needs_action_and_leaves_the_daemon_healthy() -> None:
    held = condition("held", "seg", "audience 'seg' is held by the mass-removal guard: 62 of 62 would leave")
    seen = attention.assess([row(), row("other")], [held], LIVE, HOLDER, NOW)
    assert seen.healthy
    verdict = seen.properties["seg"]
    assert (verdict.state, verdict.severity) == ("held", "action")
    assert (
        verdict.action is not None and "audiencesync sync --audience seg --allow-removals" in verdict.action
    )
    healthy, body = seen.health()
    assert healthy and body.splitlines()[0] == "ok"
    assert body.splitlines()[1].startswith("held: seg: audience 'seg' is held")


def test_a_reason_with_its_own_fix_gives_one_fix_not_two() -> None:
    """The guard's alert message carries its own "Fix:": the line gives one fix, the action
    that every surface shows, with the time before it, not the message's and then a second."""
    held = condition(
        "held", "seg", "audience 'seg' is held: the source returned no rows. Nothing was applied. "
        "Fix: check the source; if it is right, release it once with `audiencesync sync --audience "
        "seg --allow-removals`, or set allow_empty = true on the audience",
    )  # fmt: skip
    line = attention.assess([row()], [held], LIVE, HOLDER, NOW).concerns[0].line()
    assert line.count("Fix:") == 1
    head = "held: seg: audience 'seg' is held: the source returned no rows. Nothing was applied (since "
    assert line.startswith(head)
    assert line.endswith(
        ". Fix: audiencesync sync --audience seg --allow-removals (if the removals are right)"
    )


def test_a_held_last_run_is_held_without_its_condition() -> None:
    """A store whose hold was seen before conditions were kept without a webhook."""
    seen = attention.assess(
        [row(last_run={"status": "held", "error": "would remove all 10", "started_at": NOW})], [], LIVE,
        HOLDER, NOW,
    )  # fmt: skip
    assert seen.properties["seg"].state == "held"
    assert seen.properties["seg"].reason == "audience 'seg' is held: would remove all 10"


def test_parked_counts_come_from_the_store_and_name_the_commands() -> None:
    seen = attention.assess([row(parked=2, events_parked=1)], [], LIVE, HOLDER, NOW)
    (concern,) = seen.concerns
    assert concern.line() == (
        "parked: seg: 3 change(s) parked after repeated rejections by Gleap. Fix: audiencesync failures "
        "--audience seg, fix the cause, then audiencesync retry --audience seg"
    )
    assert seen.properties["seg"].state == "parked" and seen.healthy


def test_a_failing_source_outranks_parked_and_is_the_audiences_own() -> None:
    failing = condition("source_failed", "seg", "the source 'main' of audience 'seg' failed: no such table")
    seen = attention.assess([row(parked=1)], [failing], LIVE, HOLDER, NOW)
    assert seen.properties["seg"].state == "source_failing" and seen.healthy
    assert [c.state for c in seen.concerns] == ["source_failing", "parked"]


def test_no_daemon_and_runs_past_due_are_overdue() -> None:
    late = row(next_run_at=NOW - timedelta(minutes=10))
    seen = attention.assess([late, row("other")], [], LIVE, None, NOW)
    assert seen.daemon.state == "overdue"
    assert seen.properties["seg"].state == "overdue" and seen.properties["other"].state == "ok"
    assert {(c.state, c.subject) for c in seen.concerns} == {("overdue", None), ("overdue", "seg")}
    assert "audiencesync run" in seen.daemon.action  # type: ignore[operator]


def test_an_expired_lease_counts_as_no_daemon() -> None:
    expired = HOLDER | {"expires_at": NOW - timedelta(seconds=1)}
    seen = attention.assess([row()], [], LIVE, expired, NOW)
    assert seen.daemon.state == "no_daemon" and seen.daemon.severity == "neutral"
    live = attention.assess([row(next_run_at=NOW - timedelta(minutes=1))], [], LIVE, HOLDER, NOW)
    assert live.properties["seg"].state == "ok"  # a daemon holds the store: it will run it


def test_paused_and_retired_are_neutral() -> None:
    known = {"seg": lifecycle.PAUSED}
    seen = attention.assess([row(parked=4), row("gone", members=0, pending=2)], [], known, HOLDER, NOW)
    assert seen.properties["seg"].state == "paused" and seen.properties["seg"].severity == "neutral"
    gone = seen.properties["gone"]
    assert gone.state == "retired" and gone.action == "audiencesync retire gone --unset-in-gleap"


def test_in_the_daemon_its_own_facts_come_first() -> None:
    local = attention.Local(
        active=True, dead="the delivery loop is not running", started_at=NOW, intervals={"seg": 7200}
    )
    seen = attention.assess([row()], [], LIVE, HOLDER, NOW, local)
    assert seen.daemon.state == "dead" and not seen.healthy
    outage = attention.Local(active=True, outage="Gleap is unavailable: HTTP 503", outage_since=NOW)
    assert attention.assess([row(pending=1)], [], LIVE, HOLDER, NOW, outage).properties["seg"].state == (
        "gleap_down"
    )
    standby = attention.assess([row()], [], LIVE, HOLDER, NOW, attention.Local(active=False))
    assert standby.daemon.state == "standby" and standby.health() == (True, "standby")


def test_late_audiences_are_stalled_unless_their_own_condition_explains_it() -> None:
    local = attention.Local(
        active=True, started_at=NOW - timedelta(hours=5), intervals={"seg": 3600, "other": 3600}
    )
    old = NOW - timedelta(hours=3)
    seen = attention.assess(
        [row(refreshed_at=old), row("other", refreshed_at=old)], [], LIVE, HOLDER, NOW, local
    )
    assert not seen.healthy and seen.daemon.state == "stalled"
    assert "seg" in seen.daemon.reason and "other" in seen.daemon.reason
    failing = [condition("source_failed", "seg"), condition("source_failed", "other")]
    quiet = attention.assess(
        [row(refreshed_at=old), row("other", refreshed_at=old)], failing, LIVE, HOLDER, NOW, local
    )
    assert quiet.healthy  # each audience's own condition says why; a restart would cure neither


def test_another_daemons_unhealthy_heartbeat_is_shown_with_its_state() -> None:
    late = HOLDER | {"health": "unhealthy (stalled): no successful cycle within twice the interval: seg"}
    seen = attention.assess([row()], [], LIVE, late, NOW)
    assert (seen.daemon.state, seen.daemon.reason) == (
        "stalled", "no successful cycle within twice the interval: seg"
    )  # fmt: skip
    # An older daemon's heartbeat said no state: a loop of it is what /healthz failed on.
    sick = HOLDER | {"health": "unhealthy: the scheduler is not running"}
    seen = attention.assess([row()], [], LIVE, sick, NOW)
    assert seen.daemon.state == "dead" and seen.daemon.reason == "the scheduler is not running"


def test_a_lost_lease_fails_only_while_no_daemon_holds_the_store() -> None:
    lost = [condition("lease", "host-a", "the daemon on host-a lost the store's writer lease")]
    standby = attention.Local(active=False)
    nobody = attention.assess([row()], lost, LIVE, None, NOW, standby)
    assert not nobody.healthy and nobody.daemon.state == "lease_lost"
    # Another daemon holds it and serves: standing by is healthy.
    other = attention.assess([row()], lost, LIVE, HOLDER, NOW, standby)
    assert other.healthy and other.daemon.state == "standby" and other.concerns == ()


# --- store_unwritable: the lease's renewals failing ----------------------------------------------


def test_renewals_failing_past_a_third_of_the_ttl_are_store_unwritable_until_one_goes_through() -> None:
    ttl = 60.0  # the grace: 20 s
    failing = Failing(NOW, "database is locked", warned=0.0)
    clock = [NOW]

    def seen(unrenewed: Failing | None) -> attention.Attention:
        local = attention.Local(active=True, started_at=NOW, unrenewed=unrenewed, lease_seconds=ttl)
        expires = HOLDER | {"expires_at": NOW + timedelta(seconds=40)}
        return attention.assess([row(pending=2)], [], LIVE, expires, clock[0], local)

    clock[0] = NOW + timedelta(seconds=20)  # a lock as long as the grace is not worth a page
    assert seen(failing).healthy and seen(failing).concerns == ()
    assert seen(failing).properties["seg"].state == "delivering"
    clock[0] = NOW + timedelta(seconds=21)
    past = seen(failing)
    healthy, body = past.health()
    assert not healthy and past.daemon.state == "store_unwritable" and past.daemon.severity == "failing"
    assert body.splitlines()[0] == (
        "the store can't be written: the lease's renewals have been failing for 21 s (database is "
        "locked); delivery pauses before the lease would expire at 2026-12-06T12:00:40+00:00"
    )
    (concern,) = past.concerns
    assert (concern.subject, concern.since) == (None, NOW)
    assert "another process's long write transaction" in concern.action and "pg_locks" in concern.action
    assert "a full disk" in concern.action and "lease_seconds" in concern.action
    # What waits for the store is blocked, not delivering.
    assert past.properties["seg"].state == "store_unwritable"
    assert past.properties["seg"].reason.startswith("2 change(s) wait: the store can't be written")
    # A renewal went through: the heartbeat's failing is gone, and so is the state, at once.
    assert seen(None).healthy and seen(None).concerns == ()
    # Only an active daemon's heartbeat renews: a standby's leftover says nothing.
    standby = attention.Local(active=False, unrenewed=failing, lease_seconds=ttl)
    assert attention.assess([row()], [], LIVE, HOLDER, clock[0], standby).daemon.state == "standby"


def test_a_dead_loop_comes_first_then_the_store_then_gleap() -> None:
    local = attention.Local(
        active=True, dead="the delivery loop is not running", outage="Gleap is unavailable",
        unrenewed=Failing(NOW - timedelta(minutes=1), "database is locked", warned=0.0),
    )  # fmt: skip
    conditions = [condition("token_refused", "gleap")]
    seen = attention.assess([row()], conditions, LIVE, HOLDER, NOW, local)
    assert [c.state for c in seen.concerns] == ["dead", "store_unwritable", "token_refused", "gleap_down"]
    assert seen.daemon.state == "dead"


def test_another_process_reads_a_holder_unrenewed_past_the_grace_as_store_unwritable() -> None:
    """It can't be told (the heartbeat that would say so is a renewal): the row stands still.
    A 60 s lease renews every 7.5 s; past that and the 20 s grace, the store can't be written."""

    def holder(unrenewed_for: float) -> dict[str, Any]:
        renewed = NOW - timedelta(seconds=unrenewed_for)
        return HOLDER | {"renewed_at": renewed, "expires_at": renewed + timedelta(seconds=60)}

    assert attention.assess([row()], [], LIVE, holder(27), NOW).healthy
    seen = attention.assess([row()], [], LIVE, holder(28), NOW)
    assert not seen.healthy and seen.daemon.state == "store_unwritable"
    assert seen.daemon.reason == (
        "the store can't be written, or h1 pid 42 is stuck: it has not renewed the store's lease "
        "for 28 s (it renews every 7.5 s); delivery pauses before the lease would expire at "
        "2026-12-06T12:00:32+00:00"
    )
    (concern,) = seen.concerns
    assert concern.since == NOW - timedelta(seconds=28)
    # Its stale heartbeat ("ok" here, or an older failing state) is not what it is now.
    stale = holder(28) | {"health": "unhealthy (stalled): delivery stalled"}
    assert [c.state for c in attention.assess([row()], [], LIVE, stale, NOW).concerns] == ["store_unwritable"]
    # Renewed again: ok at once.
    assert attention.assess([row()], [], LIVE, holder(0), NOW).concerns == ()
    # The daemon itself goes by its heartbeat, not by its own row.
    mine = attention.assess([row()], [], LIVE, holder(28), NOW, attention.Local(active=True))
    assert mine.healthy
