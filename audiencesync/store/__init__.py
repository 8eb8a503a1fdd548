"""The membership store: its schema, its engines, and every query on it.

Owns the tables and views as SQLAlchemy metadata (``schema``, ``schema_views``; the
database schema itself is the Alembic migrations' in ``migrations/``), its UTC time
column (``utc_time``), write transactions (``writes``), the engines and migrations
(``database``, ``drivers``), ``store.Store`` (audiences, memberships, runs; what a
delivery pass asks of it in ``delivery_queries``), a refresh's stage and diff
(``stage``, ``diff``), a dry run's plain calls read from its plan (``plan_rows``), the
pending read (``pending``, ``pending_since``, ``member_fields``), IN lists padded to a few
lengths (``in_lists``), the recording of Gleap's answers (``outcomes``, ``carried_keys``,
``field_acks``), the events outbox (``events``), runs (``runs``), the writer lease
(``lease``, ``lease_renewal``), admin requests (``requests``), and what `status`,
`failures` and the analysts' `audit` read (``status``, ``audit``).

May import gleap (the record of one try: ``outcomes`` keeps what Gleap answered), config
and the top-level leaves. Imported by every package above it.
"""
