"""Asynchronous transitions: the Celery task behind ``async_transition_to``,
``async_transition_through`` and ``obj.<machine>.<edge>(as_task=True, **kwargs)``.

``app.autodiscover_tasks()`` finds the task here (``dsm_redis`` in ``INSTALLED_APPS``). This module
imports without Celery; enqueueing without it raises ``ImproperlyConfigured``.

- Enqueued with ``transaction.on_commit`` on the model's write database: nothing is sent for a
  rolled-back transaction, and the worker sees the committed row.
- The payload is JSON only, and checked when you call (a value that would not come back from JSON
  unchanged — a datetime, a tuple, a dict with int keys — is a ``TypeError`` at the call).
  The source state and the edge are validated at the call as well (``TransitionException``).
- The task carries the state the object was in when you asked (for ``async_transition_through``,
  the states of the walk from there). Under the object's lease the worker reads the row: if it is
  no longer in that state, the message is a duplicate or a late delivery, and the task logs that at
  INFO and does nothing. An edge or ``async_transition_to`` also records its task id in
  ``dsm_redis_applied_task`` in the transition's own transaction, so a redelivered copy of a
  self-loop edge (``open -> open``), which the state cannot tell apart, is a no-op too.
- The lease is taken as in ``dsm_redis.celery.run_locked``; a lease or row lock not obtained in
  time is retried with a short backoff that does not consume ``max_retries``.
- The call returns the task's ``AsyncResult`` (its id is fixed before the commit sends it); the
  task returns the object's state afterwards (a JSON value). In eager mode the task has run when
  the transaction commits; its result is kept only with ``task_store_eager_result``. The calling
  instance is not updated: ``refresh_from_db()`` to see the new state.
- If sending fails (broker down), the exception is raised from the commit, as Django raises any
  ``on_commit`` callback's: the transaction has committed, the transition was not enqueued.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import IntegrityError, router, transaction

from .exceptions import TransitionException
from .keys import object_key
from .machine import plain

try:
    from celery import shared_task
except ImportError:  # celery is the optional extra dsm_redis[celery]
    shared_task = None

if TYPE_CHECKING:
    from .fields import BoundStateMachine
    from .lease import Lease
    from .machine import StateMachine

__all__ = ["enqueue", "transition"]

logger = logging.getLogger("dsm_redis")
TASK_NAME = "dsm_redis.transition"
KINDS = ("edge", "to", "through")


def enqueue(bound: BoundStateMachine, kind: str, target: Any, kwargs: dict[str, Any]) -> Any:
    """Validate the request now, send the task when the transaction commits; an ``AsyncResult``."""
    if shared_task is None:
        raise ImproperlyConfigured("Asynchronous transitions need Celery: pip install 'dsm_redis[celery]'")
    from celery.utils import uuid

    machine, instance = bound.machine, bound.instance
    if instance.pk is None or instance._state.adding:
        raise TransitionException(f"{instance!r} is not saved: an asynchronous transition needs its primary key")
    current = machine.current_state(instance)
    if kind == "edge":
        edges = [t for t in machine._transitions if t.name == target and t.start == current]
        if not edges:
            machine.edge_by_name(instance, target)  # raises, naming the states the edge starts from
        machine.check_arguments(edges[0], instance, (), kwargs)
        expected: Any = current
    elif kind == "to":
        target = machine.check_known(target)
        edges = [t for t in machine._transitions if t.start == current and t.end == target]
        if len(edges) != 1:
            machine.edge_for_target(instance, target)  # raises: no such edge, or ambiguous
        machine.check_arguments(edges[0], instance, (), kwargs)
        expected = current
    else:
        target = machine.check_known(target)
        expected = walk(machine, current, target)
    for name, value in kwargs.items():
        _check_json(f"{type(machine).__name__}: argument {name!r}", value)
    model = type(instance)
    using = router.db_for_write(model, instance=instance)
    pk = instance.pk if isinstance(instance.pk, (int, str)) else str(instance.pk)
    payload = {
        "model": model._meta.label_lower,
        "pk": pk,
        "field": machine.field_name,
        "kind": kind,
        "target": target,
        "expected": expected,
        "kwargs": kwargs,
        "using": using,
    }
    _check_json("the task's payload (state values or primary key)", payload)
    task_id = uuid()
    transaction.on_commit(
        lambda: transition.apply_async(kwargs=payload, task_id=task_id, serializer="json"), using=using
    )
    return transition.AsyncResult(task_id)


def walk(machine: StateMachine, current: Any, target: Any) -> list[Any]:
    """The states ``transition_through`` passes on its way from ``current`` to ``target`` (excluded)."""
    states: list[Any] = []
    while current != target:
        if current in states or len(states) > len(machine.states):
            break
        states.append(current)
        current = _next_state(machine, current, target)
    return states


def _next_state(machine: StateMachine, current: Any, target: Any) -> Any:
    # The same breadth-first search as StateMachine.edge_toward, on values (no instance, no guard).
    first: dict[Any, Any] = {}
    queue, seen = [current], {current}
    for state in queue:
        for t in machine._transitions:
            if t.start != state or t.end in seen:
                continue
            seen.add(t.end)
            first[t.end] = first.get(state, t.end)
            if t.end == target:
                return first[t.end]
            queue.append(t.end)
    raise TransitionException(f"{type(machine).__name__}: no path from {current!r} to {target!r}")


def _check_json(what: str, value: Any) -> None:
    try:
        same = json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable ({exc}); asynchronous transitions carry JSON only") from None
    if not same:
        raise TypeError(
            f"{what} would not survive JSON unchanged ({value!r}); use str, int, float, bool, None, "
            f"lists and dicts with str keys"
        )


def _transition(
    self: Any,
    model: str,
    pk: Any,
    field: str,
    kind: str,
    target: Any,
    expected: Any,
    kwargs: dict[str, Any] | None = None,
    using: str | None = None,
) -> Any:
    from .celery import run_locked

    cls = apps.get_model(model)
    pk = cls._meta.pk.to_python(pk)
    db = using or router.db_for_write(cls)
    key = object_key(cls, pk)

    def body(lease: Lease) -> Any:
        instance = cls._base_manager.db_manager(db).filter(pk=pk).first()
        if instance is None:
            logger.warning("%s on %s: the object no longer exists; nothing to do", TASK_NAME, key)
            return None
        bound = getattr(instance, field)
        current = bound.get_current_state()
        allowed = expected if kind == "through" else [expected]
        if current not in [plain(s) for s in allowed] or (kind == "through" and current == target):
            logger.info(
                "%s[%s] on %s: %s %r skipped: the object is in state %r, not %r (a duplicate or late delivery)",
                TASK_NAME, self.request.id, key, kind, target, current, expected,
            )  # fmt: skip
            return current
        if kind == "through":
            bound.transition_through(target)  # a redelivery resumes the walk from where it is
            return bound.get_current_state()
        from .models import AppliedTask

        with transaction.atomic(using=db):
            # Recorded first, in the transition's own transaction: a copy of this message delivered
            # again finds it (or, while this one is in flight, waits on its unique key and then
            # finds it) and does nothing, even for a self-loop edge whose state cannot tell.
            try:
                with transaction.atomic(using=db):
                    AppliedTask.objects.using(db).create(task_id=self.request.id, object_key=key)
            except IntegrityError:
                logger.info("%s[%s] on %s: already applied; skipped", TASK_NAME, self.request.id, key)
                return current
            if kind == "edge":
                getattr(bound, target)(**(kwargs or {}))
            else:
                bound.transition_to(target, **(kwargs or {}))
        return bound.get_current_state()

    return run_locked(self, key, db, body, on_contention="retry", atomic=False, retry_body_timeouts=True)


if shared_task is not None:
    # acks_late: a worker lost mid-transition gets the message redelivered; the expected state
    # makes a redelivery after the commit a logged no-op.
    transition = shared_task(name=TASK_NAME, bind=True, acks_late=True, serializer="json")(_transition)

    from celery.signals import worker_ready

    @worker_ready.connect(weak=False, dispatch_uid="dsm_redis.timeouts")
    def _log_timeout_warnings(sender: Any = None, **kwargs: Any) -> None:
        # Workers discard the system checks' results: log the Celery ones where they are read.
        from .checks import celery_timeout_warnings

        for message in celery_timeout_warnings(sender.app):
            logger.warning("%s: %s %s", message.id, message.msg, message.hint)
else:
    transition = None
