"""Asynchronous transitions: the Celery task behind ``async_transition_to``,
``async_transition_through`` and ``obj.<machine>.<edge>(as_task=True, **kwargs)``.

``app.autodiscover_tasks()`` finds the task here (``dsm_redis`` in ``INSTALLED_APPS``). This module
imports without Celery; enqueueing without it raises ``ImproperlyConfigured``.

- Enqueued with ``transaction.on_commit`` on the model's write database: nothing is sent for a
  rolled-back transaction, and the worker sees the committed row.
- The payload is JSON only, and checked when you call (a value that would not come back from JSON
  unchanged — a datetime, a tuple, a dict with int keys — is a ``TypeError`` at the call).
  The source state and the edge are validated at the call as well (``TransitionException``).
- The worker trusts no field of the payload: before it takes a lease it checks the kind, that the
  model is installed, that ``field`` is a state machine of it, that ``target`` is an edge name of
  that machine (``edge``) or one of its states, and that ``using`` is a database the model may be
  written to; anything else fails the task with ``TransitionException``, with no effect. A primary
  key with no row is a logged no-op, without taking a lease (no fencing counter is left in Redis).
- The task carries the state the object was in when you asked (for ``async_transition_through``,
  the states of the walk from there). Under the object's lease the worker reads the row: if it is
  no longer in that state, the message is a duplicate or a late delivery, and the task logs that at
  INFO and does nothing.
- Every kind applies at most once per task id: an edge or ``async_transition_to`` records its task
  id in ``dsm_redis_applied_task`` in the transition's own transaction (so a redelivered copy of a
  self-loop edge, ``open -> open``, which the state cannot tell apart, is a no-op too); each step of
  an ``async_transition_through`` walk records the task id and the step's source state in the step's
  own transaction. A copy delivered after the object cycled back to a state the walk already left
  finds that step's record and stops; a copy redelivered after a worker died mid-walk finds no
  record for the state the walk reached, and resumes from there.
- The lease is taken as in ``dsm_redis.celery.run_locked`` (``retry_lock_errors``): a lease or row
  lock not obtained in time, Redis unreachable, a lease lost or a stale fencing token are retried
  with a short backoff that does not consume ``max_retries``, at most 100 times. A retry is
  harmless: the failed run committed nothing, and the records and the expected state make a copy
  that did commit a no-op.
- The call returns the task's ``AsyncResult`` (its id is fixed before the commit sends it); the
  task returns the object's state afterwards (a JSON value). In eager mode the task has run when
  the transaction commits; its result is kept only with ``task_store_eager_result``. The calling
  instance is not updated: ``refresh_from_db()`` to see the new state.
- The actor of the call (``dsm_redis.actor``, ``history.py``) travels as a reference (a model label
  and primary key, or a string id): the worker's transitions record it, and the task id.
- If sending fails (broker down), the exception is raised from the commit, as Django raises any
  ``on_commit`` callback's: the transaction has committed, the transition was not enqueued.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, Literal, get_args

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import IntegrityError, connections, router, transaction

from . import history, protocol
from .conf import get_config
from .exceptions import TransitionException
from .fence import bounded_row_locks
from .keys import object_key, stored_key
from .machine import StateValue, attached_machine, plain

try:
    from celery import shared_task
except ImportError:  # celery is the optional extra dsm_redis[celery]
    shared_task = None

if TYPE_CHECKING:
    from django.db.models import Model

    from .lease import Lease
    from .machine import StateMachine, Transition

__all__ = ["TASK_NAME", "transition"]

logger = logging.getLogger("dsm_redis")
TASK_NAME = "dsm_redis.transition"
#: What a task does: call an edge by name, ``transition_to`` a state, ``transition_through`` to one.
Kind = Literal["edge", "to", "through"]
KINDS: tuple[Kind, ...] = get_args(Kind)


def enqueue(machine: StateMachine, instance: Model, kind: Kind, target: Any, kwargs: dict[str, Any]) -> Any:
    """Validate the request now, send the task when the transaction commits; an ``AsyncResult``.

    The entry point of ``BoundStateMachine.async_transition_to`` and the others; ``target`` is an
    edge name for ``"edge"``, a state for the other kinds.
    """
    if shared_task is None:
        raise ImproperlyConfigured("Asynchronous transitions need Celery: pip install 'dsm_redis[celery]'")
    from celery.utils import uuid

    if instance.pk is None or instance._state.adding:
        raise TransitionException(f"{instance!r} is not saved: an asynchronous transition needs its primary key")
    current = machine.current_state(instance)
    # The graph questions a worker will ask again on the row read under the lease (preconditions
    # are judged there, on that row, not here).
    expected: StateValue | list[StateValue]
    if kind == "edge":
        machine.check_arguments(machine.edge_named(current, target, model=instance), instance, (), kwargs)
        expected = current
    elif kind == "to":
        target = machine.check_known(target)
        machine.check_arguments(machine.edge_to(current, target, model=instance), instance, (), kwargs)
        expected = current
    else:
        target = machine.check_known(target)
        expected = machine.path_states(current, target)
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
    ref = history.actor_ref()
    if ref is not None:  # the actor who enqueued it, by reference (history.py): never the object
        payload["actor"] = ref
    _check_json("the task's payload (state values or primary key)", payload)
    # A copy of what was checked: arguments mutated between the call and the commit are not sent.
    payload = json.loads(json.dumps(payload))
    task_id = uuid()
    transaction.on_commit(
        lambda: transition.apply_async(kwargs=payload, task_id=task_id, serializer="json"), using=using
    )
    return transition.AsyncResult(task_id)


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
    kind: Kind,
    target: Any,
    expected: Any,
    kwargs: dict[str, Any] | None = None,
    using: str | None = None,
    actor: Any = None,
) -> Any:
    with history.for_task(actor, str(self.request.id)):  # an untrusted reference: stored, never resolved
        return _run_transition(self, model, pk, field, kind, target, expected, kwargs, using)


def _run_transition(
    self: Any, model: str, pk: Any, field: str, kind: Kind, target: Any, expected: Any, kwargs: Any, using: Any
) -> Any:
    from .celery import existing_object_key, run_locked

    # Everything the payload names is checked before a lease is taken: a crafted or corrupted
    # message fails here, with no lease, no fencing counter and no write.
    cls, pk, machine, db = _validated(model, pk, field, kind, target, expected, kwargs, using)
    found = existing_object_key(cls, pk, db)
    if found is None:
        # Minting a token would leave a fencing counter in Redis for an object that does not exist.
        logger.warning(
            "%s[%s] on %s: the object does not exist; nothing to do", TASK_NAME, self.request.id, object_key(cls, pk)
        )
        return None
    key = found
    task_id = str(self.request.id)

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
                TASK_NAME, task_id, key, kind, target, current, expected,
            )  # fmt: skip
            return current
        if kind == "through":
            return _walk(task_id, key, db, machine, instance, target)
        with transaction.atomic(using=db):
            # Recorded first, in the transition's own transaction: a copy of this message delivered
            # again finds it (or, while this one is in flight, waits — bounded — on its unique key
            # and then finds it) and does nothing, even for a self-loop edge whose state cannot tell.
            if not _record(db, _applied_id(task_id), key):
                logger.info("%s[%s] on %s: already applied; skipped", TASK_NAME, task_id, key)
                return current
            if kind == "edge":
                getattr(bound, target)(**(kwargs or {}))
            else:
                bound.transition_to(target, **(kwargs or {}))
        return bound.get_current_state()

    # atomic=False: a walk is one transaction per step. The lease passes the fencing barrier before
    # the body reads the row (run_locked), so that read is not overtaken by an older holder.
    return run_locked(self, key, db, body, on_contention="retry", atomic=False, retry_lock_errors=True)


class _AlreadyApplied(Exception):
    """A step of a walk this task id already took (raised inside the step: it rolls back)."""

    def __init__(self, state: Any) -> None:
        super().__init__(state)
        self.state = state


def _walk(task_id: str, key: str, db: str, machine: StateMachine, instance: Model, target: Any) -> Any:
    def record(row: Model, transition: Transition) -> None:
        # Inside the step's own transaction, on the row read under the lock: the record commits
        # with the step or not at all. A copy of this task that finds it (the object went
        # a -> b -> ... -> a again since) must not take the step a second time.
        state = machine.current_state(row)
        if not _record(db, _step_id(task_id, state), key):
            raise _AlreadyApplied(state)

    try:
        # A step diverted by TransitionFailed records its source state in the error edge's own
        # transaction (the failed step's record rolled back with it): a later copy must not take
        # that step again once the object is back in that state.
        return protocol.run_through(machine, instance, target, on_step=record)
    except _AlreadyApplied as done:
        logger.info(
            "%s[%s] on %s: the step from %r was already applied by this task; walk skipped",
            TASK_NAME, task_id, key, done.state,
        )  # fmt: skip
        return done.state


def _record(db: str, applied_id: str, key: str) -> bool:
    """Insert the applied-task row; False when it exists already.

    A copy of the same task whose insert is not committed yet makes this wait on the unique key:
    bounded by ``ROW_LOCK_TIMEOUT`` (``LockTimeout``, retried), never for as long as it lives.
    """
    from .models import AppliedTask

    try:
        with transaction.atomic(using=db), bounded_row_locks(db, key, get_config().effective_row_lock_timeout):
            AppliedTask.objects.using(db).create(task_id=applied_id, object_key=stored_key(key))
    except IntegrityError:
        recorded = AppliedTask.objects.using(db).filter(pk=applied_id).values_list("object_key", flat=True).first()
        if recorded is not None and recorded != stored_key(key):
            # A task id reused for another object (apply_async(task_id=...)): not a duplicate of
            # this transition, and taking it for one would drop it silently.
            raise TransitionException(
                f"{TASK_NAME}: refused: task id {applied_id!r} was already applied to another object"
            ) from None
        return False
    return True


def _applied_id(task_id: str) -> str:
    # Celery's ids are UUIDs; a caller's own id may be longer than the 255-character key.
    return task_id if len(task_id) <= 255 else hashlib.sha256(task_id.encode()).hexdigest()


def _step_id(task_id: str, state: Any) -> str:
    """The record of one step of a walk: the task id and the step's source state."""
    digest = hashlib.sha256(json.dumps(plain(state), sort_keys=True).encode()).hexdigest()[:16]
    base = task_id if len(task_id) <= 255 - 17 else hashlib.sha256(task_id.encode()).hexdigest()
    return f"{base}:{digest}"


def _known(machine: StateMachine, state: Any, refuse: Any) -> None:
    try:
        machine.check_known(state)
    except TypeError:  # a list or a dict: not a state value at all
        raise refuse(f"{state!r} is not a state of {type(machine).__name__}") from None
    except TransitionException as exc:
        raise refuse(str(exc)) from None


def _validated(
    model: Any, pk: Any, field: Any, kind: Any, target: Any, expected: Any, kwargs: Any, using: Any
) -> tuple[type[Model], Any, StateMachine, str]:
    """The model, primary key, machine and database the payload names, or ``TransitionException``."""

    def refuse(why: str) -> TransitionException:
        return TransitionException(f"{TASK_NAME}: refused: {why}")

    if kind not in KINDS:
        raise refuse(f"unknown kind {kind!r}")
    try:
        cls = apps.get_model(model)
    except (LookupError, ValueError, TypeError, AttributeError):
        raise refuse(f"no installed model {model!r}") from None
    machine = attached_machine(cls, field)
    if machine is None:
        raise refuse(f"{cls._meta.label} has no state machine {field!r}")
    if kind == "edge":
        if not isinstance(target, str) or target not in machine.edge_names:
            raise refuse(f"{type(machine).__name__} has no edge {target!r}")
    else:
        _known(machine, target, refuse)
    # The state(s) the object was in when asked: one state, or the states of the walk.
    for state in expected if kind == "through" and isinstance(expected, list) else [expected]:
        _known(machine, state, refuse)
    if kind == "through" and not isinstance(expected, list):
        raise refuse(f"expected is not a list of states: {expected!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise refuse("kwargs is not a dict")
    if kwargs and "as_task" in kwargs:
        # Relayed, it would send yet another task and apply nothing here.
        raise refuse("as_task is not an argument of a side effect")
    if using is None:
        db = router.db_for_write(cls)
    elif not isinstance(using, str) or using not in connections.databases or not router.allow_migrate_model(using, cls):
        raise refuse(f"{cls._meta.label} is not written to a database {using!r}")
    else:
        db = using
    try:
        pk = cls._meta.pk.to_python(pk)
    except (ValidationError, TypeError, ValueError):
        raise refuse(f"{pk!r} is not a primary key of {cls._meta.label}") from None
    return cls, pk, machine, db


if shared_task is not None:
    # acks_late: a worker lost mid-transition gets the message redelivered; the expected state
    # makes a redelivery after the commit a logged no-op.
    transition = shared_task(name=TASK_NAME, bind=True, acks_late=True, serializer="json")(_transition)

    from celery.signals import worker_ready

    @worker_ready.connect(weak=False, dispatch_uid="dsm_redis.timeouts")
    def _log_timeout_warnings(sender: Any = None, **kwargs: Any) -> None:
        # Workers discard the system checks' results: log ours where they are read (a broken
        # DSM_REDIS also fails every task with the same message, at first use).
        from .checks import celery_timeout_warnings, check_settings

        for message in [*check_settings(), *celery_timeout_warnings(sender.app)]:
            log = logger.error if message.is_serious() else logger.warning
            log("%s: %s %s", message.id, message.msg, message.hint or "")
else:
    transition = None


def __getattr__(name: str) -> Any:
    # deus_state_machina.tasks.TransitionTask, after a blanket rename of the import lines.
    if name == "TransitionTask":
        from .compat import TransitionTask

        return TransitionTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
