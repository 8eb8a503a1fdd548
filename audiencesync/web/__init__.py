"""The web status page and the HTTP endpoint it is served on.

Owns the WSGI app (``app``: routing, the token, /healthz and /metrics handed in by the
caller), what each page reads from the store in one snapshot (``pages``), the charts
(``charts``), attention's banners and badges (``attention``), the threaded server
(``server``), and the Jinja2 ``templates`` and ``static`` files shipped as package data.
Read-only: nothing here writes to the store.

May import alerts (attention's verdicts), lifecycle (key states), store, config and the
top-level leaves. Imported by the daemon and the cli (`serve`); independent of sync.
"""
