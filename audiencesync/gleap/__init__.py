"""Gleap's admin API: the client, its HTTP rules, the rate limit and the circuit breaker.

Owns the identify and track calls and contact deletions with retries and concurrency
(``client``), what each call carries: paths, query string, bodies (``api``), which
statuses are retried and how Retry-After is read (``http``), the shared token bucket
(``ratelimit``) and the breaker that stops a pass when Gleap is down
(``breaker``). Knows nothing of the store.

May import config and the top-level leaves. Imported by store (what one try answered),
delivery, lifecycle, sync, the daemon and the cli.
"""
