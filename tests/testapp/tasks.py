"""Tasks the Celery tests run (found by ``app.autodiscover_tasks()``).

Bodies record what they did in Redis, numbered by one Redis counter (``INCR``): a single clock for
every worker process, so intervals from different processes can be compared without timing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Task, shared_task

from dsm_redis.celery import locked_task


def _redis() -> Any:
    import redis
    from django.conf import settings

    return redis.Redis.from_url(settings.REDIS_URL)


def key(name: str) -> str:
    from django.conf import settings

    return f"celerytest:{settings.DSM_REDIS['OPTIONS']['KEY_PREFIX']}:{name}"


def _deposit(account_id: int, tag: str, work: float, token: int | None, task_id: str | None) -> None:
    """A read-modify-write of the account with an interval record: [enter, exit, pid, token, id]."""
    from tests.testapp.models import Account

    r = _redis()
    enter = r.incr(key("seq"))
    account = Account.objects.get(pk=account_id)
    balance = account.balance
    time.sleep(work)
    account.balance = balance + 1
    account.deposits += 1
    account.save()
    leave = r.incr(key("seq"))
    r.rpush(key(f"intervals:{tag}"), json.dumps([enter, leave, os.getpid(), token, task_id]))


@shared_task(bind=True)
@locked_task("testapp.Account", pk_arg="account_id", on_contention="retry")
def locked_deposit(self: Task, account_id: int, *, tag: str, work: float = 0.02, lease: Any) -> int:
    _deposit(account_id, tag, work, lease.fencing_token, self.request.id)
    return lease.fencing_token


@shared_task(bind=True)
def cowboy_deposit(self: Task, account_id: int, *, tag: str, work: float = 0.2) -> None:
    """The same body without a lease: the control that shows these tests can see an overlap."""
    _deposit(account_id, tag, work, None, self.request.id)


@shared_task
@locked_task("testapp.Account", pk_arg="account_id", on_contention="raise", timeout=0.5)
def unbound_raise(account_id: int, lease: Any) -> int:
    """Not bound, ``lease`` a positional-or-keyword parameter, on_contention="raise"."""
    return lease.fencing_token


@shared_task
@locked_task("testapp.Account", pk_arg="account_id", on_contention="skip")
def unbound_skip(account_id: int) -> str:
    """No ``lease`` parameter: nothing is injected."""
    return "ran"


@shared_task
@locked_task("testapp.Account", pk_arg="account_id", on_contention="retry")
def unbound_retry(account_id: int, lease: Any) -> int:
    """Not bound: contention retries find the task through Celery's current task."""
    return lease.fencing_token


class CountingTask(Task):
    """A custom base class, as projects use for logging or metrics."""

    abstract = True
    calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        CountingTask.calls += 1
        return super().__call__(*args, **kwargs)


@shared_task(bind=True, base=CountingTask, max_retries=1)
@locked_task("testapp.Account", pk_arg="account_id", on_contention="retry")
def retry_budget(self: Task, account_id: int, lease: Any) -> dict[str, Any]:
    """Retries itself once (its whole max_retries budget) after however many contention retries."""
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return {"retries": self.request.retries, "token": lease.fencing_token}


@shared_task(bind=True)
@locked_task("testapp.Account", pk_arg="account_id")
def write_then_lose_lease(self: Task, account_id: int, lease: Any) -> None:
    """Writes, then outlives its (unrenewed) lease: the write must not commit."""
    from tests.testapp.models import Account

    Account.objects.filter(pk=account_id).update(balance=999)
    time.sleep(max(0.0, lease.remaining) + 0.05)


@shared_task(bind=True, acks_late=True)
@locked_task("testapp.Account", pk_arg="account_id", on_contention="retry", ttl=3)
def slow_first(self: Task, account_id: int, *, lease: Any) -> int:
    """First run: records its entry and blocks (the test SIGKILLs its worker). Later runs deposit."""
    r = _redis()
    runs = r.incr(key(f"runs:{account_id}"))
    enter = r.incr(key("seq"))
    r.rpush(key(f"entered:{account_id}"), json.dumps([enter, os.getpid(), lease.fencing_token]))
    if runs == 1:
        from tests.testapp.models import Account

        Account.objects.filter(pk=account_id).update(balance=-1000)  # must never commit
        time.sleep(120)
    _deposit(account_id, "slow_first", 0.0, lease.fencing_token, self.request.id)
    return lease.fencing_token


@shared_task
def ping() -> str:
    return "pong"
