"""Alerts, and attention: what needs a person, and telling the webhooks about it.

Owns the one reading of what needs a person (``attention``, ``attention_states``), which
`status`, /healthz, /metrics and the web page all show; the store's open alert
conditions (``conditions``); deciding when a condition opens or closes (``alerts``);
the messages (``messages``) and their posting, off the sync's path (``sender``).

May import lifecycle (key states), store, config and the top-level leaves. Imported by
sync, web, the daemon and the cli.
"""
