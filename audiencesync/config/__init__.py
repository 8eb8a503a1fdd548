"""The config file: loading and validating it into frozen, typed objects, and the starter.

Owns loading (``loading``: ``load_config``, ``Config``), each table (``sections``,
``audiences``, ``traits``, ``alerts``), reading one TOML table (``tomltable``), database
and Gleap URLs (``urls``), secrets that never show themselves (``secret``) and the
starter config `init` writes (``starter``).

May import only the top-level leaves (errors, keys, fields, values). Imported by every
package.
"""
