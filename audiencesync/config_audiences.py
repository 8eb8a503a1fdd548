"""The config file's [[audiences]]: what each audience reads, and how it is checked."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiencesync.config_sections import ScheduleConfig, SourceConfig, SyncConfig, fraction
from audiencesync.keys import key_for_name, key_problem
from audiencesync.tomltable import Table


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
    # "trait" for a [[traits]] entry (config_traits.py): its query gives a value per user.
    kind: str = "audience"
    missing: str | None = None  # a trait's value (canonical JSON) for users without one; None: null


AUDIENCE_KEYS = (
    "name",
    "key",
    "source",
    "query",
    "max_removal_fraction",
    "allow_empty",
    "interval",
    "jitter",
)


def audience_configs(
    raw: list[Any],
    path: Path,
    sources: Mapping[str, SourceConfig],
    sync: SyncConfig,
    schedule: ScheduleConfig,
) -> tuple[AudienceConfig, ...]:
    audiences: list[AudienceConfig] = []
    seen: dict[str, str] = {}
    for index, table in enumerate(raw, start=1):
        audience_t = Table(table, path, f"[[audiences]] #{index}", list(AUDIENCE_KEYS))
        name = audience_t.take("name", str, required=True).strip()
        if name:
            audience_t.where = f"[[audiences]] #{index} ({name!r})"
        else:
            raise audience_t.error("the name is empty", key="name", fix="give the audience a name")
        explicit_key = audience_t.take_optional("key", str)
        key = explicit_key if explicit_key is not None else key_for_name(name)
        problem = key_problem(key)
        if problem:
            fix = (
                'set an explicit key, e.g. key = "my_audience"'
                if explicit_key is None
                else "use lowercase letters, digits and single underscores, not a Gleap contact field"
            )
            raise audience_t.error(problem, key="key" if explicit_key is not None else "name", fix=fix)
        if key in seen:
            raise audience_t.error(
                f"the key {key!r} is already used by audience {seen[key]!r}",
                fix="rename one audience or give it an explicit, different key",
            )
        seen[key] = name
        source = audience_t.take("source", str, required=True)
        if source not in sources:
            known = ", ".join(sources) or "none defined"
            raise audience_t.error(
                f"unknown source {source!r}",
                key="source",
                fix=f"use one of the [sources.NAME] tables ({known}) or add [sources.{source}]",
            )
        query = audience_t.take("query", str, required=True).strip()
        if not query:
            raise audience_t.error(
                "the query is empty", key="query", fix="write a SELECT that yields a user_id column"
            )
        audiences.append(
            AudienceConfig(
                name=name,
                key=key,
                source=source,
                query=query,
                max_removal_fraction=fraction(audience_t, sync.max_removal_fraction),
                allow_empty=audience_t.take("allow_empty", bool, False),
                interval=audience_t.take_duration("interval", schedule.interval),
                jitter=audience_t.take_duration("jitter", schedule.jitter, allow_zero=True),
            )
        )
    return tuple(audiences)
