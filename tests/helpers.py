"""Helpers shared by the test modules: polling, the ``DSM_REDIS`` override, what workers record.

Fixtures live in ``tests/conftest.py`` and in ``dsm_redis.tools.pytest_plugin`` (enabled in
setup.cfg); the Celery worker harness in ``tests/celery_worker.py``; real OS processes in
``tests/procs.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from django.conf import settings as django_settings

from dsm_redis.backends.redis import RedisLockBackend
from dsm_redis.conf import parse

WAIT = 60  # seconds: generous bounds on polls, never asserted as durations
T = TypeVar("T")


def wait_for(check: Callable[[], Any], what: str, logs: Sequence[Path] = (), timeout: float = WAIT) -> Any:
    """Poll ``check`` until it returns something true, and return that; fail with the logs' tails.

    The timeout only guards against a hung test: it asserts nothing about speed.
    """
    for _ in range(int(timeout / 0.02)):
        value = check()
        if value:
            return value
        time.sleep(0.02)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for log in logs if log.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def dsm_options(settings: Any, location: str | None = None, **options: Any) -> dict[str, Any]:
    """Change ``DSM_REDIS`` for one test through pytest-django's ``settings`` (undone after it):
    ``OPTIONS`` merged with ``options``, ``LOCATION`` replaced if given, the rest kept."""
    value = {**settings.DSM_REDIS, "OPTIONS": {**settings.DSM_REDIS.get("OPTIONS", {}), **options}}
    if location is not None:
        value["LOCATION"] = location
    settings.DSM_REDIS = value
    return value


def redis_backend_for(location: Any, prefix: str | None = None, **options: Any) -> RedisLockBackend:
    """A Redis lease backend of the test's own (a fresh ``KEY_PREFIX`` unless given), built directly."""
    prefix = prefix or f"t-{uuid.uuid4().hex[:8]}"
    return RedisLockBackend(parse({"LOCATION": location, "OPTIONS": {"KEY_PREFIX": prefix, **options}}))


def key_prefix() -> str:
    """The ``KEY_PREFIX`` in force (the suite's, or a test's override)."""
    return str(django_settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"])


def effects(redis: Any, account_id: int) -> int:
    """How many side effects ran for an account (``tests.workers`` counts them in Redis)."""
    return int(redis.get(f"effects:{key_prefix()}:{account_id}") or 0)


def fresh(obj: Any) -> Any:
    """The object as its database has it now."""
    return type(obj)._base_manager.using(obj._state.db).get(pk=obj.pk)


def pg_connect() -> psycopg.Connection[Any]:
    """A psycopg connection of its own (autocommit) to the test database on PostgreSQL."""
    from django.db import connection

    s = connection.settings_dict
    return psycopg.connect(
        dbname=s["NAME"],
        user=s["USER"],
        password=s["PASSWORD"] or None,
        host=s["HOST"] or None,
        port=s["PORT"] or None,
        autocommit=True,
    )


def killing_when_alive(x: Any, y: Any) -> Any:
    """A state_changed receiver that moves ``y`` to Dead when ``x`` becomes Alive."""
    from tests.testapp.models import ALIVE, DEAD, Cat

    def kill_y(sender: Any, instance: Any, state: Any, **kwargs: Any) -> None:
        if instance.pk == x.pk and state == ALIVE:
            Cat.objects.get(pk=y.pk).state_machine.transition_to(DEAD)

    return kill_y


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())``, then close the connections of Django's worker thread (the test
    database is dropped at the end of the session)."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    async def wrapped() -> T:
        try:
            return await main()
        finally:
            await sync_to_async(connections.close_all)()

    return asyncio.run(wrapped())
