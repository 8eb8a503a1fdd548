"""A key's lifecycle in the store: live, paused, renamed, retired, and forgetting and pruning.

Owns where each key stands against the config (``states``), renames through
``previous_keys`` (``renames``), `retire` (``retire``), forgetting users for privacy
requests and its queue for a running daemon (``forget``, ``forget_requests``), and the
retention rules and batches of a prune (``prune``, ``prune_rules``).

May import delivery (retire's last calls), store, gleap (forget's contact deletions),
config and the top-level leaves. Imported by alerts, sync, web, the daemon and the cli.
"""
