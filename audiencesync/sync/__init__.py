"""One sync cycle, and its dry run: refresh each audience's snapshot, then deliver.

Owns ``cycle`` (what `sync` and each daemon job run), ``dry_run`` with its plan of the
calls and events a sync would make (``plan``, read back into calls by ``plan_calls``,
and ``plan_events``; for a listing, ``plan_listing`` merges the plain calls the store
reads as the plan's rows with the others built), and what a cycle reports (``reports``).

May import alerts, lifecycle (renames), delivery, refresh, store, gleap, config and the
top-level leaves. Imported by the daemon and the cli; never by web (a status page
never runs a cycle).
"""
