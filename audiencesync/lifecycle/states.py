"""Where each key of the store stands against the config: live, paused, renamed or retired.

One reading for `status` (its sections), /metrics (``audiencesync_property_info``'s
``state``) and `retire` (which refuses a key the config still uses):

- ``live``: configured and enabled; refreshed and delivered.
- ``paused``: configured with ``enabled = false``. Its rows stay as they are (members,
  pending changes, history); nothing refreshes it, and no delivery pass carries its
  rows, not even in another property's call. ``enabled = true`` resumes it where it
  left off: an incremental refresh, and what it owed goes out.
- ``renamed``: an old key in a configured property's ``previous_keys`` (renames.py),
  delivered with that property.
- ``retired``: in the store and in no config. Nothing refreshes or delivers it;
  `audiencesync retire KEY` removes its state (retire.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from audiencesync.config.loading import Config

LIVE = "live"
PAUSED = "paused"
RENAMED = "renamed"
RETIRED = "retired"


def states(config: Config) -> dict[str, str]:
    """The state of every key the config names (any other key in the store is retired)."""
    found: dict[str, str] = {}
    for prop in config.properties:
        found[prop.key] = LIVE if prop.enabled else PAUSED
    for prop in config.properties:
        for old in prop.previous_keys:
            found.setdefault(old, RENAMED)
    return found


def state_of(key: str, known: Mapping[str, str]) -> str:
    return known.get(key, RETIRED)


def owner_of(config: Config, key: str) -> str | None:
    """The configured property whose ``previous_keys`` list ``key``, if any."""
    for prop in config.properties:
        if key in prop.previous_keys:
            return prop.key
    return None
