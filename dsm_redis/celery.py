"""Celery integration: ``locked_task`` runs a task's body under its object's lease.

Safety contract:
- The lease is taken when the task *runs*, inside the worker, keyed by the object
  (``app_label.model:pk``), so every way a task can start is covered: ``delay``/``apply_async``,
  beat, ``send_task``, a broker redelivery, a retry. A redelivered duplicate of a task that is still
  running contends for the lease like any other task; it never runs beside the live holder.
- The lease is renewed while the body runs (``AUTO_RENEW``). With ``atomic=True`` (the default) the
  body runs in ``transaction.atomic(using=db)``: the lease's fencing token is judged first (the
  fencing barrier, ``Lease.enter_barrier``), ``Lease.check()`` runs before the commit, and the lease
  is released only after the commit. A body whose lease ran out (or was overtaken by a newer holder)
  commits nothing.
- With ``atomic=False`` the body's lease passes the same barrier, in a transaction of its own, before
  the body runs: whatever the body reads afterwards cannot be overwritten by the late commit of an
  older holder whose lease ran out (every older holder has committed by then, or is refused).
  A task run eagerly under a lease its caller holds re-enters it: its caller passed the barrier.
- Contention (the lease not obtained within ``timeout``): ``"retry"`` re-sends the same task id
  with a short, jittered, growing countdown; the message keeps its ``retries`` count, so contention
  does not consume the task's ``max_retries`` (it has its own bound, ``max_contention_retries``,
  after which ``LockTimeout`` is raised); ``"skip"`` ends the task with ``Ignore``; ``"raise"``
  raises ``LockTimeout`` (picklable, so it reaches the result backend).
- Eager mode and direct calls are plain function calls in the caller's thread: the lease is
  re-entrant, so a task run eagerly under its object's lease does not contend with its caller. On
  real contention they cannot be re-sent later: "retry" waits ``ACQUIRE_TIMEOUT`` and then raises
  ``LockTimeout``.
- ``retry_lock_errors=True``: any other ``LockError`` (Redis unreachable, the lease lost, a stale
  fencing token, a row lock not obtained in time) releases the lease and re-sends the task the same
  way, within the same bound (``max_contention_retries``). The transaction that raised it committed
  nothing (that is what a ``LockError`` means; with ``atomic=False`` the body's earlier transactions
  may have): use it when running the body again is harmless.

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
from typing import Any, Literal, get_args

try:
    from celery import Task
    from celery._state import get_current_task
    from celery.exceptions import Ignore, Retry
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    raise ImportError("dsm_redis.celery needs Celery: pip install 'dsm_redis[celery]'") from exc

from django.apps import apps
from django.db import router, transaction
from django.db.models import Model

from . import telemetry
from .commit_hooks import on_commit_first
from .conf import get_config
from .exceptions import LockError, LockTimeout
from .keys import object_key
from .lease import Lease, hold, require_managed_transactions

__all__ = ["locked_task"]

logger = logging.getLogger("dsm_redis")
CONTENTION_HEADER = "dsm_redis_contention"  # message header: contention retries so far
OnContention = Literal["retry", "skip", "raise"]
ON_CONTENTION: tuple[str, ...] = get_args(OnContention)
_DEFAULT: Any = object()


def locked_task(
    model: str | type[Model],
    pk_arg: str = "pk",
    *,
    on_contention: OnContention = "retry",
    timeout: float | None = _DEFAULT,
    ttl: float | None = None,
    using: str | None = None,
    atomic: bool = True,
    max_contention_retries: int | None = 100,
    backoff: tuple[float, float] = (0.1, 2.0),
    retry_lock_errors: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Hold the lease of ``model`` with primary key ``kwargs[pk_arg]`` while the task body runs.

    Put it *below* ``@shared_task``/``@app.task``. ``timeout`` is how long to wait for the lease
    before ``on_contention`` applies (default: 1s for "retry", 0 for "skip", ``ACQUIRE_TIMEOUT``
    for "raise"). ``backoff`` is (first countdown, cap) in seconds for contention retries. The lease
    is passed as ``lease=`` when the function has a ``lease`` parameter. ``retry_lock_errors``
    re-sends the task on any ``LockError`` too (module docstring), for bodies safe to run again.
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
            db = using or router.db_for_write(cls)
            key = existing_object_key(cls, bound.arguments[pk_arg], db)
            if key is None:
                logger.warning(
                    "%s: %s with pk %r does not exist; skipped",
                    fn.__qualname__,
                    cls._meta.label,
                    bound.arguments[pk_arg],
                )
                return None

            def body(lease: Lease) -> Any:
                return fn(*args, **kwargs, lease=lease) if wants_lease else fn(*args, **kwargs)

            return run_locked(
                _calling_task(wrapper, args), key, db, body,
                on_contention=on_contention, timeout=timeout, ttl=ttl, atomic=atomic,
                max_contention_retries=max_contention_retries, backoff=backoff,
                retry_lock_errors=retry_lock_errors,
            )  # fmt: skip

        wrapper.__signature__ = public  # type: ignore[attr-defined]
        wrapper._dsm_locked = {"model": model, "ttl": ttl}  # type: ignore[attr-defined]  # read by the system checks
        return wrapper

    return decorate


def existing_object_key(model: type[Model], pk: Any, using: str) -> str | None:
    """The object key of ``model``'s row ``pk`` as the database stores it, or None when no such row.

    Built from the primary key *read back*: a ``Decimal`` key given as ``1.0`` or ``1.00``, or a
    string key in another case under a case-insensitive collation, names one row and must get one
    lease and one mark. No row: no lease is taken, so no fencing counter is left in Redis.
    """
    stored = (
        model._base_manager.db_manager(using)
        .filter(pk=model._meta.pk.to_python(pk))
        .values_list("pk", flat=True)
        .first()
    )
    return None if stored is None else object_key(model, stored)


def run_locked(
    task: Task | None,
    key: str,
    using: str,
    body: Callable[[Lease], Any],
    *,
    on_contention: OnContention = "retry",
    timeout: float | None = _DEFAULT,
    ttl: float | None = None,
    atomic: bool = True,
    max_contention_retries: int | None = 100,
    backoff: tuple[float, float] = (0.1, 2.0),
    retry_lock_errors: bool = False,
) -> Any:
    """Run ``body(lease)`` under the lease on ``key`` for ``task`` (None: not run by Celery)."""
    require_managed_transactions(using)
    config = get_config()
    queued = _queued(task)
    if timeout is _DEFAULT:
        if on_contention == "skip":
            timeout = 0
        elif on_contention == "retry" and queued:
            timeout = 1.0 if config.acquire_timeout is None else min(1.0, config.acquire_timeout)
        else:
            timeout = config.acquire_timeout
    contended = functools.partial(_contended, task, key, on_contention, max_contention_retries, backoff)
    resend = functools.partial(_resend, task, key, max_contention_retries, backoff)
    name, task_id = (None, None) if task is None else (task.name, task.request.id)
    with telemetry.task(name, task_id, key), ExitStack() as stack:
        try:
            lease = stack.enter_context(hold(key, timeout=timeout, ttl=ttl))
        except LockTimeout as exc:
            _raise(contended(exc), exc)
        except LockError as exc:  # Redis unreachable (a blip, a restart, a failover): nothing taken
            if not retry_lock_errors:
                raise
            _raise(resend(exc), exc)
        # Taken by this call, not re-entered from a caller of this thread (an eager task under its
        # caller's lease: the caller passed the barrier, and may have read since; no re-anchoring).
        acquired = lease.depth == 1
        committed: list[bool] = []
        try:
            if not atomic:
                if acquired:
                    # The body reads before it fences: an older holder still inside a judged
                    # transaction (its lease ran out) could commit after that read and be
                    # overwritten by the body's fenced write. The barrier waits for it or refuses it.
                    lease.enter_barrier(using)
                return body(lease)
            with transaction.atomic(using=using):
                # Run first at the commit (on_commit_first): a hook of the body's that raises a
                # LockError after the COMMIT must not have the committed body sent again.
                on_commit_first(functools.partial(committed.append, True), using)
                if acquired:
                    # Nothing read yet: the barrier may re-anchor a counter Redis lost (fence() never
                    # does), and judges the token before the body writes anything.
                    lease.enter_barrier(using)
                else:
                    lease.fence(using)  # a stale holder is refused before the body writes anything
                result = body(lease)
                lease.check()  # and a holder whose lease ran out commits nothing
            return result
        except LockError as exc:  # the failing transaction committed nothing (earlier ones of an
            # atomic=False body may have: retry only bodies that resume, like the transition task's)
            if not retry_lock_errors or committed:
                raise
            stack.close()  # release our lease before scheduling the retry
            _raise(resend(exc), exc)


def _raise(error: BaseException, cause: LockError) -> Any:
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
        telemetry.task_skipped(name, key)
        return Ignore()
    if on_contention == "raise":
        return exc
    return _resend(task, key, limit, backoff, exc)


def _resend(
    task: Task | None, key: str, limit: int | None, backoff: tuple[float, float], exc: LockError
) -> BaseException:
    """Re-send the task (same id, same ``retries``) after a growing, jittered countdown.

    The exception that ends this run: ``Retry``, or ``exc`` itself when the task cannot be re-sent
    (eager, called directly) or ``limit`` re-sends were spent.
    """
    if not _queued(task):
        return exc
    assert task is not None
    name, request = task.name, task.request
    busy = isinstance(exc, LockTimeout)
    why = f"lease on {key} busy" if busy else f"{type(exc).__name__} on {key}"
    headers = dict(request.headers or {})
    attempt = int(headers.get(CONTENTION_HEADER) or getattr(request, CONTENTION_HEADER, None) or 0) + 1
    if limit is not None and attempt > limit:
        logger.warning("%s[%s]: %s after %s retries; giving up", name, request.id, why, limit)
        return exc
    first, cap = backoff
    countdown = min(cap, first * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    headers[CONTENTION_HEADER] = attempt
    # The same task id and the same ``retries``: these retries are invisible to max_retries.
    signature = task.signature_from_request(request, countdown=countdown, headers=headers)
    signature.apply_async()
    telemetry.task_retried(name, key, "contention" if busy else "lock_error")
    level = logging.INFO if busy else logging.WARNING
    logger.log(level, "%s[%s]: %s; retry %s in %.2fs", name, request.id, why, attempt, countdown)
    return Retry(f"{why} (retry {attempt})", exc, when=countdown, sig=signature)


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
