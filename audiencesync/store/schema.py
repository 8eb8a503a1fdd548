"""The membership store's tables, as SQLAlchemy Core metadata.

The database schema itself is created only by the Alembic migrations in
``migrations/``; this module mirrors it for queries, and a test checks that
the two agree.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from audiencesync.store.utc_time import UtcDateTime

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


# A change is pending while Gleap has not acknowledged the current value, while
# an admin's full resend is owed, or while a call's outcome is unknown (Gleap
# may hold either value, so the latest must be sent and acknowledged). Kept as a
# generated column so it can never drift from the values it is derived from,
# and so it can be indexed. A member whose value (a trait's, an audience's contact
# fields) differs from the acknowledged one is pending too. Migration 0006 spells
# the null-safe comparison per database (SQLite: IS NOT); this is PostgreSQL's.
PENDING_EXPR = (
    "resend OR unknown OR desired <> coalesce(acked, false) "
    "OR (desired AND value IS DISTINCT FROM acked_value)"
)

# What a row of ``audiences`` defines: an audience (a boolean per user) or a trait
# (a value per user).
KINDS = ("audience", "trait")

audiences = sa.Table(
    "audiences",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(255), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, server_default="audience"),  # audience | trait
    # A trait's value for a user who has none (canonical JSON, from its config); NULL: null.
    sa.Column("missing", sa.Text, nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    # Set by the first refresh that succeeded: before it, a sync is the initial full sync.
    sa.Column("refreshed_at", UtcDateTime, nullable=True),
    # When the daemon will refresh it next (shown by `status`); NULL when no daemon schedules it.
    sa.Column("next_run_at", UtcDateTime, nullable=True),
    # An audience's place in the config when the winning contact fields were last reconciled
    # (field_winners.py): the first audience in the config that gives a field wins, so a change of
    # this order can change what Gleap must hold. NULL: not configured then (or a trait).
    sa.Column("field_rank", sa.Integer, nullable=True),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("audiences.id"), primary_key=True),
    sa.Column("user_id", sa.String(255), primary_key=True),
    # What the source says now.
    sa.Column("desired", sa.Boolean, nullable=False),
    # The last value Gleap acknowledged with a 2xx; NULL when Gleap was never told.
    sa.Column("acked", sa.Boolean, nullable=True),
    # Canonical JSON (values.encode) the row carries while desired: a trait's value,
    # an audience member's contact fields; NULL when not desired or valueless.
    sa.Column("value", sa.Text, nullable=True),
    # The value Gleap acknowledged with the last 2xx.
    sa.Column("acked_value", sa.Text, nullable=True),
    sa.Column("resend", sa.Boolean, nullable=False, server_default=sa.false()),
    # A call for this row was sent (or about to be) and no verdict came back:
    # set before the call goes out, cleared only by a 2xx or a clear rejection.
    sa.Column("unknown", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("pending", sa.Boolean, sa.Computed(PENDING_EXPR, persisted=True)),
    sa.Column("changed_at", UtcDateTime, nullable=False),
    # When its pending change was made (entry, exit, a new value, a resend owed): the oldest
    # pending age counts from it. Meaningful only while pending (pending_since.py, 0013).
    sa.Column("pending_since", UtcDateTime, nullable=True),
    sa.Column("acked_at", UtcDateTime, nullable=True),
    # Rejections (verdicts) of the current value; at max_attempts the change is parked.
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # Failed deliveries of the current value of any kind, for the per-user backoff.
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    # Not before this time: the backoff after a failure. NULL: as soon as possible.
    sa.Column("next_attempt_at", UtcDateTime, nullable=True),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    # Set when a change failed permanently max_attempts times: no run retries it
    # until an admin re-queues it (`audiencesync retry`).
    sa.Column("parked_at", UtcDateTime, nullable=True),
    sa.Index(
        "ix_memberships_pending",
        "user_id",
        "audience_id",
        sqlite_where=sa.text("pending = 1"),
        postgresql_where=sa.text("pending"),
    ),
    # An audience's oldest deliverable change is the first entry of its range.
    sa.Index(
        "ix_memberships_oldest_pending",
        "audience_id",
        "pending_since",
        sqlite_where=sa.text("pending = 1 AND parked_at IS NULL"),
        postgresql_where=sa.text("pending AND parked_at IS NULL"),
    ),
    # Only the deliverable rows waiting out a backoff: what is due is pending minus these.
    sa.Index(
        "ix_memberships_backoff",
        "audience_id",
        "next_attempt_at",
        sqlite_where=sa.text("pending = 1 AND parked_at IS NULL AND next_attempt_at IS NOT NULL"),
        postgresql_where=sa.text("pending AND parked_at IS NULL AND next_attempt_at IS NOT NULL"),
    ),
    # Lookups by user alone (forget, retry --user): the primary key leads with the audience.
    sa.Index("ix_memberships_user_id", "user_id"),
    # An audience's parked changes, for the web page's list: only those rows (0009).
    sa.Index(
        "ix_memberships_parked",
        "audience_id",
        "user_id",
        sqlite_where=sa.text("pending = 1 AND parked_at IS NOT NULL"),
        postgresql_where=sa.text("pending AND parked_at IS NOT NULL"),
    ),
)

# What Gleap acknowledged, per user and contact field: the value (canonical JSON) the last call
# answered 2xx carried, written in the transaction that records that answer (migration 0012). A
# user is owed a field while the value that wins for them now (the first audience in the config
# that gives it) differs from this one, or is missing here.
contact_fields = sa.Table(
    "contact_fields",
    metadata,
    sa.Column("user_id", sa.String(255), primary_key=True),
    sa.Column("field", sa.String(255), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("acked_at", UtcDateTime, nullable=False),
)

# Per audience, counts of its memberships and events rows, kept by triggers (migration 0008) in the
# transaction of every write to them, so they never drift from the rows: `status`,
# /metrics and /healthz read these instead of counting millions of rows. Each counts the
# rows that the condition of the same name in status.py (events.py: events_*) selects.
audience_counts = sa.Table(
    "audience_counts",
    metadata,
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("audiences.id"), primary_key=True),
    sa.Column("members", sa.BigInteger, nullable=False, server_default="0"),  # desired
    sa.Column("pending", sa.BigInteger, nullable=False, server_default="0"),  # DELIVERABLE
    sa.Column("parked", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("unknown", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("fields_pending", sa.BigInteger, nullable=False, server_default="0"),  # FIELDS_OWED
    # Its events: owed (not acknowledged, not parked), and parked.
    sa.Column("events_pending", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("events_parked", sa.BigInteger, nullable=False, server_default="0"),
)

sync_runs = sa.Table(
    "sync_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cycle_id", sa.String(36), nullable=False, index=True),
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("audiences.id"), nullable=False),
    # initial | incremental | full | delivery (no refresh: pending changes only) | retire (retire.py)
    sa.Column("mode", sa.String(16), nullable=False),
    # running | succeeded | partial | held | failed | aborted | interrupted
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("source_rows", sa.Integer, nullable=False, server_default="0"),
    sa.Column("members", sa.Integer, nullable=False, server_default="0"),
    sa.Column("entered", sa.Integer, nullable=False, server_default="0"),
    sa.Column("left", sa.Integer, nullable=False, server_default="0"),
    sa.Column("changed", sa.Integer, nullable=False, server_default="0"),  # members with a new value
    sa.Column("skipped_rows", sa.Integer, nullable=False, server_default="0"),
    sa.Column("duplicate_rows", sa.Integer, nullable=False, server_default="0"),
    sa.Column("sent", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unknown", sa.Integer, nullable=False, server_default="0"),  # calls with no verdict
    # What the audience still owed Gleap when the run closed.
    sa.Column("pending_after", sa.Integer, nullable=False, server_default="0"),  # not parked
    sa.Column("parked_after", sa.Integer, nullable=False, server_default="0"),
    sa.Column("unknown_after", sa.Integer, nullable=False, server_default="0"),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rate_limited", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text, nullable=True),
    # Audience Entered / Exited events this run delivered (2xx), and that failed.
    sa.Column("events_sent", sa.Integer, nullable=False, server_default="0"),
    sa.Column("events_failed", sa.Integer, nullable=False, server_default="0"),
    # Contact fields its read skipped (wrong type), and its delivery sent with an earlier audience's value.
    sa.Column("field_warnings", sa.Integer, nullable=False, server_default="0"),
    sa.Column("field_conflicts", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_sync_runs_audience_id_started_at", "audience_id", "started_at"),
)

_CHANGES_BY_USER = ("audience_id", "user_id", "id", "at", "change")
_CHANGES_BY_TIME = ("audience_id", "at", "change", "user_id", "id", "entered_at")

membership_changes = sa.Table(
    "membership_changes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("audiences.id"), nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("sync_runs.id"), nullable=False, index=True),
    sa.Column("change", sa.String(8), nullable=False),  # entered | left | changed
    # The new value (canonical JSON) of an entry or a change; NULL for a departure.
    sa.Column("value", sa.Text, nullable=True),
    sa.Column("at", UtcDateTime, nullable=False),
    # A departure's entry: the ``at`` of the ``entered`` it closes (migration 0015); NULL for any
    # other change, and once that entry is pruned. The members at an instant T are the members
    # now who entered by T and the departures after T whose entry is no later: one range.
    sa.Column("entered_at", UtcDateTime, nullable=True),
    # A user's change before or after another, by id, from the index alone (its kind too): the
    # membership_history view's next change, a prune's departure closing an entry (0014).
    sa.Index("ix_membership_changes_audience_id_user_id_id_at_change", *_CHANGES_BY_USER),
    # Members at an instant read the departures after it, with their entries' times, from the
    # index alone (0014, 0015); the audit's diff reads the changes in between from it. Named,
    # as the convention's name would pass PostgreSQL's 63 characters.
    sa.Index("ix_membership_changes_by_time", *_CHANGES_BY_TIME),
    # A user's timeline reads theirs.
    sa.Index("ix_membership_changes_user_id_at", "user_id", "at"),
)

# The outbox of Audience Entered / Exited events (POST /admin/track): made in the
# refresh's transaction from its entered/left changes, for audiences with events
# on, and kept with their delivery state. The name and the audience's name are
# those of when the change was seen: a later rename of the setting does not
# rewrite history, nor what an unsent event says.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("audiences.id"), nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("sync_runs.id"), nullable=False, index=True),
    sa.Column("change", sa.String(8), nullable=False),  # entered | left
    sa.Column("name", sa.String(255), nullable=False),  # the event's name, as sent
    sa.Column("audience_name", sa.String(255), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),  # when the change was seen: the event's date
    # A request carrying it went out (or is about to) and no verdict came back.
    sa.Column("unknown", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("sends", sa.Integer, nullable=False, server_default="0"),  # requests that carried it
    sa.Column("sent_at", UtcDateTime, nullable=True),  # when the last of them went out
    sa.Column("acked_at", UtcDateTime, nullable=True),  # a 2xx of a request that carried it
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),  # rejections
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),  # for the backoff
    sa.Column("next_attempt_at", UtcDateTime, nullable=True),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("parked_at", UtcDateTime, nullable=True),
    sa.Index("ix_events_user_id_id", "user_id", "id"),
    sa.Index("ix_events_acked_at", "acked_at"),
    # What is still owed: the delivery pass reads it by id, a short index however long the history.
    sa.Index(
        "ix_events_unsent",
        "id",
        sqlite_where=sa.text("acked_at IS NULL AND parked_at IS NULL"),
        postgresql_where=sa.text("acked_at IS NULL AND parked_at IS NULL"),
    ),
    # An audience's parked events, for the web page's list (0009).
    sa.Index(
        "ix_events_parked",
        "audience_id",
        "id",
        sqlite_where=sa.text("parked_at IS NOT NULL AND acked_at IS NULL"),
        postgresql_where=sa.text("parked_at IS NOT NULL AND acked_at IS NULL"),
    ),
)

# What Gleap was told: one row per HTTP request sent (or tried) to Gleap's
# identify endpoint, retries included, so that an admin can show exactly what
# Gleap received and when. A call refused for the token (401/403) stops the
# run and is not logged here; the run's error says so.
calls = sa.Table(
    "calls",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.String(255), nullable=False),
    # 1 for a call's first request, 2... for its retries within the run.
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),  # when the request went out
    sa.Column("elapsed_ms", sa.Integer, nullable=True),
    sa.Column("status", sa.Integer, nullable=False),  # Gleap's HTTP status; 0: no answer
    # acknowledged (2xx) | rejected (a verdict: 4xx but 408/429) | unknown (no
    # verdict: Gleap may have applied it) | rate_limited (429: not applied, tried
    # again later) | not_sent (the connection failed before the request left)
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),  # Gleap's text, or what went wrong
    sa.Index("ix_calls_user_id_at", "user_id", "at"),
    sa.Index("ix_calls_at", "at"),
)

# The keys and values one call carried: one row per audience.
call_values = sa.Table(
    "call_values",
    metadata,
    sa.Column("call_id", sa.Integer, sa.ForeignKey("calls.id"), primary_key=True),
    sa.Column("audience_id", sa.Integer, sa.ForeignKey("audiences.id"), primary_key=True),
    # The audience's run that sent it (one call may carry several audiences' runs).
    sa.Column("run_id", sa.Integer, sa.ForeignKey("sync_runs.id"), nullable=False, index=True),
    sa.Column("value", sa.Boolean, nullable=False),  # the membership: desired as sent
    sa.Column("data", sa.Text, nullable=True),  # the JSON value sent (a trait's, contact fields)
)

# Each `prune`: history older than ``before`` was deleted, so nothing before
# it can be rebuilt exactly.
prunes = sa.Table(
    "prunes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("before", UtcDateTime, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime, nullable=True),  # NULL: interrupted, or still running
    sa.Column("by", sa.String(16), nullable=False),  # daemon | cli
    sa.Column("calls", sa.Integer, nullable=False, server_default="0"),
    sa.Column("changes", sa.Integer, nullable=False, server_default="0"),
    sa.Column("runs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
    sa.Column("events", sa.Integer, nullable=False, server_default="0"),
)

# One row per named lease. The writer lease makes sure that only one process
# changes a store at a time; a holder that dies stops renewing it, and it
# expires.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(255), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("acquired_at", UtcDateTime, nullable=False),
    sa.Column("renewed_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    # "daemon" (audiencesync run) or "sync" (a one-shot run): an admin command
    # asks a daemon to act for it instead of waiting for the lease.
    sa.Column("role", sa.String(16), nullable=False, server_default="sync"),
    # The holder's PID namespace and boot, so "pid N is gone" is only believed
    # of a process that this host's kernel would show.
    sa.Column("instance", sa.String(255), nullable=False, server_default=""),
    # The daemon's own view of its health, for `status` in another process.
    sa.Column("health", sa.Text, nullable=True),
    sa.Column("progress_at", UtcDateTime, nullable=True),  # the last acknowledged call
)

# Admin actions asked of a running daemon (release a held audience, full resync, forget users).
# The command that asks waits for ``state`` to leave pending/running.
admin_requests = sa.Table(
    "admin_requests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # refresh | release | full | release+full | forget | forget+gleap
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("audience_key", sa.String(255), nullable=False),
    sa.Column("requested_at", UtcDateTime, nullable=False),
    sa.Column("requested_by", sa.String(255), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # pending | running | done | failed
    sa.Column("started_at", UtcDateTime, nullable=True),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("sync_runs.id"), nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Index("ix_admin_requests_state", "state"),
)

# The users of a `forget` queued for a running daemon (an admin request of kind forget):
# its work list, not the users' data. The daemon deletes each user's row in the
# transaction that deletes their store rows; the rows left name the users it could
# not forget (outcome), until the asking command has read them.
forget_users = sa.Table(
    "forget_users",
    metadata,
    sa.Column(
        "request_id", sa.Integer, sa.ForeignKey("admin_requests.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("user_id", sa.String(255), primary_key=True),
    # NULL: still to do; unknown | refused | not_attempted: kept, and why.
    sa.Column("outcome", sa.String(16), nullable=True),
)


# One row per alert condition open now (alerts.py): inserted when it starts, deleted when it
# ends, so that each is told once even by `sync` run from cron. No user ids: a forgotten
# user must not linger here.
alert_conditions = sa.Table(
    "alert_conditions",
    metadata,
    sa.Column("kind", sa.String(32), primary_key=True),  # an event name of config_alerts.EVENTS
    sa.Column("subject", sa.String(255), primary_key=True),  # an audience key, "gleap", a host
    sa.Column("opened_at", UtcDateTime, nullable=False),
    sa.Column("notified_at", UtcDateTime, nullable=False),  # the last message about it
    sa.Column("summary", sa.Text, nullable=False),  # what the opening message said
)

# Owed to Gleap and not parked: what `status`, the summary and /metrics call pending.
DELIVERABLE = sa.and_(memberships.c.pending == sa.true(), memberships.c.parked_at.is_(None))


def due(table: sa.FromClause, now: datetime | sa.BindParameter[datetime]) -> sa.ColumnElement[bool]:
    """Deliverable now: pending, not parked, and past its backoff."""
    return sa.and_(
        table.c.pending == sa.true(),
        table.c.parked_at.is_(None),
        sa.or_(table.c.next_attempt_at.is_(None), table.c.next_attempt_at <= now),
    )
