"""The daemon, `audiencesync run`: ``scheduler.Daemon`` and the mixins it is made of.

Owns the long-running process: the writer lease's standby loop, the active period
while it holds the lease (``active_period``), one refresh job per audience
(``refresh_jobs``), the delivery thread (``delivery_loop``), the config reload on SIGHUP
(``reload``), admin requests from other processes (``admin``), the daily retention
(``retention``), /healthz (``health``, ``health_report``), /metrics (``metrics``), the
HTTP listener that follows the lease (``listener``), systemd's notify protocol
(``notify``) and malloc's arenas (``arenas``).

May import sync, web, alerts, lifecycle, delivery, refresh, store, gleap, config and
the top-level leaves. Imported only by the cli.
"""
