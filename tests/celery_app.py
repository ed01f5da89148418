"""The Celery app of the test suite: ``celery -A tests.celery_app worker``.

Its broker and result backend are the suite's Redis (``DSM_TEST_REDIS_URL``, started by the test
run when not given) in database 1, apart from the leases in database 0. Each test run has a queue
of its own, so messages left over by another run are never consumed by this one.

The signal receivers at the bottom record, in Redis, what the tests observe from outside a worker:
how often a task was re-sent because its object's lease was busy, and how each task ended.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from celery import Celery
from celery.signals import task_postrun, task_retry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


def redis_db(url: str, db: int) -> str:
    """``url`` pointing at database ``db`` (``redis://host:port/N`` or ``unix://path?db=N``)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "db"] + [("db", str(db))]
        return urlunsplit(parts._replace(query=urlencode(query)))
    return urlunsplit(parts._replace(path=f"/{db}"))


def _redis_url() -> str:
    url = os.environ.get("DSM_TEST_REDIS_URL")
    if not url:  # not under pytest nor in its worker: tests.settings says what to set
        from django.conf import settings

        url = settings.REDIS_URL
    return url


BROKER_URL = redis_db(_redis_url(), 1)
QUEUE = f"dsm-test-{os.environ.get('DSM_TEST_RUN', os.getpid())}"

app = Celery("dsm_tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(
    broker_url=BROKER_URL,
    result_backend=BROKER_URL,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # A message a dead worker held comes back after 6 s (the SIGKILL test waits for it); the sweep
    # runs every second. Countdowns of contention retries (at most 2 s) stay well below it.
    broker_transport_options={"visibility_timeout": 6, "unacked_restore_interval": 1, "unacked_restore_throttle": 1},
    result_expires=600,
)
app.autodiscover_tasks()


def record_key(name: str) -> str:
    from django.conf import settings

    return f"celerytest:{settings.DSM_REDIS['OPTIONS']['KEY_PREFIX']}:{name}"


def _redis():  # type: ignore[no-untyped-def]
    import redis
    from django.conf import settings

    return redis.Redis.from_url(settings.REDIS_URL)


@task_retry.connect
def _count_contention(sender=None, request=None, reason=None, **kwargs):  # type: ignore[no-untyped-def]
    from dsm_redis import LockTimeout

    if isinstance(getattr(reason, "exc", None), LockTimeout):
        _redis().incr(record_key(f"contended:{request.id}"))


@task_postrun.connect
def _record_end(sender=None, task_id=None, state=None, **kwargs):  # type: ignore[no-untyped-def]
    _redis().rpush(record_key(f"ended:{task_id}"), str(state))
