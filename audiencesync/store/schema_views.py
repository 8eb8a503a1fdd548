"""The analysts' views, described for queries: audience_members, membership_history, call_log, run_history.

Apart from ``schema.py`` because they are not the store's tables: the
migrations create them (0005, then 0006) as SQL over those tables, for
analysts to query (docs/schema.md documents them, and a test checks that it
names every column). ``audit`` reads them.
"""

from __future__ import annotations

import sqlalchemy as sa

from audiencesync.store.utc_time import UtcDateTime

# ``sa.table`` keeps them out of ``metadata``: the migrations create them, and
# nothing may ever try to create a table by their names.
audience_members_view = sa.table(
    "audience_members",
    sa.column("audience_key", sa.String),
    sa.column("user_id", sa.String),
    sa.column("since", UtcDateTime),
)

membership_history_view = sa.table(
    "membership_history",
    sa.column("audience_key", sa.String),
    sa.column("audience_kind", sa.String),
    sa.column("user_id", sa.String),
    sa.column("change", sa.String),
    sa.column("value", sa.Text),
    sa.column("at", UtcDateTime),
    sa.column("run_id", sa.Integer),
    sa.column("acknowledged_at", UtcDateTime),
    sa.column("delivery_state", sa.String),
    sa.column("last_status", sa.Integer),
    sa.column("last_error", sa.Text),
)

call_log_view = sa.table(
    "call_log",
    sa.column("call_id", sa.Integer),
    sa.column("run_id", sa.Integer),
    sa.column("audience_key", sa.String),
    sa.column("audience_kind", sa.String),
    sa.column("user_id", sa.String),
    sa.column("value", sa.Boolean),
    sa.column("data", sa.Text),
    sa.column("attempt", sa.Integer),
    sa.column("at", UtcDateTime),
    sa.column("elapsed_ms", sa.Integer),
    sa.column("status", sa.Integer),
    sa.column("outcome", sa.String),
    sa.column("error", sa.Text),
)

run_history_view = sa.table(
    "run_history",
    sa.column("audience_key", sa.String),
    sa.column("audience_kind", sa.String),
    sa.column("run_id", sa.Integer),
    sa.column("cycle_id", sa.String),
    sa.column("mode", sa.String),
    sa.column("status", sa.String),
    sa.column("started_at", UtcDateTime),
    sa.column("finished_at", UtcDateTime),
    *(
        sa.column(name, sa.Integer)
        for name in (
            "source_rows",
            "members",
            "users_entered",
            "users_left",
            "users_changed",
            "skipped_rows",
            "duplicate_rows",
            "sent",
            "failed",
            "unknown",
            "retries",
            "rate_limited",
            "pending_after",
            "parked_after",
            "unknown_after",
            "events_sent",
            "events_failed",
            "field_warnings",
            "field_conflicts",
        )
    ),
    sa.column("error", sa.Text),
)

VIEWS = (audience_members_view, membership_history_view, call_log_view, run_history_view)
