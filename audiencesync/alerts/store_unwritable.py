"""``store_unwritable``: the writer lease's renewals keep failing, so the store can't be written.

While the store is locked (another process's long write transaction on SQLite, a lock past
``lock_timeout`` on PostgreSQL) or can't be written at all (a full disk), the heartbeat's
renewals fail (``store/lease_renewal.py``), and near the lease's expiry delivery pauses
(``LeaseUnrenewedError``). The daemon knows it from its heartbeat: since when, and in the
database's words (``Local.unrenewed``). Another process is never told: the heartbeat that
would write "unhealthy (store_unwritable): ..." into the lease row is itself a renewal, and
none gets through while this lasts. What it sees is the row's ``renewed_at`` standing still,
which is all ``of_holder`` goes by.

A daemon-wide state of severity ``failing`` (``/healthz`` 503, as for ``gleap_down``), but only
past a grace of a third of the TTL (``GRACE_OF_TTL``). A shorter lock is ordinary and costs
nothing: the heartbeat retries every twentieth of the TTL, and a lock of up to ~80% of it
keeps the lease (this process's own large write on SQLite, a VACUUM, a backup). A grace of one
renewal interval (an eighth: 7.5 s at the default 60 s) would flap the health check on those.
A third still comes well before delivery pauses (after at least about two thirds of the TTL
of failed renewals, ``send_margin`` before the expiry), so the probe and a person hear of it
while the lease can be saved; it is also when the heartbeat logs its second warning (one per
third of the TTL). It ends with the first renewal that goes through.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from audiencesync.alerts.attention_states import ACTIONS, STORE_UNWRITABLE, Concern
from audiencesync.errors import iso_time
from audiencesync.store.lease_renewal import Cadence, Failing

GRACE_OF_TTL = 1 / 3


def grace(ttl_seconds: float) -> float:
    """How long renewals may fail before the store counts as unwritable, in seconds."""
    return ttl_seconds * GRACE_OF_TTL


def of_daemon(
    unrenewed: Failing | None, ttl_seconds: float, expires_at: datetime | None, now: datetime
) -> Concern | None:
    """This daemon's own: its heartbeat's renewals failing (``unrenewed``, None since the last
    went through) for longer than the grace."""
    if unrenewed is None:
        return None
    failing_for = (now - unrenewed.since).total_seconds()
    if failing_for <= grace(ttl_seconds):
        return None
    until = f" at {iso_time(expires_at)}" if expires_at is not None else ""
    return Concern(
        STORE_UNWRITABLE,
        None,
        f"the store can't be written: the lease's renewals have been failing for {failing_for:.0f} s "
        f"({unrenewed.reason}); delivery pauses before the lease would expire{until}",
        ACTIONS[STORE_UNWRITABLE],
        unrenewed.since,
    )


def of_holder(holder: Mapping[str, Any], now: datetime) -> Concern | None:
    """Another process's holder, from its lease row alone: not renewed for a renewal interval
    and the grace. From outside, a store it can't write looks like a holder stuck (or gone
    without releasing): the reason says both."""
    renewed, expires = holder.get("renewed_at"), holder.get("expires_at")
    if renewed is None or expires is None or expires <= renewed:
        return None
    ttl = (expires - renewed).total_seconds()  # each renewal pushes the expiry one TTL on
    interval = Cadence.of(ttl).interval
    unrenewed_for = (now - renewed).total_seconds()
    if unrenewed_for <= interval + grace(ttl):
        return None
    return Concern(
        STORE_UNWRITABLE,
        None,
        f"the store can't be written, or {holder.get('host')} pid {holder.get('pid')} is stuck: it "
        f"has not renewed the store's lease for {unrenewed_for:.0f} s (it renews every "
        f"{interval:.3g} s); delivery pauses before the lease would expire at {iso_time(expires)}",
        ACTIONS[STORE_UNWRITABLE],
        renewed,
    )
