"""Transition history: who moved which object along which edge, under which lease and token.

Owns the actor context (``actor()``, and the JSON reference a Celery task carries), the redaction
hook for side-effect arguments, and the write of a ``TransitionRecord`` (``models.py``). The record
is written inside the transition's own transaction, after the fenced write and before the commit
(``protocol._step`` calls ``record``): a rolled-back transition leaves none, a committed one has
exactly one. The creation of an object is recorded in the transaction of its ``INSERT``
(``track_creation`` wraps the model's ``_save_table`` in ``atomic``).

History is opt-in per machine: ``StateMachineField(Machine, "state", history=True)`` or
``history = True`` on the machine class. Arguments named in the machine's ``history_redact`` are
stored as ``"[redacted]"``; a machine may define ``redact_history(transition, kwargs) -> dict``
to decide itself. Values that are not JSON are stored as their ``repr``.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import wraps
from typing import TYPE_CHECKING, Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import Model

from .keys import object_key, stored_key

if TYPE_CHECKING:
    from .machine import HeldLease, StateMachine, Transition

__all__ = ["actor", "current_actor", "actor_ref", "REDACTED"]

REDACTED = "[redacted]"

# The actor of the transitions this context runs: a model instance (a user), a string, or an
# ActorRef decoded from a task's message.
_ACTOR: ContextVar[Any] = ContextVar("dsm_redis_actor", default=None)
# The Celery task id the transitions of this context run for.
_TASK: ContextVar[str | None] = ContextVar("dsm_redis_history_task", default=None)
# Set while the protocol inserts an unsaved object: its transition's record documents the insert.
_INSERTING: ContextVar[frozenset[int]] = ContextVar("dsm_redis_history_inserting", default=frozenset())
# (object id, machine field, failed edge): the edge to an error state a TransitionFailed diverted to.
_DIVERTED: ContextVar[tuple[int, str, str] | None] = ContextVar("dsm_redis_history_diverted", default=None)


class ActorRef:
    """An actor as a message carries it: a model label and primary key, or a plain string id."""

    __slots__ = ("label", "pk", "text")

    def __init__(self, label: str | None, pk: str | None, text: str) -> None:
        self.label, self.pk, self.text = label, pk, text


@contextmanager
def actor(who: Any) -> Iterator[None]:
    """``with dsm_redis.actor(request.user):`` — transitions in the block record ``who`` as their actor.

    ``who`` is a model instance (stored as its content type and primary key), a string id, or None.
    An anonymous user is recorded as no actor.
    """
    token = _ACTOR.set(who)
    try:
        yield
    finally:
        _ACTOR.reset(token)


def current_actor() -> Any:
    return _ACTOR.get()


def actor_ref(who: Any = None) -> str | list[str] | None:
    """The JSON form of an actor (the current one by default) a Celery message can carry: never
    the object itself."""
    who = _ACTOR.get() if who is None else who
    resolved = _resolve(who)
    if resolved is None:
        return None
    label, pk, text = resolved
    return text if label is None else [label, pk or "", text]


def from_ref(ref: Any) -> ActorRef | None:
    """An actor reference read from a message; anything that is not one is no actor (no code runs)."""
    if isinstance(ref, str):
        return ActorRef(None, None, ref[:255])
    if isinstance(ref, list) and len(ref) == 3 and all(isinstance(part, str) for part in ref):
        return ActorRef(ref[0][:100], ref[1][:255], ref[2][:255])
    return None


@contextmanager
def for_task(ref: Any, task_id: str | None) -> Iterator[None]:
    """Run a Celery task's transitions as the actor who enqueued it, recording the task id."""
    actor_token = _ACTOR.set(from_ref(ref))
    task_token = _TASK.set(task_id)
    try:
        yield
    finally:
        _TASK.reset(task_token)
        _ACTOR.reset(actor_token)


def _resolve(who: Any) -> tuple[str | None, str | None, str] | None:
    if who is None:
        return None
    if isinstance(who, ActorRef):
        return who.label, who.pk, who.text
    if isinstance(who, str):
        return None, None, who
    if getattr(who, "is_authenticated", True) is False:  # AnonymousUser
        return None
    if isinstance(who, Model):
        return who._meta.label_lower, str(who.pk), str(who)[:255]
    return None, None, str(who)[:255]


def enabled(machine: StateMachine) -> bool:
    return getattr(machine, "history", False) is True


# -- what is written ----------------------------------------------------------------------------


def redact(machine: StateMachine, transition: Transition, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The side effect's arguments as the record keeps them: the machine's hook, then JSON."""
    hook: Callable[[Transition, dict[str, Any]], dict[str, Any]] | None = getattr(machine, "redact_history", None)
    if hook is not None:
        kept = hook(transition, dict(kwargs))
    else:
        secret = set(getattr(machine, "history_redact", ()))
        kept = {name: REDACTED if name in secret else value for name, value in kwargs.items()}
    return {str(name): _jsonable(value) for name, value in kept.items()}


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False))
    except (TypeError, ValueError):
        return repr(value)


def _actor_fields() -> dict[str, Any]:
    resolved = _resolve(_ACTOR.get())
    if resolved is None:
        return {}
    label, pk, text = resolved
    return {"actor_model": label or "", "actor_id": pk if label is not None else text, "actor_label": text}


def _object_fields(instance: Model) -> dict[str, Any]:
    # The row as its lease names it (keys.object_key): the root model, so a proxy or a
    # multi-table-inheritance child and its parent share one history; the primary key in the form
    # the row holds it ("7.5" given is 7.50 read back), else one row's records split between two
    # ids; a key longer than the column is stored as its head and digest, never refused by it.
    label, _, pk = object_key(instance).partition(":")
    return {"model": label, "object_id": stored_key(pk)}


def record(
    machine: StateMachine,
    instance: Model,
    transition: Transition,
    lease: HeldLease | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    using: str,
) -> None:
    """Write the record of ``transition`` in the current (the transition's own) transaction; the
    side effect's arguments by parameter name, positional ones too."""
    if not enabled(machine):
        return
    from .models import TransitionRecord

    diverted = _DIVERTED.get()
    failed = diverted[2] if diverted is not None and diverted[:2] == (id(instance), machine.field_name) else ""
    TransitionRecord.objects.using(using).create(
        **_object_fields(instance),
        field=machine.field_name,
        edge=transition.name or "",
        failed_edge=failed,
        source=_jsonable(transition.start),
        target=_jsonable(transition.end),
        kwargs=redact(machine, transition, machine.named_arguments(transition, instance, args, kwargs)),
        fencing_token=lease.fencing_token if lease is not None else None,
        lease_owner=lease.owner if lease is not None else "",
        task_id=_task_id(),
        **_actor_fields(),
    )


def _task_id() -> str:
    """The id of the Celery task this transition runs for: dsm_redis's own (``for_task``), else a
    project's task running in this thread, if any."""
    task_id = _TASK.get()
    if task_id is None and "celery" in sys.modules:  # never imports Celery for a project without it
        from celery import current_task

        request = getattr(current_task, "request", None)
        task_id = getattr(request, "id", None)
    # A caller's own task id may be longer than the column (apply_async(task_id=...)): a record
    # that does not fit would roll its transition back, on every delivery.
    return stored_key(str(task_id or ""))


@contextmanager
def diverted(machine: StateMachine, instance: Model, failed: Transition | None) -> Iterator[None]:
    """The edge to an error state taken in this block replaces ``failed`` (``TransitionFailed``)."""
    token = _DIVERTED.set((id(instance), machine.field_name, (failed.name if failed is not None else None) or ""))
    try:
        yield
    finally:
        _DIVERTED.reset(token)


@contextmanager
def inserting(instance: Model) -> Iterator[None]:
    """The protocol inserts an unsaved object: its transition's record stands for the creation."""
    token = _INSERTING.set(_INSERTING.get() | {id(instance)})
    try:
        yield
    finally:
        _INSERTING.reset(token)


# -- creation -----------------------------------------------------------------------------------


def track_creation(model: type[Model], machine: StateMachine) -> None:
    """Record each ``INSERT`` of ``model`` (in its start state) in the same transaction.

    ``Model.save`` runs the ``INSERT`` outside any transaction in autocommit mode, and ``post_save``
    after it: a record written there could survive an insert that failed, or be lost after one that
    committed. So ``_save_table`` — the one call that writes the concrete row — runs in ``atomic``
    with the record. ``bulk_create`` and raw saves (fixtures) are not recorded.
    """
    original = model._save_table  # type: ignore[attr-defined]
    signature = inspect.signature(original)

    @wraps(original)
    def _save_table(self: Model, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        raw, cls, using = bound.arguments["raw"], bound.arguments["cls"], bound.arguments["using"]
        adding = self._state.adding
        concrete = cls is None or cls is type(self)._meta.concrete_model
        if raw or not adding or not concrete or id(self) in _INSERTING.get() or not isinstance(self, model):
            return original(self, *args, **kwargs)
        with transaction.atomic(using=using, savepoint=False):
            updated = original(self, *args, **kwargs)
            if not updated:
                _record_creation(self, machine, using)
        return updated

    model._save_table = _save_table  # type: ignore[attr-defined]


def _record_creation(instance: Model, machine: StateMachine, using: str) -> None:
    from .models import TransitionRecord

    TransitionRecord.objects.using(using).create(
        **_object_fields(instance),
        field=machine.field_name,
        edge="",
        source=None,
        target=_jsonable(machine.current_state(instance)),
        kwargs={},
        task_id=_task_id(),
        **_actor_fields(),
    )


def history_of(machine: StateMachine, instance: Model) -> Any:
    """``obj.<machine>.history()``: the object's records for this machine, newest first."""
    from django.db import router

    from .models import TransitionRecord

    using = instance._state.db or router.db_for_read(type(instance), instance=instance)
    if instance.pk is None:
        return TransitionRecord.objects.using(using).none()  # unsaved: nothing recorded yet
    return (
        TransitionRecord.objects.using(using)
        .filter(
            **_object_fields(instance),
            field=machine.field_name,
        )
        .order_by("-id")
    )
