"""audiencesync: sync SQL-defined audience membership into Gleap."""

__version__ = "0.1.0"
