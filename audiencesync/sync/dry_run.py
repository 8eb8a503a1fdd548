"""The dry run: plan the calls a sync would make now, report them, and write nothing to the store.

Kept apart from ``sync.py`` because it is its own path through a cycle: it
reads each source into a stage as a refresh would, but turns the result into
a plan (``plan.py`` holds its SQL, ``plan_events.py`` its events') on one
connection instead of applying it, against an empty in-memory store when no
sync has created the real one yet.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import Connection

from audiencesync.config.loading import AudienceConfig, Config
from audiencesync.delivery import field_winners
from audiencesync.errors import SourceError, StoreError
from audiencesync.fields import FieldReader
from audiencesync.gleap.api import MAX_CUSTOM_KEYS
from audiencesync.lifecycle import renames
from audiencesync.refresh.guard import removal_guard
from audiencesync.refresh.user_ids import ReadStats
from audiencesync.store import stage as stage_mod
from audiencesync.store.events import EventNames
from audiencesync.store.schema import audiences
from audiencesync.store.store import Store, empty_store, schema_revisions
from audiencesync.sync import plan, plan_calls, plan_events, plan_listing
from audiencesync.sync.reports import (
    AudienceReport,
    CycleReport,
    PlannedCall,
    PlannedRows,
    PlannedTrack,
    count_refresh,
    counted,
    counted_rows,
    note_fields,
    tracks,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# The calls a dry run lists on a terminal, in a table: a first sync's thousands would scroll its
# summary away. Elsewhere (a pipe, a file, csv/json) it lists every call.
LISTED_ON_A_TERMINAL = 5


class Listing:
    """Which of a dry run's calls are listed: ``limit`` at most (None: every one)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.listed = 0

    @classmethod
    def for_output(cls, *, table: bool, terminal: bool, all_calls: bool) -> Listing:
        return cls(LISTED_ON_A_TERMINAL if table and terminal and not all_calls else None)

    def take(self, calls: Iterable[T]) -> Iterator[T]:
        """The calls to list, counted; what it leaves unread, ``DryRun.plan`` still reads and counts.

        A block of plain calls' rows (``PlannedRows``) counts as the calls it holds, and is cut
        to the calls the limit leaves room for.
        """
        calls = iter(calls)
        while self.limit is None or self.listed < self.limit:
            call = next(calls, None)
            if call is None:
                return
            if isinstance(call, PlannedRows):
                block = _first_calls(call, None if self.limit is None else self.limit - self.listed)
                self.listed += block.calls
                yield block  # type: ignore[misc]  # a T: a PlannedRows (cut)
                continue
            self.listed += 1
            yield call

    def note(self, total: int) -> str | None:
        """What to say under a listing cut short, or None when it holds every call."""
        if self.limit is None or total <= self.listed:
            return None
        return (
            f"first {self.listed} of {total} calls listed; "
            "--all-calls for all, --format csv > calls.csv for a file"
        )


class DryRun:
    """Plans a cycle of the selected properties. Seams: the store, and the syncer's reads.

    ``read`` gives a property's batches as (id, value) pairs (ids alone for an audience with no
    field columns: ``FieldReader.has_fields`` false once read); ``event_names``
    its events' names, or None when it has none; ``push`` loads the stage inside
    the store instead, where it can (``Sources.push_down``).
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        read: Callable[
            [AudienceConfig, ReadStats, FieldReader],
            Iterator[list[tuple[str, str | None]]] | Iterator[list[str]],
        ],
        event_names: Callable[[AudienceConfig], EventNames | None],
        property_keys: Sequence[str],
        push: Callable[[AudienceConfig, Connection, str, ReadStats], bool] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.read = read
        self.push = push
        self.event_names = event_names
        self.property_keys = list(property_keys)

    def plan(
        self,
        report: CycleReport,
        selected: Sequence[AudienceConfig],
        *,
        full: bool,
        allow_removals: bool,
        show: Callable[[Iterator[Any]], object] | None,
        rows: bool = False,
    ) -> None:
        """Plan the calls a sync would make now and hand them to ``show``, writing nothing to the store.

        ``rows``: ``show`` takes the plain calls as blocks of the plan's rows (``PlannedRows``,
        read by the store: a listing's fast path) rather than one ``PlannedCall`` each.
        """
        current, head = schema_revisions(self.store.engine)
        engine = self.store.engine
        if current is None:
            # A store no sync has used yet: plan against an empty one in memory,
            # so that nothing (not even the schema) is written to the real one.
            engine = empty_store()
        elif current != head:
            raise StoreError(
                f"the store is at schema revision {current}, older than this audiencesync's ({head}); "
                "a dry run only reads, so it can't plan against the old schema. "
                "Fix: run `audiencesync db upgrade` (a real sync does it by itself)."
            )
        now = self.store.clock()
        try:
            with engine.connect() as conn, conn.begin():
                stage_mod.steer_planner(conn)
                table = plan.create_plan(conn)
                event_table = plan_events.create_event_plan(conn)
                keys: set[str] = set()  # every key the plan's rows are given
                for place, config in enumerate(selected):
                    report.audiences.append(
                        self._plan_audience(
                            conn,
                            (table, event_table, place),
                            config,
                            full=full,
                            allow_removals=allow_removals,
                            now=now,
                            keys=keys,
                        )
                    )
                chosen = {config.key for config in selected}
                for rank, config in enumerate(self.config.audiences):
                    if config.key not in chosen:  # not refreshed: their fields as they are
                        plan.add_stored_fields(
                            conn, table, rank=rank, key=config.key, audience_id=_audience_id(conn, config.key)
                        )
                # As the delivery's first step (``field_winners.reconcile``), read only.
                drained = [i for i in (_audience_id(conn, c.key) for c in selected) if i is not None]
                order = [a.key for a in self.config.audiences]
                winners = field_winners.planned_rows(conn, order, drained)
                field_winners.add_to_plan(conn, table, winners)
                # At most a key per name given above and per audience a winner's row is of.
                most_keys = len(keys) + len({audience for audience, _ in winners})
                size = self.config.gleap.track_batch_size
                conflicts: Counter[str] = Counter()  # per losing audience, as the delivery counts them
                identify: Iterator[PlannedCall | PlannedRows]
                events = plan_events.planned_events(conn, event_table)
                streams: list[Iterator[Any]] = [events]  # closed below, however the reading ends
                if rows:
                    listed = plan_listing.listed_calls(conn, table, MAX_CUSTOM_KEYS, conflicts, most_keys)
                    identify = counted_rows(report, listed)
                    streams.append(listed)
                else:
                    built = plan_calls.planned_calls(conn, table, MAX_CUSTOM_KEYS, conflicts)
                    identify = counted(report, built)
                    streams.append(built)
                calls: Iterator[PlannedCall | PlannedRows | PlannedTrack] = itertools.chain(
                    identify, tracks(report, events, size)
                )
                try:
                    if show is not None:
                        show(calls)
                    for _ in calls:  # what show left unread still counts
                        pass
                finally:
                    # A reader that stopped early (its pipe closed) leaves the streams open: they
                    # end here, while their connection is open, not when collected after it closed.
                    for stream in streams:
                        getattr(stream, "close", lambda: None)()
                for audience_report in report.audiences:
                    audience_report.field_conflicts = conflicts[audience_report.key]
                plan.drop_plan(conn, table)
                plan.drop_plan(conn, event_table)
        finally:
            if engine is not self.store.engine:
                engine.dispose()

    def _plan_audience(
        self,
        conn: Connection,
        tables: tuple[str, str, int],
        config: AudienceConfig,
        *,
        full: bool,
        allow_removals: bool,
        now: datetime,
        keys: set[str],
    ) -> AudienceReport:
        """Plan one audience; the keys it gives the plan's rows are added to ``keys``."""
        table, event_table, place = tables  # the plan's calls, its events, the audience's place

        def add_events(stage: str | None) -> None:
            names = self.event_names(config)
            plan_events.add_events(
                conn,
                event_table,
                key=config.key,
                audience_id=audience_id,
                audience_name=config.name,
                place=place,
                stage=stage,
                names=(names.entered, names.exited) if names is not None else None,
                now=now,
            )

        # A rename not applied yet: the old key's row holds the history (counts, guard, events),
        # and the new key is owed to every member, as renames.Renames.apply will leave it.
        rename = renames.preview(conn, config.key, config.previous_keys)
        row = conn.execute(
            sa.select(audiences.c.id, audiences.c.refreshed_at).where(audiences.c.id == rename.stored_id)
        ).one_or_none()
        audience_id = row.id if row is not None else None
        initial = row is None or row.refreshed_at is None
        rekeyed = audience_id is not None and not rename.renamed
        plan_id = None if rekeyed else audience_id  # the stored state the new key's values diff against
        keys.add(config.key)  # every row of its own (applied, current, re-keyed) has it
        for old_key, old_id, retired in rename.owed:
            keys.add(old_key)
            plan.add_retired(conn, table, key=old_key, audience_id=old_id, retired=retired, now=now)

        def current() -> int:
            """Plan what is due as the row stands (its refresh failed or was held)."""
            if rekeyed:
                assert audience_id is not None
                return plan.add_rekeyed(
                    conn, table, key=config.key, audience_id=audience_id, trait=config.kind == "trait"
                )
            return plan.add_current(
                conn,
                table,
                key=config.key,
                audience_id=audience_id,
                now=now,
                trait=config.kind == "trait",
                missing=config.missing,
            )

        report = AudienceReport(
            key=config.key,
            mode="initial" if initial else ("full" if full else "incremental"),
            kind=config.kind,
        )
        stats = ReadStats()
        fields = FieldReader(self.property_keys)
        # An audience's place in the config, for the merge of its members' fields.
        rank = next((i for i, a in enumerate(self.config.audiences) if a.key == config.key), None)
        stage = stage_mod.new_stage_name()
        stage_mod.create_stage(conn, stage)
        try:
            pushed = self.push is not None and self.push(config, conn, stage, stats)
            loaded = 0
            for batch in () if pushed else self.read(config, stats, fields):
                if config.kind == "trait" or fields.has_fields:
                    stage_mod.load_values(conn, stage, cast("list[tuple[str, str | None]]", batch))
                else:  # no field columns: ids alone, and the plain insert is about twice as fast
                    stage_mod.load_batch(conn, stage, cast("list[str]", batch))
                loaded += len(batch)
            members = stage_mod.seal_for_plan(
                conn,
                stage,
                valued=config.kind == "trait" or fields.has_fields,
                rows=None if pushed else loaded,
            )
        except SourceError as exc:
            report.status, report.error = "failed", str(exc)
            log.error("%s", exc)
            report.pending = current()
            if rank is not None:
                plan.add_stored_fields(conn, table, rank=rank, key=config.key, audience_id=audience_id)
            add_events(None)
            stage_mod.drop_stage(conn, stage)
            return report
        counts = plan.preview_counts(conn, stage, audience_id, members=members, valued=True)
        held = None if allow_removals else removal_guard(config)(counts)
        count_refresh(report, counts, stats)
        note_fields(report, fields)
        if held is not None:
            report.status, report.error = "held", held
            log.error("audience %r held: %s", config.key, held)
            report.pending = current()
            if rank is not None:
                plan.add_stored_fields(conn, table, rank=rank, key=config.key, audience_id=audience_id)
            add_events(None)
        else:
            report.status = "planned"
            report.pending = plan.add_applied(
                conn,
                table,
                key=config.key,
                audience_id=plan_id,
                stage=stage,
                full=full,
                now=now,
                trait=config.kind == "trait",
                missing=config.missing,
            )
            add_events(stage)
            if rank is not None:
                plan.add_staged_fields(conn, table, rank=rank, key=config.key, stage=stage)
        stage_mod.drop_stage(conn, stage)
        return report


def _first_calls(block: PlannedRows, room: int | None) -> PlannedRows:
    """The block's rows of its first ``room`` calls (None: all of them)."""
    if room is None or block.calls <= room:
        return block
    starts, previous = 0, block.rows[0][0] if block.continues else None
    for end, (user_id, _, _) in enumerate(block.rows):
        if user_id != previous:
            if starts == room:
                return PlannedRows(block.rows[:end], room, block.continues)
            starts, previous = starts + 1, user_id
    return block


def _audience_id(conn: Connection, key: str) -> int | None:
    found: int | None = conn.execute(sa.select(audiences.c.id).where(audiences.c.key == key)).scalar()
    return found
