"""Celery integration: ``locked_task`` runs a task's body under its object's lease.

Safety contract:
- The lease is taken when the task *runs*, inside the worker, keyed by the object
  (``app_label.model:pk``), so every way a task can start is covered: ``delay``/``apply_async``,
  beat, ``send_task``, a broker redelivery, a retry. A redelivered duplicate of a task that is still
  running contends for the lease like any other task; it never runs beside the live holder.
- The lease is renewed while the body runs (``AUTO_RENEW``). With ``atomic=True`` (the default) the
  body runs in ``transaction.atomic(using=db)``: the lease's fencing token is judged first
  (``Lease.fence``), ``Lease.check()`` runs before the commit, and the lease is released only after
  the commit. A body whose lease ran out (or was overtaken by a newer holder) commits nothing.
- Contention (the lease not obtained within ``timeout``): ``"retry"`` re-sends the same task id
  with a short, jittered, growing countdown; the message keeps its ``retries`` count, so contention
  does not consume the task's ``max_retries`` (it has its own bound, ``max_contention_retries``,
  after which ``LockTimeout`` is raised); ``"skip"`` ends the task with ``Ignore``; ``"raise"``
  raises ``LockTimeout`` (picklable, so it reaches the result backend).
- Eager mode and direct calls are plain function calls in the caller's thread: the lease is
  re-entrant, so a task run eagerly under its object's lease does not contend with its caller. On
  real contention they cannot be re-sent later: "retry" waits ``ACQUIRE_TIMEOUT`` and then raises
  ``LockTimeout``.

Limits:
- Only this database's writes inside the atomic body are fenced and rolled back. Anything the body
  sends elsewhere (HTTP calls, e-mails, other databases) is not: pass ``lease.fencing_token`` on.
  With ``atomic=False`` the body's own transactions are fenced only through transitions or
  ``lease.fence(db)``.
- Delivery stays at-least-once: a worker killed after the commit but before the ack runs the body
  again (serially, under the lease). Make bodies idempotent or check the object's state first.
- A holder killed mid-task (SIGKILL, hard time limit) keeps the lease until its TTL runs out; tasks
  for that object wait (retry) until then. Without ``AUTO_RENEW`` the TTL must cover the task's
  time limit, and a Redis broker's ``visibility_timeout`` must exceed it: ``manage.py check``
  warns otherwise (dsm_redis.W101, W102).
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

try:
    from celery import Task
    from celery._state import get_current_task
    from celery.exceptions import Ignore, Retry
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError("dsm_redis.celery needs Celery: pip install 'dsm_redis[celery]'") from exc

from django.apps import apps
from django.db import router, transaction
from django.db.models import Model

from .conf import get_config
from .exceptions import LockTimeout
from .keys import object_key
from .lease import Lease, hold

__all__ = ["locked_task", "run_locked", "CONTENTION_HEADER"]

logger = logging.getLogger("dsm_redis")
CONTENTION_HEADER = "dsm_redis_contention"  # message header: contention retries so far
ON_CONTENTION = ("retry", "skip", "raise")
_DEFAULT: Any = object()


def locked_task(
    model: str | type[Model],
    pk_arg: str = "pk",
    *,
    on_contention: str = "retry",
    timeout: float | None = _DEFAULT,
    ttl: float | None = None,
    using: str | None = None,
    atomic: bool = True,
    max_contention_retries: int | None = 100,
    backoff: tuple[float, float] = (0.1, 2.0),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Hold the lease of ``model`` with primary key ``kwargs[pk_arg]`` while the task body runs.

    Put it *below* ``@shared_task``/``@app.task``. ``timeout`` is how long to wait for the lease
    before ``on_contention`` applies (default: 1s for "retry", 0 for "skip", ``ACQUIRE_TIMEOUT``
    for "raise"). ``backoff`` is (first countdown, cap) in seconds for contention retries. The lease
    is passed as ``lease=`` when the function has a ``lease`` parameter.
    """
    if on_contention not in ON_CONTENTION:
        raise ValueError(f"on_contention must be one of {', '.join(map(repr, ON_CONTENTION))}, not {on_contention!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if isinstance(fn, Task):
            raise TypeError("@locked_task must be applied below @shared_task / @app.task, to the plain function")
        signature = inspect.signature(fn)
        if pk_arg not in signature.parameters:
            raise TypeError(f"{fn.__qualname__}() has no parameter {pk_arg!r} (pk_arg) naming the object's primary key")
        wants_lease = "lease" in signature.parameters
        # What Celery sees (and checks calls against): the function without its injected lease.
        public = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "lease"])

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = public.bind(*args, **kwargs)
            bound.apply_defaults()
            cls = apps.get_model(model) if isinstance(model, str) else model
            key = object_key(cls, cls._meta.pk.to_python(bound.arguments[pk_arg]))

            def body(lease: Lease) -> Any:
                return fn(*args, **kwargs, lease=lease) if wants_lease else fn(*args, **kwargs)

            return run_locked(
                _calling_task(wrapper, args), key, using or router.db_for_write(cls), body,
                on_contention=on_contention, timeout=timeout, ttl=ttl, atomic=atomic,
                max_contention_retries=max_contention_retries, backoff=backoff,
            )  # fmt: skip

        wrapper.__signature__ = public  # type: ignore[attr-defined]
        wrapper._dsm_locked = {"model": model, "ttl": ttl}  # type: ignore[attr-defined]  # read by the system checks
        return wrapper

    return decorate


def run_locked(
    task: Task | None,
    key: str,
    using: str,
    body: Callable[[Lease], Any],
    *,
    on_contention: str = "retry",
    timeout: float | None = _DEFAULT,
    ttl: float | None = None,
    atomic: bool = True,
    max_contention_retries: int | None = 100,
    backoff: tuple[float, float] = (0.1, 2.0),
    retry_body_timeouts: bool = False,
) -> Any:
    """Run ``body(lease)`` under the lease on ``key`` for ``task`` (None: not run by Celery)."""
    config = get_config()
    queued = _queued(task)
    if timeout is _DEFAULT:
        if on_contention == "skip":
            timeout = 0
        elif on_contention == "retry" and queued:
            timeout = 1.0 if config.acquire_timeout is None else min(1.0, config.acquire_timeout)
        else:
            timeout = config.acquire_timeout
    retry = functools.partial(_contended, task, key, on_contention, max_contention_retries, backoff)
    with ExitStack() as stack:
        try:
            lease = stack.enter_context(hold(key, timeout=timeout, ttl=ttl))
        except LockTimeout as exc:
            _raise(retry(exc), exc)
        try:
            if not atomic:
                return body(lease)
            with transaction.atomic(using=using):
                lease.fence(using)  # a stale holder is refused before the body writes anything
                result = body(lease)
                lease.check()  # and a holder whose lease ran out commits nothing
            return result
        except LockTimeout as exc:  # a lock the body waited for (e.g. a row lock)
            if not retry_body_timeouts:
                raise
            stack.close()  # release our lease before scheduling the retry
            _raise(retry(exc), exc)


def _raise(error: BaseException, cause: LockTimeout) -> Any:
    if error is cause:
        raise cause
    raise error from cause


def _contended(
    task: Task | None, key: str, on_contention: str, limit: int | None, backoff: tuple[float, float], exc: LockTimeout
) -> BaseException:
    """The exception that ends a task which did not get its lease."""
    name = task.name if task is not None else "task"
    if on_contention == "skip":
        logger.info("%s skipped: lease on %s is held by another holder", name, key)
        return Ignore()
    if on_contention == "raise" or not _queued(task):
        return exc
    assert task is not None
    request = task.request
    headers = dict(request.headers or {})
    attempt = int(headers.get(CONTENTION_HEADER) or getattr(request, CONTENTION_HEADER, None) or 0) + 1
    if limit is not None and attempt > limit:
        logger.warning("%s[%s]: lease on %s still busy after %s contention retries", name, request.id, key, limit)
        return exc
    first, cap = backoff
    countdown = min(cap, first * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    headers[CONTENTION_HEADER] = attempt
    # The same task id and the same ``retries``: a contention retry is invisible to max_retries.
    signature = task.signature_from_request(request, countdown=countdown, headers=headers)
    signature.apply_async()
    logger.info("%s[%s]: lease on %s busy; retry %s in %.2fs", name, request.id, key, attempt, countdown)
    return Retry(f"lease on {key} busy (contention retry {attempt})", exc, when=countdown, sig=signature)


def _queued(task: Task | None) -> bool:
    """Run by a worker from a message (so it can be re-sent), not eagerly nor called directly."""
    if task is None:
        return False
    request = task.request
    return not (request.called_directly or request.is_eager)


def _calling_task(wrapper: Callable[..., Any], args: tuple[Any, ...]) -> Task | None:
    """The task whose body ``wrapper`` is: ``self`` when bound, else the task Celery is running."""
    if args and isinstance(args[0], Task) and _runs(args[0], wrapper):
        return args[0]
    current = get_current_task()
    return current if current is not None and _runs(current, wrapper) else None


def _runs(task: Task, wrapper: Callable[..., Any]) -> bool:
    run = inspect.getattr_static(type(task), "run", None)
    return run is wrapper or getattr(run, "__func__", None) is wrapper
