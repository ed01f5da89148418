"""Deprecated names from deus-state-machina's other public modules, mapped onto dsm_redis's API.

For code that used more of the seed than its state-machine API. Each name warns
(``DeprecationWarning``) when used, and keeps the seed's meaning where it carries over:

- ``lock_object(obj)`` (seed: ``deus_state_machina.utils``, here also ``dsm_redis.utils``): the
  block runs in ``transaction.atomic()`` with the row locked by ``select_for_update``, now also
  under the object's lease, fenced: every process and host is excluded, not only transactions.
  It yields the :class:`~dsm_redis.Lease` (the seed yielded nothing).
- ``thread_lock_object(obj)`` (same modules): the seed's per-instance thread lock. For a saved
  object it is the object's lease (``object_lock``, re-entrant in its thread), which excludes every
  thread and process working on the row, not only threads sharing this Python instance; for an
  unsaved object it is still a per-instance re-entrant thread lock.
- ``TransitionTask.schedule_transition(obj, field, state_or_edge, transition_through=False,
  **kwargs)`` (seed: ``deus_state_machina.tasks``): the asynchronous transition, sent when the
  transaction commits; it returns the ``AsyncResult``. Keyword arguments only, JSON only.
- ``obj.state_machine.state_machine`` (seed: the machine behind the bound field, whose methods take
  the object): :class:`SeedMachine`, whose ``transition_to(obj, ...)`` and the other methods run
  the protected transitions of ``obj.state_machine``.

What does not carry over is listed in the README (Upgrading from deus-state-machina).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.db import router, transaction
from django.db.models import Model

if TYPE_CHECKING:
    from .lease import Lease
    from .machine import StateMachine, Transition

__all__ = ["SeedMachine", "TransitionTask", "lock_object", "thread_lock_object"]


def deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn the caller of the deprecated name (``stacklevel``: 3 from a function, 4 from the body of
    a ``@contextmanager``, which ``__enter__`` runs)."""
    warnings.warn(
        f"{old} is deprecated (deus-state-machina compatibility); use {new}", DeprecationWarning, stacklevel=stacklevel
    )


@contextmanager
def lock_object(obj: Model) -> Iterator[Lease]:
    """The seed's ``lock_object``: the block in a transaction with the row locked, here under the
    object's lease and fenced (writes in it are judged by the database like a transition's)."""
    deprecated(
        "lock_object(obj)",
        "dsm_redis.object_lock(obj) with lease.fence(using) inside transaction.atomic()",
        stacklevel=4,
    )
    from .lease import object_lock

    using = obj._state.db or router.db_for_write(type(obj), instance=obj)
    with object_lock(obj) as lease, transaction.atomic(using=using):
        type(obj)._base_manager.using(using).select_for_update().get(pk=obj.pk)
        lease.fence(using)
        yield lease


_attach_lock = threading.Lock()


@contextmanager
def thread_lock_object(obj: Model) -> Iterator[None]:
    """The seed's ``thread_lock_object``: the object's lease for a saved object, else a re-entrant
    thread lock attached to the instance."""
    deprecated("thread_lock_object(obj)", "dsm_redis.object_lock(obj)", stacklevel=4)
    if obj.pk is not None and not obj._state.adding:
        from .lease import object_lock

        with object_lock(obj):
            yield
        return
    with _attach_lock:
        lock = obj.__dict__.setdefault("_dsm_thread_lock", threading.RLock())
    with lock:
        yield


class TransitionTask:
    """The seed's ``TransitionTask``: only ``schedule_transition`` carries over. The task that runs is
    ``dsm_redis.transition`` (a seed ``TransitionTask`` message is not understood by it)."""

    def __init__(self) -> None:
        raise TypeError(
            "TransitionTask cannot be instantiated or sent: use TransitionTask.schedule_transition(...), "
            "or obj.<field>.async_transition_to(state)"
        )

    @classmethod
    def schedule_transition(
        cls,
        obj: Model,
        state_machine_field: str,
        target_state_or_edge: Any,
        transition_through: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Send the transition in a task when the transaction commits; its ``AsyncResult``."""
        deprecated(
            "TransitionTask.schedule_transition()",
            "obj.<field>.async_transition_to(state), async_transition_through(state) or <edge>(as_task=True)",
        )
        from .machine import Transition

        if args:
            raise TypeError("schedule_transition takes keyword arguments only: they travel as JSON")
        bound = getattr(obj, state_machine_field)
        if isinstance(target_state_or_edge, Transition):
            if transition_through:
                raise TypeError("schedule_transition: transition_through=True takes a target state, not an edge")
            if target_state_or_edge.name is None:  # an edge without side effect: its target names it
                return bound.async_transition_to(target_state_or_edge.end, **kwargs)
            return getattr(bound, target_state_or_edge.name)(as_task=True, **kwargs)
        if transition_through:
            if kwargs:
                raise TypeError("schedule_transition: transition_through=True takes no keyword arguments")
            return bound.async_transition_through(target_state_or_edge)
        return bound.async_transition_to(target_state_or_edge, **kwargs)


class SeedMachine:
    """``obj.state_machine.state_machine``: the seed's machine, whose methods take the object.

    Each call runs through ``obj``'s own bound machine (``obj.<field>``), so it is protected like any
    transition. Other attributes (``field_name``, ``state_field_name``, ``transitions``...) are the
    dsm_redis :class:`~dsm_redis.StateMachine`'s.
    """

    __slots__ = ("machine",)

    def __init__(self, machine: StateMachine) -> None:
        self.machine = machine

    def _bound(self, obj: Model) -> Any:
        return getattr(obj, self.machine.field_name)  # obj.<field>: its BoundStateMachine

    def get_current_state(self, obj: Model) -> Any:
        return self.machine.current_state(obj)

    def get_possible_transitions(self, obj: Model) -> list[Transition]:
        return self.machine.possible_transitions(obj)

    def transition_to(self, obj: Model, state_or_transition: Any, *args: Any, **kwargs: Any) -> Any:
        return self._bound(obj).transition_to(state_or_transition, *args, **kwargs)

    def transition_through(self, obj: Model, target_state: Any) -> Any:
        return self._bound(obj).transition_through(target_state)

    def async_transition_to(self, obj: Model, state: Any, **kwargs: Any) -> Any:
        return self._bound(obj).async_transition_to(state, **kwargs)

    def async_transition_through(self, obj: Model, state: Any) -> Any:
        return self._bound(obj).async_transition_through(state)

    def pretty_state_name(self, obj: Model, state: Any) -> str:
        """The state's choices label, or ``""`` (as the seed returned)."""
        meta = getattr(obj, "_meta", None)
        try:
            choices = dict(meta.get_field(self.machine.state_field_name).flatchoices) if meta is not None else {}
        except Exception:  # noqa: BLE001 - the seed returned "" for any lookup failure
            return ""
        return str(choices.get(state, ""))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.machine, name)

    def __repr__(self) -> str:
        return f"<SeedMachine {type(self.machine).__name__}>"
