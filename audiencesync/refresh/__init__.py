"""Reading an audience's members from its source: the refresh's side of a cycle.

Owns reading a source in batches (``sources``; its rows through the driver's own
cursor where that is safe, ``query_rows``), the user ids' one form and checks
(``user_ids``), cancelling a query at its timeout (``source_watchdog``), running the
query inside the store when the source is the store's own database (``pushdown``),
and the mass-removal guard (``guard``). The stage and diff
themselves run in the store's transaction (``store.stage``, ``store.diff``).

May import store, config and the top-level leaves; never delivery. Imported by sync,
the daemon and the cli.
"""
