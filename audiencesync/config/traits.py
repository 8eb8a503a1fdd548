"""The config file's [[traits]]: computed values (a plan, a score, a date) sent as contact attributes.

A trait is configured as an audience is (config_audiences.entry_config: name,
key, source, query, schedule, removal guard), and its query returns
``user_id`` and ``value``. ``missing`` is what Gleap gets for a user who no
longer has a value; without it, ``null``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from audiencesync import values
from audiencesync.config.audiences import AUDIENCE_KEYS, AudienceConfig, entry_config
from audiencesync.config.sections import ScheduleConfig, SourceConfig, SyncConfig
from audiencesync.config.tomltable import Table

TRAIT_KEYS = (*AUDIENCE_KEYS, "missing")


def trait_configs(
    raw: list[Any],
    path: Path,
    sources: Mapping[str, SourceConfig],
    sync: SyncConfig,
    schedule: ScheduleConfig,
    seen: dict[str, str],
) -> tuple[AudienceConfig, ...]:
    """The [[traits]], as ``AudienceConfig``s of kind "trait"; ``seen`` holds the keys the
    audiences took (a trait may not reuse one)."""
    traits: list[AudienceConfig] = []
    for index, table in enumerate(raw, start=1):
        entry = Table(table, path, f"[[traits]] #{index}", list(TRAIT_KEYS))
        trait = entry_config(
            entry, "traits", index, sources=sources, sync=sync, schedule=schedule, seen=seen, kind="trait"
        )
        traits.append(dataclasses.replace(trait, missing=_missing(entry)))
    return tuple(traits)


def _missing(entry: Table) -> str | None:
    """The configured ``missing`` value as canonical JSON (values.canonical: a TOML
    datetime is a timestamp), or None when unset."""
    raw = entry.take_raw("missing")
    if raw is None:
        return None
    try:
        return values.encode(values.canonical(raw))
    except values.UnsupportedValue:
        raise entry.error(
            f"a {type(raw).__name__} can't be a trait's value",
            key="missing",
            fix="write a string, a number, a boolean or a date-time, or leave missing out to send null",
        ) from None
