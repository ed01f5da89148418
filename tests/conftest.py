"""Fixtures shared by the test modules (helpers that are not fixtures: ``tests/helpers.py``).

The suite's Redis and PostgreSQL are started by two early plugins (setup.cfg): see ``tests/settings.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_py


@pytest.fixture
def redis(dsm_redis_url: str) -> Iterator[Any]:
    """A client of the suite's Redis (``dsm_redis_url``: the pytest plugin's, setup.cfg enables it)."""
    client = redis_py.Redis.from_url(dsm_redis_url)
    yield client
    client.close()


@pytest.fixture(params=["default", "sqlite"], ids=["postgresql", "sqlite"])
def db_alias(request: pytest.FixtureRequest) -> str:
    """Run a test on PostgreSQL and on SQLite (the core semantics hold on both)."""
    request.getfixturevalue("_both_databases")
    return str(request.param)


@pytest.fixture
def _both_databases(django_db_blocker: Any, request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("django_db")
    assert marker is not None and set(marker.kwargs.get("databases", ())) >= {"default", "sqlite"}, (
        "tests using db_alias need @pytest.mark.django_db(databases=['default', 'sqlite'])"
    )


@pytest.fixture(scope="module")
def worker(django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Celery worker (prefork) on the suite's queue, for the module's tests."""
    from tests.celery_app import QUEUE
    from tests.celery_worker import Worker

    w = Worker(tmp_path_factory.mktemp("celery") / "worker.log", "main", QUEUE, concurrency=3)
    yield w
    w.stop()


@pytest.fixture
def queries() -> Any:
    """``with queries("default") as ctx: ...; ctx.captured_queries`` (BEGIN and COMMIT included)."""
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    return lambda alias="default": CaptureQueriesContext(connections[alias])


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Asynchronous transitions are not sent but kept: [(task id, payload)], to be run by the test."""
    from dsm_redis import tasks as dsm_tasks

    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(
        dsm_tasks.transition, "apply_async", lambda kwargs, **options: sent.append((options["task_id"], kwargs))
    )
    return sent


@pytest.fixture(scope="session", autouse=True)
def _no_permissions_on_flush() -> None:
    """Transactional tests flush the database after each test, and ``post_migrate`` then creates
    every model's permissions again: a cost per test that only test_admin.py's permissions need.
    Those tests create them themselves (``create_permissions``)."""
    from django.contrib.auth.management import create_permissions
    from django.db.models.signals import post_migrate

    post_migrate.disconnect(create_permissions, dispatch_uid="django.contrib.auth.management.create_permissions")
