"""The command line: `audiencesync COMMAND ...`, one module per command group.

Owns parsing the arguments, loading the config, calling the library and mapping each
error to an exit status (``main``, the entry point), and how the command line writes
things: tables, csv/json/jsonl (``formats``, ``tables``; a dry run's calls as rows,
``call_listing``), TIME arguments (``times``),
the --help texts (``help``). It only wires: no command decides anything itself.

May import every package below it (daemon, sync, web, alerts, lifecycle, delivery,
refresh, store, gleap, config) and the top-level leaves. Nothing imports it but
``audiencesync.__main__`` and the ``audiencesync`` script.
"""
