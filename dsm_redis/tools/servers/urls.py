"""``DSM_TEST_DATABASE_URL`` and ``--database-url``: a URL to a Django ``DATABASES`` entry."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ...conf import split_host_port

_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "pgsql"})
_SQLITE_SCHEMES = frozenset({"sqlite", "sqlite3"})


def _split_netloc(netloc: str) -> tuple[str | None, str | None, str, str]:
    """``user:password@host:port`` → (user, password, host, port), percent-decoded."""
    userinfo, at, hostport = netloc.rpartition("@")
    user = password = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = unquote(raw_user)
        password = unquote(raw_password) if colon else None
    host, port = split_host_port(hostport)
    return user, password, unquote(host), port


def database_settings_from_url(url: str) -> dict[str, Any]:
    """A Django ``DATABASES`` entry from a database URL.

    - ``postgresql://user:pass@host:5432/name?sslmode=require`` (also ``postgres://``); a unix
      socket directory goes in ``?host=/path/to/dir`` or percent-encoded in place of the host.
      Query parameters ``host``, ``port``, ``user``, ``password`` and ``dbname`` override the
      URL's parts, as in libpq; any other parameter goes to ``OPTIONS``.
    - ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite://:memory:``
      (the dj-database-url conventions).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower().partition("+")[0]  # postgresql+psycopg:// is fine too
    if scheme in _SQLITE_SCHEMES:
        name = unquote(parts.path.removeprefix("/"))
        if parts.netloc == ":memory:" or not name:
            name = ":memory:"
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name}
    if scheme not in _POSTGRES_SCHEMES:
        raise ValueError(f"Unsupported database URL scheme {parts.scheme!r}: expected postgresql://... or sqlite://...")
    user, password, host, port = _split_netloc(parts.netloc)
    name = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "host":
            host = value
        elif key == "port":
            port = value
        elif key == "user":
            user = value
        elif key == "password":
            password = value
        elif key == "dbname":
            name = value
        else:
            options[key] = value
    settings: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name or user or "postgres",  # libpq's default database is the user's name
        "USER": user or "",
        "PASSWORD": password or "",
        "HOST": host,
        "PORT": port,
    }
    if options:
        settings["OPTIONS"] = options
    return settings
