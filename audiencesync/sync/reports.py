"""What a cycle reports: per audience or trait, its counts and outcome; the dry run's calls."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from audiencesync.errors import GleapError
from audiencesync.fields import FieldReader
from audiencesync.gleap.api import track_event
from audiencesync.refresh.user_ids import ReadStats
from audiencesync.store.diff import DiffCounts

log = logging.getLogger(__name__)


@dataclass
class AudienceReport:
    key: str
    mode: str
    status: str = "running"
    members: int = 0
    entered: int = 0
    left: int = 0
    changed: int = 0  # members with a new value (a trait's)
    sent: int = 0
    failed: int = 0
    pending: int = 0  # owed to Gleap and not parked
    parked: int = 0
    unknown: int = 0  # calls whose outcome is unknown (pending until a verdict comes)
    retries: int = 0
    rate_limited: int = 0
    skipped_rows: int = 0
    duplicate_rows: int = 0
    invalid_samples: list[str] = field(default_factory=list)
    error: str | None = None
    kind: str = "audience"  # audience | trait
    skipped_values: int = 0  # rows whose value no Gleap attribute can hold (skipped)
    value_samples: list[str] = field(default_factory=list)
    field_warnings: int = 0  # contact fields skipped for a value of the wrong type
    field_conflicts: int = 0  # fields sent with an earlier audience's value instead of this one's
    field_notes: list[str] = field(default_factory=list)  # columns not sent, skipped fields
    events_sent: int = 0  # Audience Entered/Exited events Gleap acknowledged
    events_pending: int = 0  # events still owed, not parked
    events_parked: int = 0
    rename_notes: list[str] = field(default_factory=list)  # what previous_keys did (renames.py)

    def summary(self) -> str:
        # A trait says so, and counts its changed values; an audience's line is as it always was.
        # An audience with contact fields counts the members whose fields changed.
        changed = f" changed={self.changed}" if self.kind == "trait" or self.changed else ""
        text = (
            f"{self.key}: {self.status} ({self.mode}{', trait' if self.kind == 'trait' else ''}) "
            f"members={self.members} entered={self.entered} left={self.left}{changed} "
            f"sent={self.sent} failed={self.failed} pending={self.pending} "
            f"parked={self.parked} unknown={self.unknown} retries={self.retries} "
            f"rate_limited={self.rate_limited} skipped_rows={self.skipped_rows}"
        )
        if self.events_sent or self.events_pending or self.events_parked:
            text += (
                f" events_sent={self.events_sent} events_pending={self.events_pending}"
                f" events_parked={self.events_parked}"
            )
        if self.field_warnings or self.field_conflicts:
            text += f" field_warnings={self.field_warnings} field_conflicts={self.field_conflicts}"
        if self.skipped_values:
            text += f" skipped_values={self.skipped_values} bad_values=[{'; '.join(self.value_samples)}]"
        if self.invalid_samples:
            text += f" invalid_ids=[{'; '.join(self.invalid_samples)}]"
        if self.rename_notes:
            text += f" renames=[{'; '.join(self.rename_notes)}]"
        if self.error:
            text += f" error={self.error}"
        return text


@dataclass(frozen=True)
class PlannedCall:
    """One identify call a dry run would make: ``POST identify_url`` with ``identify_body``."""

    user_id: str
    attributes: dict[str, Any]  # audience or trait key -> value, in key order


@dataclass(frozen=True)
class PlannedTrack:
    """One track call a dry run would make: ``POST track_url`` with ``{"events": events}``."""

    events: list[dict[str, object]]  # gleap.track_event()s, in the order they would go


@dataclass(frozen=True)
class PlannedRows:
    """Plain identify calls (a user's audiences' booleans alone) as the plan's rows, read by the
    store (``store.plan_rows``) rather than built as ``PlannedCall``s: (user id, key, value) in
    user order, a call per user, a row per key, as the listing shows a call's attributes.

    ``calls``: the users whose first row is here; ``continues``: the first row's user's call began
    in the block before (a user's rows may span two blocks).
    """

    rows: list[tuple[str, str, Any]]
    calls: int
    continues: bool = False


@dataclass
class CycleReport:
    cycle_id: str
    audiences: list[AudienceReport]
    dry_run: bool = False
    calls: int = 0
    track_calls: int = 0  # of a dry run: the track calls, and the events they carry
    events: int = 0
    aborted: GleapError | None = None  # Gleap refused the token, or its breaker opened

    @property
    def retries(self) -> int:
        return sum(a.retries for a in self.audiences)

    @property
    def complete(self) -> bool:
        """Everything refreshed and delivered: nothing failed, nothing left pending."""
        return self.aborted is None and all(
            a.status == "succeeded" or (self.dry_run and a.status == "planned") for a in self.audiences
        )


def count_refresh(report: AudienceReport, counts: DiffCounts, stats: ReadStats) -> None:
    report.members, report.entered, report.left = counts.members, counts.entered, counts.left
    report.changed = counts.changed
    report.skipped_rows = stats.skipped
    report.duplicate_rows = stats.rows - stats.skipped - counts.members
    report.invalid_samples = stats.invalid_samples
    report.skipped_values, report.value_samples = stats.skipped_values, stats.value_samples


def counted(report: CycleReport, planned: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[PlannedCall]:
    """The plan's calls, each counted in ``report`` as it is read: the plan is streamed, never held."""
    for user_id, attributes in planned:
        report.calls += 1
        yield PlannedCall(user_id, attributes)


def counted_rows(
    report: CycleReport, planned: Iterator[PlannedCall | PlannedRows]
) -> Iterator[PlannedCall | PlannedRows]:
    """``counted`` for a listing that takes the plain calls as rows: a block counts its calls."""
    for call in planned:
        report.calls += call.calls if isinstance(call, PlannedRows) else 1
        yield call


def tracks(
    report: CycleReport, planned: Iterator[tuple[str, str, str, str, datetime]], size: int
) -> Iterator[PlannedTrack]:
    """The planned events in track calls of ``size``, each counted in ``report`` as it is read."""
    batch: list[dict[str, object]] = []
    for user_id, key, audience_name, name, at in planned:
        batch.append(track_event(user_id, name, at, {"audience_key": key, "audience_name": audience_name}))
        if len(batch) == size:
            report.track_calls, report.events = report.track_calls + 1, report.events + len(batch)
            yield PlannedTrack(batch)
            batch = []
    if batch:
        report.track_calls, report.events = report.track_calls + 1, report.events + len(batch)
        yield PlannedTrack(batch)


def note_fields(report: AudienceReport, fields: FieldReader) -> None:
    """What the read said about the contact fields: in the report, and once in the log."""
    report.field_warnings = fields.stats.total
    report.field_notes = list(fields.notices)
    if fields.stats.total:
        report.field_notes.append(f"skipped fields: {fields.stats.describe()}")
    for note in report.field_notes:
        log.warning("%s: %s", report.key, note)
