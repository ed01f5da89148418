"""``StateMachineField``: attaches a machine to a model; ``obj.<name>`` is a ``BoundStateMachine``.

Not a database column: the state lives in an ordinary field named by ``state_field_name``. The
bound machine is the entry point of every transition: synchronous ones run through ``protocol``,
asyncio ones (``atransition_to``, ``a<edge>``) through ``aio``, Celery ones are sent by ``tasks``
(imported when first used: importing it imports Celery, whose presence the system checks take as
the project using it).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.models import Model

from . import aio, protocol
from .exceptions import TransitionException
from .machine import StateMachine, StateValue, Transition, plain

__all__ = ["StateMachineField", "BoundStateMachine"]


class BoundStateMachine:
    """The machine of one instance. Edges are attributes: ``obj.state_machine.survive(**kwargs)``."""

    __slots__ = ("machine", "instance")

    def __init__(self, machine: StateMachine, instance: Model) -> None:
        self.machine = machine
        self.instance = instance

    def get_current_state(self) -> StateValue:
        return self.machine.current_state(self.instance)

    def get_possible_transitions(self) -> list[Transition]:
        """Edges allowed from the in-memory state, preconditions applied (no lock, no query)."""
        return self.machine.possible_transitions(self.instance)

    def allowed_transitions(self, user: Any) -> list[Transition]:
        """The edges ``user`` may take from the in-memory state: preconditions and ``@permission``."""
        from .permissions import has_permission

        return [t for t in self.get_possible_transitions() if has_permission(t, user, self.instance)]

    def history(self) -> Any:
        """This machine's ``TransitionRecord``s of the object, newest first (a queryset)."""
        from .history import history_of

        return history_of(self.machine, self.instance)

    def transition_to(self, state: StateValue | Transition, *args: Any, **kwargs: Any) -> Any:
        """Take the one edge from the current state (read under the lock) to ``state``."""
        if isinstance(state, Transition):
            return protocol.run(self.machine, self.instance, partial(self._exactly, state), args, kwargs)
        target = self.machine.check_known(state)
        return protocol.run(
            self.machine, self.instance, partial(self.machine.edge_for_target, target=target), args, kwargs
        )

    def transition_through(self, state: StateValue) -> Any:
        """Walk a shortest path to ``state``, one committed transition per step, under one lease."""
        return protocol.run_through(self.machine, self.instance, self.machine.check_known(state))

    async def atransition_to(self, state: StateValue | Transition, *args: Any, **kwargs: Any) -> Any:
        """``transition_to`` for asyncio code: the lease awaited on the loop, BEGIN..COMMIT in one
        worker-thread call (``aio.py``). Not ``async_transition_to``, which sends a Celery task."""
        return await aio.run(self.machine, self.instance, self._resolver(state), args, kwargs)

    async def atransition_through(self, state: StateValue) -> Any:
        """``transition_through`` for asyncio code (the whole walk in one worker-thread call)."""
        return await aio.run_through(self.machine, self.instance, self.machine.check_known(state))

    def _resolver(self, state: StateValue | Transition) -> protocol.Resolve:
        if isinstance(state, Transition):
            return partial(self._exactly, state)
        return partial(self.machine.edge_for_target, target=self.machine.check_known(state))

    def async_transition_to(self, state: StateValue, **kwargs: Any) -> Any:
        """``transition_to`` in a Celery task sent when the transaction commits; an ``AsyncResult``.

        ``kwargs`` travel as JSON; the task is a logged no-op if the object has left its current
        state by the time it runs (see ``dsm_redis.tasks``).
        """
        from .tasks import enqueue

        return enqueue(self.machine, self.instance, "to", state, kwargs)

    def async_transition_through(self, state: StateValue) -> Any:
        """``transition_through`` in a Celery task sent when the transaction commits; an ``AsyncResult``."""
        from .tasks import enqueue

        return enqueue(self.machine, self.instance, "through", state, {})

    def __getattr__(self, name: str) -> Callable[..., Any]:
        edges = self.machine.edge_names
        if not name.startswith("_") and name in edges:
            return partial(self._call_edge, name)
        if name.startswith("a") and not name.startswith("a_") and name[1:] in edges:  # a<edge>: for asyncio code
            return partial(self._acall_edge, name[1:])
        raise AttributeError(f"{type(self.machine).__name__} has no edge {name!r} (edges: {', '.join(sorted(edges))})")

    async def _acall_edge(self, name: str, *args: Any, **kwargs: Any) -> Any:
        resolve = partial(self.machine.edge_by_name, name=name)
        return await aio.run(self.machine, self.instance, resolve, args, kwargs)

    @property
    def state_machine(self) -> Any:
        """Deprecated: deus-state-machina's machine behind the bound field, whose methods take the
        object (``obj.state_machine.state_machine.transition_to(obj, state)``); see ``dsm_redis.compat``."""
        from .compat import SeedMachine, deprecated

        deprecated("obj.<field>.state_machine", "obj.<field> itself (or obj.<field>.machine)")
        return SeedMachine(self.machine)

    def _call_edge(self, name: str, *args: Any, as_task: bool = False, **kwargs: Any) -> Any:
        if as_task:  # the edge in a Celery task sent on commit (keyword arguments, as JSON)
            if args:
                raise TypeError(f"{name}(as_task=True) takes keyword arguments only: they travel as JSON")
            from .tasks import enqueue

            return enqueue(self.machine, self.instance, "edge", name, kwargs)
        return protocol.run(self.machine, self.instance, partial(self.machine.edge_by_name, name=name), args, kwargs)

    def _exactly(self, transition: Transition, row: Model) -> Transition:
        current = self.machine.current_state(row)
        if plain(transition.start) != current:
            raise TransitionException(
                f"{type(self.machine).__name__}: edge {transition} does not start from the current state "
                f"{self.machine.label(row, current)}"
            )
        return self.machine.guarded(row, transition)

    def __repr__(self) -> str:
        return f"<BoundStateMachine {type(self.machine).__name__} of {self.instance!r}>"


class StateMachineField:
    """``state_machine = StateMachineField(CatStateMachine, "state")`` on a model.

    ``history=True`` records every transition of it (``dsm_redis.history``).
    """

    def __init__(
        self, state_machine_class: type[StateMachine], state_field_name: str, *, history: bool | None = None
    ) -> None:
        if not (isinstance(state_machine_class, type) and issubclass(state_machine_class, StateMachine)):
            raise ImproperlyConfigured(f"StateMachineField needs a StateMachine subclass, not {state_machine_class!r}")
        self.state_machine_class = state_machine_class
        self.state_field_name = state_field_name
        # None: as the machine class says (``history = True``); see dsm_redis.history.
        self.history = getattr(state_machine_class, "history", False) is True if history is None else history
        self.machine: StateMachine | None = None
        self.name = ""
        self.model: type[Model] | None = None

    def contribute_to_class(self, cls: type[Model], name: str, **kwargs: Any) -> None:
        self.name = name
        self.model = cls
        self.machine = self.state_machine_class(name, self.state_field_name)
        self.machine.history = self.history
        if self.history:
            from .history import track_creation

            track_creation(cls, self.machine)
        setattr(cls, name, self)  # machine.attached_machine(cls, name) finds the machine here

    def __get__(self, instance: Model | None, owner: type[Model]) -> Any:
        if instance is None:
            return self
        assert self.machine is not None
        return BoundStateMachine(self.machine, instance)
