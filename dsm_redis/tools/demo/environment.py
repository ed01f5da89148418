"""The run's environment: Django settings, a database of its own, its Redis keys.

The demo never touches data it did not create: it works in a database created for the run (and
dropped at the end) and under a Redis key prefix unique to the run (whose keys it deletes at the
end), so it is safe to point at servers that hold other data.
"""

from __future__ import annotations

import contextlib
from typing import Any

SERVER_ALIAS = "server"  # the database named in the URL: where CREATE/DROP DATABASE run


class DemoError(Exception):
    """The demo could not run; the message is meant for the user, as is."""


def demo_settings(database_url: str, redis_url: str, run_id: str) -> dict[str, Any]:
    """Django settings for the parent and every worker (passed to them as a plain dict)."""
    from dsm_redis.tools.servers import database_settings_from_url

    try:
        server = database_settings_from_url(database_url)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    if server["ENGINE"] != "django.db.backends.postgresql":
        raise DemoError(
            f"the demo needs PostgreSQL (processes racing on row locks); got {database_url.split(':')[0]}://"
        )
    return {
        "INSTALLED_APPS": ["django.contrib.contenttypes", "dsm_redis", "dsm_redis.tools.demo"],
        "DATABASES": {"default": {**server, "NAME": f"dsm_redis_demo_{run_id}"}, SERVER_ALIAS: server},
        "DSM_REDIS": {"LOCATION": redis_url, "OPTIONS": {"KEY_PREFIX": f"dsm-demo-{run_id}"}},
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
    }


def prepare_database(settings_dict: dict[str, Any], objects: int, resources: contextlib.ExitStack) -> list[int]:
    """Configure Django, create and migrate the run's database (dropped on exit); the shared
    subscriptions' primary keys."""
    import django
    from django.conf import settings
    from django.core.management import call_command

    if settings.configured:
        raise DemoError("the demo configures Django itself: run it in a fresh process (python -m dsm_redis demo)")
    settings.configure(**settings_dict)
    django.setup()
    _create_database()
    resources.callback(_drop_database)
    call_command("migrate", verbosity=0, interactive=False)
    from .models import create_subscriptions

    return create_subscriptions(objects)


def _database_name() -> str:
    from django.db import connections

    return str(connections["default"].settings_dict["NAME"])


def _create_database() -> None:
    from django.db import DatabaseError, connections

    server = connections[SERVER_ALIAS]
    try:
        with server.cursor() as cursor:  # autocommit: CREATE DATABASE cannot run in a transaction
            cursor.execute(f"CREATE DATABASE {server.ops.quote_name(_database_name())}")
    except DatabaseError as exc:
        raise DemoError(f"cannot create the demo's database: {str(exc).strip()}") from exc
    finally:
        server.close()


def _drop_database() -> None:
    """Drop the run's database; best effort (the server may already be gone after Ctrl-C)."""
    from django.db import connections

    connections["default"].close()
    server = connections[SERVER_ALIAS]
    with contextlib.suppress(Exception):
        # FORCE (PostgreSQL 13+) ends sessions a killed worker may have left behind.
        force = " WITH (FORCE)" if getattr(server, "pg_version", 0) >= 130000 else ""
        with server.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {server.ops.quote_name(_database_name())}{force}")
    with contextlib.suppress(Exception):
        server.close()


def check_redis(redis_url: str) -> None:
    """Fail now, in words, if Redis cannot be reached (every lease would fail later)."""
    import redis
    from django.core.exceptions import ImproperlyConfigured

    from dsm_redis.exceptions import LockBackendUnavailable

    try:
        backend = _backend(redis_url, 5)
        try:
            backend.client.ping()
        finally:
            backend.close()
    except (redis.RedisError, ValueError, LockBackendUnavailable, ImproperlyConfigured) as exc:
        # the URL is not echoed: it may carry a password
        raise DemoError(f"cannot reach Redis: {type(exc).__name__}: {exc}") from None


def forget_redis_keys(redis_url: str, prefix: str) -> None:
    """Delete the run's leases, wake-up lists and fencing counters; best effort."""
    with contextlib.suppress(Exception):
        backend = _backend(redis_url, 2)
        client = backend.client
        try:
            # Key layout of the Redis backend: lock:<prefix>:{obj}, lock-signal:<prefix>:{obj},
            # <prefix>:{obj}:fence. The prefix is unique to this run.
            for pattern in (f"{prefix}:*", f"lock:{prefix}:*", f"lock-signal:{prefix}:*"):
                names = list(client.scan_iter(match=pattern, count=500))
                for name in names:  # one by one: on a Redis Cluster they live in different slots
                    client.delete(name)
        finally:
            backend.close()


def _backend(redis_url: str, timeout: float) -> Any:
    """The Redis lease backend for ``redis_url`` (any ``LOCATION`` form: a Sentinel or Cluster URL
    too), whose client the demo uses for its own checks."""
    from dsm_redis.backends.redis import RedisLockBackend
    from dsm_redis.conf import parse

    options = {"SOCKET_TIMEOUT": timeout, "SOCKET_CONNECT_TIMEOUT": timeout}
    return RedisLockBackend(parse({"LOCATION": redis_url, "OPTIONS": options}))
