"""Tasks for tests/test_celery_interleavings.py, loaded by its workers (``celery worker --include``)."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from django.db import transaction
from django.db.models import F

from dsm_redis import object_lock
from dsm_redis.celery import locked_task


@shared_task(bind=True)
@locked_task("testapp.Account", pk_arg="account_id", retry_lock_errors=True, backoff=(0.05, 0.2))
def deposit_then_notify(self: Task, account_id: int, other_id: int, lease: Any) -> int:
    """Deposits 1 in its atomic body; once that commits, tells another account (under its lease)."""
    from tests.testapp.models import Account

    Account.objects.filter(pk=account_id).update(balance=F("balance") + 1, deposits=F("deposits") + 1)

    def notify() -> None:
        with object_lock(Account.objects.get(pk=other_id), timeout=0.2):
            pass

    transaction.on_commit(notify)
    return lease.fencing_token


def _redis() -> Any:
    import redis
    from django.conf import settings

    return redis.Redis.from_url(settings.REDIS_URL)


def _stall_flagged_steps(sender: Any, instance: Any, **kwargs: Any) -> None:
    """A SeedModel saved into the state named by its flag key blocks (the test SIGKILLs the worker)."""
    import os
    import time

    from django.conf import settings

    prefix = f"interleavings:{settings.DSM_REDIS['OPTIONS']['KEY_PREFIX']}:{instance.pk}"
    r = _redis()
    r.rpush(f"{prefix}:saves", f"{instance.state}:{os.getpid()}")
    flag = r.get(f"{prefix}:stall")
    if flag is not None and int(flag) == instance.state and r.incr(f"{prefix}:stalled") == 1:
        time.sleep(300)


def _connect() -> None:
    from django.db.models.signals import pre_save

    from tests.testapp.models import SeedModel

    pre_save.connect(_stall_flagged_steps, sender=SeedModel, weak=False, dispatch_uid="interleaving-stall")


from celery.signals import worker_process_init  # noqa: E402

worker_process_init.connect(lambda **kwargs: _connect(), weak=False)
