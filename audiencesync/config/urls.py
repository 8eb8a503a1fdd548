"""Database URLs and the Gleap base URL: `${VAR}` expansion, validation, masking, loopback.

A database URL is expanded once, when the config is loaded, so the typed config
holds the real URL (the password included). Anything that shows a URL goes
through ``display_url``, and no error here quotes an expanded URL.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from audiencesync.errors import ConfigError

# Only the braced form: a bare "$" is common in passwords and must stay literal.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_IPV4_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_IPV6_LOOPBACK = ipaddress.ip_address("::1")
MASK = "***"


def resolve_url(url: str, *, config_path: Path, where: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}``s and validate a database URL; relative SQLite paths follow the config file."""
    expanded = expand_env(url, config_path=config_path, where=where, environ=environ)
    try:
        parsed = make_url(expanded)
    except ArgumentError:
        # SQLAlchemy's message quotes the URL; after expansion that may hold a password.
        raise ConfigError(
            "is not a valid database URL" + (" (after expanding ${...})" if expanded != url else ""),
            path=str(config_path),
            where=where,
            fix='write a SQLAlchemy URL such as "sqlite:///audiencesync.db" or '
            '"postgresql+psycopg://user:${PGPASSWORD}@host/db"; percent-encode special '
            "characters in a password",
        ) from None
    database = parsed.database
    if (
        parsed.get_backend_name() == "sqlite"
        and database
        and database != ":memory:"
        and not database.startswith("file:")
        and not Path(database).is_absolute()
    ):
        parsed = parsed.set(database=str((config_path.parent / database).resolve()))
    return parsed.render_as_string(hide_password=False)


def display_url(url: str) -> str:
    """A database URL fit to show: the password masked, in the userinfo and in the query."""
    try:
        parsed: URL = make_url(url)
    except ArgumentError:
        return "<an invalid database URL>"
    secret_params = {k: MASK for k in parsed.query if "password" in k.lower()}
    if secret_params:
        parsed = parsed.update_query_dict(secret_params)
    return parsed.render_as_string(hide_password=True)


def sqlite_file(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for another database, an in-memory one or a URI filename."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None  # a URI filename: its own mode= decides
    return Path(database)


def is_loopback(host: str) -> bool:
    """True for the name ``localhost`` and for IP literals in 127.0.0.0/8 or ::1; no DNS lookups."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: "127.example.com" is not loopback, whatever it resolves to
    if isinstance(address, ipaddress.IPv4Address):
        return address in _IPV4_LOOPBACK
    return address == _IPV6_LOOPBACK


def check_base_url(base_url: str, *, allow_http: bool, config_path: Path, where: str) -> None:
    """Refuse a base_url that is not http(s), or plain http to anything but loopback (unless allowed)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "must be an http(s) URL",
            path=str(config_path),
            where=where,
            fix='write base_url = "https://api.gleap.io"',
        )
    if parts.scheme == "http" and not allow_http and not is_loopback(parts.hostname):
        raise ConfigError(
            f"is plain http to a remote host ({parts.hostname!r}; loopback is 127.0.0.0/8, ::1 or "
            "localhost), which would send the API token unencrypted",
            path=str(config_path),
            where=where,
            fix="use https, or set allow_http = true for an on-premise Gleap on a trusted network",
        )


def expand_env(text: str, *, config_path: Path, where: str, environ: Mapping[str, str]) -> str:
    """``text`` with each ``${VAR}`` replaced by the variable's value; an unset one is a ConfigError."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(
                f"the environment variable {name!r} (written ${{{name}}}) is not set",
                path=str(config_path),
                where=where,
                fix=f"export {name}=... in the environment audiencesync runs in "
                "(e.g. a systemd EnvironmentFile), or remove the reference",
            )
        return environ[name]

    return _VARIABLE.sub(value, text)
