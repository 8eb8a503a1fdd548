"""audiencesync: sync SQL-defined audience membership into Gleap.

The packages, each layer importing only those below it (checked by import-linter,
``[tool.importlinter]`` in pyproject.toml):

    cli        the command line
    daemon     `audiencesync run`: jobs, delivery loop, reload, health, metrics
    sync, web  one cycle and its dry run; the web status page (independent)
    alerts     what needs a person, and the webhooks told about it
    lifecycle  a key's states, renames, retire, forget, prune
    delivery, refresh   pending changes to Gleap; members from a source (independent)
    store      the membership store: schema, engines, queries, lease
    gleap      Gleap's admin API client
    config     the config file
    errors, values, keys, fields, backoff, failpoints, tls   shared leaves
"""

__version__ = "0.1.0"
