"""The config file's [[audiences]]: what each audience reads, and how it is checked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiencesync.config.sections import ScheduleConfig, SourceConfig, SyncConfig, fraction
from audiencesync.config.tomltable import Table
from audiencesync.errors import ConfigError
from audiencesync.keys import key_for_name, key_problem


@dataclass(frozen=True)
class AudienceConfig:
    name: str
    key: str
    source: str
    query: str
    max_removal_fraction: float = 0.5
    allow_empty: bool = False
    interval: float = ScheduleConfig.interval
    jitter: float = ScheduleConfig.jitter
    # Post "Audience Entered"/"Audience Exited" events for each change ([gleap] events by default).
    events: bool = False
    # "trait" for a [[traits]] entry (config_traits.py): its query gives a value per user.
    kind: str = "audience"
    missing: str | None = None  # a trait's value (canonical JSON) for users without one; None: null
    # Keys it was synced under before (renames.py): Gleap gets each one retired, once.
    previous_keys: tuple[str, ...] = ()
    # False: paused (lifecycle.py). Its store state stays as it is, and nothing refreshes or
    # delivers it until it is true again.
    enabled: bool = True


AUDIENCE_KEYS = (
    "name",
    "key",
    "source",
    "query",
    "max_removal_fraction",
    "allow_empty",
    "interval",
    "jitter",
    "events",
    "previous_keys",
    "enabled",
)


def audience_configs(
    raw: list[Any],
    path: Path,
    sources: Mapping[str, SourceConfig],
    sync: SyncConfig,
    schedule: ScheduleConfig,
    seen: dict[str, str] | None = None,
    *,
    events: bool = False,
) -> tuple[AudienceConfig, ...]:
    """The [[audiences]]; ``seen`` (key -> name) gathers the keys taken, across sections."""
    seen = {} if seen is None else seen
    return tuple(
        entry_config(
            Table(table, path, f"[[audiences]] #{index}", list(AUDIENCE_KEYS)),
            "audiences",
            index,
            sources=sources,
            sync=sync,
            schedule=schedule,
            seen=seen,
            events=events,
        )
        for index, table in enumerate(raw, start=1)
    )


def entry_config(
    entry: Table,
    section: str,
    index: int,
    *,
    sources: Mapping[str, SourceConfig],
    sync: SyncConfig,
    schedule: ScheduleConfig,
    seen: dict[str, str],
    kind: str = "audience",
    missing: str | None = None,
    events: bool = False,
) -> AudienceConfig:
    """One [[audiences]] or [[traits]] entry: what every synced property has (its name, key,
    source, query, schedule and removal guard). The keys of both sections share one namespace:
    a key names one custom attribute in Gleap."""
    name = entry.take("name", str, required=True).strip()
    if name:
        entry.where = f"[[{section}]] #{index} ({name!r})"
    else:
        raise entry.error("the name is empty", key="name", fix=f"give the {kind} a name")
    explicit_key = entry.take_optional("key", str)
    key = explicit_key if explicit_key is not None else key_for_name(name)
    problem = key_problem(key)
    if problem:
        fix = (
            f'set an explicit key, e.g. key = "my_{kind}"'
            if explicit_key is None
            else "use lowercase letters, digits and single underscores, not a Gleap contact field"
        )
        raise entry.error(problem, key="key" if explicit_key is not None else "name", fix=fix)
    if key in seen:
        raise entry.error(
            f"the key {key!r} is already used by {seen[key]}",
            fix=f"rename one of them or give the {kind} an explicit, different key",
        )
    seen[key] = f"{kind} {name!r}"
    source = entry.take("source", str, required=True)
    if source not in sources:
        known = ", ".join(sources) or "none defined"
        raise entry.error(
            f"unknown source {source!r}",
            key="source",
            fix=f"use one of the [sources.NAME] tables ({known}) or add [sources.{source}]",
        )
    query = entry.take("query", str, required=True).strip()
    if not query:
        columns = "user_id and value columns" if kind == "trait" else "a user_id column"
        raise entry.error("the query is empty", key="query", fix=f"write a SELECT that yields {columns}")
    return AudienceConfig(
        name=name,
        key=key,
        source=source,
        query=query,
        max_removal_fraction=fraction(entry, sync.max_removal_fraction),
        allow_empty=entry.take("allow_empty", bool, False),
        interval=entry.take_duration("interval", schedule.interval),
        jitter=entry.take_duration("jitter", schedule.jitter, allow_zero=True),
        kind=kind,
        missing=missing,
        # Only audiences have entries and exits; a [[traits]] table has no `events` key.
        events=entry.take("events", bool, events) if kind == "audience" else False,
        previous_keys=_previous_keys(entry, key),
        enabled=entry.take("enabled", bool, True),
    )


def _previous_keys(entry: Table, key: str) -> tuple[str, ...]:
    """``previous_keys``: each a valid key, not the property's own, listed once."""
    raw = entry.take("previous_keys", list, [])
    found: list[str] = []
    for old in raw:
        if not isinstance(old, str):
            raise entry.error(
                f"must be a list of strings, not one holding a {type(old).__name__}",
                key="previous_keys",
                fix='write previous_keys = ["old_key"]',
            )
        problem = key_problem(old)
        if problem:
            raise entry.error(
                f"previous key: {problem}",
                key="previous_keys",
                fix="write the key exactly as it was configured before the rename",
            )
        if old == key or old in found:
            raise entry.error(
                f"the previous key {old!r} is {'the current key' if old == key else 'listed twice'}",
                key="previous_keys",
                fix=f"remove {old!r} from previous_keys",
            )
        found.append(old)
    return tuple(found)


def check_previous_keys(properties: Sequence[AudienceConfig], path: Path) -> None:
    """Across all audiences and traits: a previous key is nobody's current key and belongs to
    one property only (a key names one custom attribute in Gleap: it can't be both retired and
    set, nor retired on behalf of two)."""
    current = {p.key: p for p in properties}
    owner: dict[str, AudienceConfig] = {}
    for prop in properties:
        for old in prop.previous_keys:
            where = f"[[{prop.kind}s]] ({prop.name!r}).previous_keys"
            if old in current:
                other = current[old]
                raise ConfigError(
                    f"{old!r} is a previous key of {prop.kind} {prop.name!r} and the key of "
                    f"{other.kind} {other.name!r}",
                    path=str(path),
                    where=where,
                    fix=f"remove {old!r} from previous_keys, or give {other.name!r} another key",
                )
            if old in owner:
                first = owner[old]
                raise ConfigError(
                    f"{old!r} is a previous key of both {first.kind} {first.name!r} and "
                    f"{prop.kind} {prop.name!r}",
                    path=str(path),
                    where=where,
                    fix=f"keep {old!r} in the previous_keys of the one it was renamed into",
                )
            owner[old] = prop
