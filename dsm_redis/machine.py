"""Declaring a state machine: ``State``, ``Transition``, ``precondition`` and ``StateMachine``.

This module is pure data and graph logic; it never touches the database or a lock (that is
``protocol.py``). A machine is validated when its class is defined, so a malformed machine fails at
import time with ``ImproperlyConfigured`` naming the problem, not at the first transition in
production.

State values may be ints, strings or ``enum`` members (Django's ``IntegerChoices``/``TextChoices``
included); they are compared by their plain value, so ``State(Status.ALIVE)``, ``Status.ALIVE`` and
``1`` name the same state.

The machine is the one owner of graph questions, asked on plain state values with no instance and
no precondition: the edge with a name (``edge_named``), the edge to a target (``edge_to``), the
walk to a target (``shortest_path``). The instance-level resolvers (``edge_by_name``,
``edge_for_target``, ``edge_toward``) answer them for the row read under the lock and add the
precondition; the asynchronous entry points (``tasks.py``) ask the same questions at the call.

Longer than most modules here because it is one concept that reads better whole: what a machine
is (its declaration, its validation at class definition, and the questions its graph answers).
"""

from __future__ import annotations

import enum
import inspect
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, TypeAlias

from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured

from .exceptions import TransitionException

__all__ = ["State", "StateValue", "Transition", "precondition", "StateMachine"]

#: A state as you name it: an int, a str, an ``enum`` member (``IntegerChoices``...) or a ``State``.
#: Compared by its plain value (``plain()``); a machine's own answers are plain values.
StateValue: TypeAlias = Hashable
SideEffect: TypeAlias = Callable[..., Any]
Precondition: TypeAlias = Callable[[Any], bool]


class HeldLease(Protocol):
    """What a side effect may use of the lease its transition runs under (``transition.lease``, a
    :class:`dsm_redis.Lease`): its key, owner and fencing token, the time left, and the fence.

    Named by this protocol: this module is the pure layer under the lock, and importing ``lease``
    (even for annotations) would close an import cycle (lease -> signals -> machine).
    """

    @property
    def key(self) -> str: ...

    @property
    def owner(self) -> str: ...

    @property
    def fencing_token(self) -> int | None: ...

    @property
    def remaining(self) -> float: ...

    def check(self) -> None: ...

    def fence(self, using: str = ...) -> None: ...


_ANY: Any = object()  # edges_from(..., to=...) not given


def plain(value: StateValue) -> StateValue:
    """The comparable value of a state: unwraps ``State`` and ``enum`` members."""
    if isinstance(value, State):
        value = value.value
    if isinstance(value, enum.Enum):
        return value.value  # type: ignore[no-any-return]
    return value


# Names a side effect may not take: they are attributes of the bound machine (``obj.state_machine``).
RESERVED_EDGE_NAMES = frozenset(
    {
        "transition_to",
        "transition_through",
        "get_possible_transitions",
        "get_current_state",
        "async_transition_to",
        "async_transition_through",
        "atransition_to",
        "atransition_through",
        "machine",
        "instance",
        "state_machine",
        "history",
        "allowed_transitions",
    }
)


class State:
    """A state of the machine; ``State(a) | side_effect | State(b)`` declares an edge."""

    __slots__ = ("value",)

    def __init__(self, value: StateValue) -> None:
        self.value = plain(value)

    def __or__(self, side_effect: SideEffect | None) -> _HalfEdge:
        if side_effect is not None and not callable(side_effect):
            raise ImproperlyConfigured(
                f"A transition is State | callable-or-None | State; got State({self.value!r}) | {side_effect!r}"
            )
        return _HalfEdge(self.value, side_effect)

    def __eq__(self, other: object) -> bool:
        return plain(other) == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"State({self.value!r})"


class _HalfEdge:
    """``State(a) | side_effect``, waiting for its end state."""

    __slots__ = ("start", "side_effect")

    def __init__(self, start: StateValue, side_effect: SideEffect | None) -> None:
        self.start = start
        self.side_effect = side_effect

    def __or__(self, end: Any) -> Transition:
        if isinstance(end, (_HalfEdge, Transition)) or callable(end):
            raise ImproperlyConfigured(
                f"A transition is State | callable-or-None | State; the end of the edge from {self.start!r} is {end!r}"
            )
        return Transition(
            start=self.start,
            end=plain(end),
            precondition=getattr(self.side_effect, "_precondition", None),
            side_effect=self.side_effect,
        )

    def __repr__(self) -> str:
        return f"State({self.start!r}) | {_name(self.side_effect)} | ?"


@dataclass(frozen=True)
class Transition:
    """One edge. A side effect receives a copy carrying the lease it runs under.

    ``fencing_token`` is the token of that lease (``None`` for an unsaved object, which is not
    locked); pass it to systems outside the database as an idempotency key or fence.
    """

    start: StateValue
    end: StateValue
    precondition: Precondition | None = None
    side_effect: SideEffect | None = None
    lease: HeldLease | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str | None:
        return self.side_effect.__name__ if self.side_effect is not None else None

    @property
    def fencing_token(self) -> int | None:
        return self.lease.fencing_token if self.lease is not None else None

    def allowed(self, instance: Any) -> bool:
        return self.precondition is None or bool(self.precondition(instance))

    def under(self, lease: HeldLease | None) -> Transition:
        return replace(self, lease=lease)

    def __str__(self) -> str:
        return f"{self.start!r} -[{_name(self.side_effect)}]-> {self.end!r}"


def _name(side_effect: SideEffect | None) -> str:
    return "None" if side_effect is None else getattr(side_effect, "__name__", repr(side_effect))


def precondition(check: Precondition) -> Callable[[SideEffect], SideEffect]:
    """Guard an edge: ``check(instance)`` must be true, evaluated on the row read under the lock."""

    def wrap(func: SideEffect) -> SideEffect:
        func._precondition = check  # type: ignore[attr-defined]
        return func

    return wrap


class StateMachine:
    """Subclass it, declare ``transitions`` (and optionally ``start``), attach with ``StateMachineField``.

    Side effects are called as ``side_effect(machine, instance, transition, **kwargs)``.
    """

    start: ClassVar[StateValue] = None
    #: Record every transition (``dsm_redis.history``); the field's ``history=`` overrides it.
    history: bool = False
    transitions: ClassVar[Iterable[Any] | None] = None

    # Filled by __init_subclass__.
    _transitions: ClassVar[tuple[Transition, ...]] = ()
    _by_name: ClassVar[dict[str, tuple[Transition, ...]]] = {}
    _states: ClassVar[frozenset[StateValue]] = frozenset()
    _signatures: ClassVar[dict[SideEffect, inspect.Signature]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.transitions is None:
            return  # an abstract base machine; the field refuses to bind it
        cls._transitions = _validated(cls.__name__, cls.transitions, cls.start)
        by_name: dict[str, list[Transition]] = {}
        for t in cls._transitions:
            if t.name is not None:
                by_name.setdefault(t.name, []).append(t)
        cls._by_name = {name: tuple(ts) for name, ts in by_name.items()}
        cls._states = frozenset(s for t in cls._transitions for s in (t.start, t.end))
        cls._signatures = {t.side_effect: inspect.signature(t.side_effect) for t in cls._transitions if t.side_effect}

    def __init__(self, field_name: str, state_field_name: str) -> None:
        if self.transitions is None:
            raise ImproperlyConfigured(f"{type(self).__name__} declares no `transitions`")
        self.field_name = field_name
        self.state_field_name = state_field_name

    # -- reading ---------------------------------------------------------------------------------

    @property
    def states(self) -> frozenset[StateValue]:
        return self._states

    @property
    def edges(self) -> tuple[Transition, ...]:
        """Every edge, in declared order."""
        return self._transitions

    @property
    def edge_names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def current_state(self, instance: Any) -> StateValue:
        return plain(getattr(instance, self.state_field_name))

    def label(self, instance_or_model: Any, state: StateValue) -> str:
        """``1 (Alive)`` when the state field has choices, else the value's repr."""
        value = plain(state)
        if instance_or_model is None:
            return repr(value)
        model = instance_or_model if isinstance(instance_or_model, type) else type(instance_or_model)
        meta = getattr(model, "_meta", None)  # None: not a Django model (unit tests of the graph)
        try:
            choices = meta.get_field(self.state_field_name).flatchoices if meta is not None else ()
        except FieldDoesNotExist:
            choices = ()
        for choice, text in choices:
            if plain(choice) == value:
                return f"{value!r} ({text})"
        return repr(value)

    def possible_transitions(self, instance: Any) -> list[Transition]:
        current = self.current_state(instance)
        return [t for t in self.edges_from(current) if t.allowed(instance)]

    def check_known(self, state: StateValue) -> StateValue:
        """The plain value of ``state``; ``TransitionException`` when the machine has no such state."""
        value = plain(state)
        if value not in self._states:
            raise TransitionException(
                f"{type(self).__name__} has no state {value!r}; its states are "
                f"{', '.join(repr(s) for s in sorted(self._states, key=repr))}"
            )
        return value

    # -- graph questions on plain state values (no instance, no precondition) -------------------
    # ``model`` (a model class or instance, optional) only labels the states in messages.

    def edges_from(self, state: StateValue, *, name: str | None = None, to: StateValue = _ANY) -> list[Transition]:
        """The edges leaving ``state`` (those named ``name``, those ending in ``to``), in declared order."""
        return [
            t
            for t in self._transitions
            if t.start == state and (name is None or t.name == name) and (to is _ANY or t.end == to)
        ]

    def edge_named(self, state: StateValue, name: str, *, model: Any = None) -> Transition:
        """The edge called ``name`` from ``state``; ``TransitionException`` naming where it starts."""
        for t in self._by_name.get(name, ()):
            if t.start == state:
                return t
        starts = ", ".join(self.label(model, t.start) for t in self._by_name.get(name, ()))
        raise TransitionException(
            f"{type(self).__name__}: cannot call edge {name!r} from {self.label(model, state)}; it starts from {starts}"
        )

    def edge_to(self, state: StateValue, target: StateValue, *, model: Any = None) -> Transition:
        """The one edge from ``state`` to ``target``; ``TransitionException`` when there is none or
        more than one (then the edges must be called by name)."""
        candidates = self.edges_from(state, to=target)
        if not candidates:
            raise TransitionException(
                f"{type(self).__name__}: cannot transition from {self.label(model, state)} "
                f"to {self.label(model, target)}: no such edge"
            )
        if len(candidates) > 1:
            raise TransitionException(
                f"{type(self).__name__}: ambiguous transition {self.label(model, state)} -> "
                f"{self.label(model, target)}; call one of the edges instead: "
                f"{', '.join(_name(t.side_effect) for t in candidates)}"
            )
        return candidates[0]

    def first_edge_toward(self, current: StateValue, target: StateValue, *, model: Any = None) -> Transition | None:
        """The first edge of a shortest path from ``current`` to ``target`` (breadth-first, edges in
        declared order); ``None`` when already there; ``TransitionException`` when there is no path."""
        if current == target:
            return None
        first_edge: dict[StateValue, Transition] = {}
        queue = deque([current])
        seen = {current}
        while queue:
            state = queue.popleft()
            for t in self.edges_from(state):
                if t.end in seen:
                    continue
                seen.add(t.end)
                first_edge[t.end] = first_edge.get(state, t)
                if t.end == target:
                    return first_edge[t.end]
                queue.append(t.end)
        raise TransitionException(
            f"{type(self).__name__}: no path from {self.label(model, current)} to {self.label(model, target)}"
        )

    def shortest_path(self, current: StateValue, target: StateValue, *, model: Any = None) -> list[Transition]:
        """The edges ``transition_through`` takes from ``current`` to ``target``: at each state the
        first edge of a shortest path (``first_edge_toward``); ``[]`` when already there."""
        path: list[Transition] = []
        while (edge := self.first_edge_toward(current, target, model=model)) is not None:
            path.append(edge)
            current = edge.end
        return path

    def path_states(self, current: StateValue, target: StateValue) -> list[StateValue]:
        """The states a walk from ``current`` to ``target`` passes through (``target`` excluded)."""
        return [t.start for t in self.shortest_path(current, target)]

    # -- resolving a request against the row read under the lock (the graph, then the guard) ----

    def edge_for_target(self, instance: Any, target: StateValue) -> Transition:
        return self.guarded(instance, self.edge_to(self.current_state(instance), target, model=instance))

    def edge_by_name(self, instance: Any, name: str) -> Transition:
        return self.guarded(instance, self.edge_named(self.current_state(instance), name, model=instance))

    def edge_toward(self, instance: Any, target: StateValue) -> Transition | None:
        """The first edge of a shortest path to ``target``; ``None`` when already there."""
        edge = self.first_edge_toward(self.current_state(instance), target, model=instance)
        return None if edge is None else self.guarded(instance, edge)

    def check_arguments(
        self, transition: Transition, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Wrong arguments are a ``TypeError`` raised before anything runs."""
        if transition.side_effect is None:
            if args or kwargs:
                raise TypeError(f"edge {transition} has no side effect and takes no arguments")
            return
        try:
            self._signatures[transition.side_effect].bind(self, instance, transition, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{transition.name}(): {exc}") from None

    def named_arguments(
        self, transition: Transition, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """The side effect's arguments by parameter name, positional ones too (``check_arguments``
        accepted them): a positional ``card`` is the ``card`` a redaction list names."""
        if not args or transition.side_effect is None:
            return dict(kwargs)
        signature = self._signatures[transition.side_effect]
        named: dict[str, Any] = {}
        bound = signature.bind(self, instance, transition, *args, **kwargs).arguments
        for name, value in list(bound.items())[3:]:  # after the machine, the instance, the transition
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = list(value) if kind is inspect.Parameter.VAR_POSITIONAL else value
        return named

    def guarded(self, instance: Any, transition: Transition) -> Transition:
        """``transition`` when its precondition holds for ``instance``, else ``TransitionException``."""
        if not transition.allowed(instance):
            raise TransitionException(
                f"{type(self).__name__}: cannot transition from {self.label(instance, transition.start)} "
                f"to {self.label(instance, transition.end)} using {_name(transition.side_effect)!r}: "
                f"precondition failed"
            )
        return transition


def _validated(machine: str, transitions: Iterable[Any], start: Any) -> tuple[Transition, ...]:
    result = []
    for index, t in enumerate(transitions):
        if not isinstance(t, Transition):
            raise ImproperlyConfigured(f"{machine}.transitions[{index}] is {t!r}, not State | callable-or-None | State")
        result.append(t)
    if not result:
        raise ImproperlyConfigured(f"{machine}.transitions is empty")
    seen: dict[tuple[Any, str], Transition] = {}
    for t in result:
        if t.name is None:
            continue
        if "as_task" in inspect.signature(t.side_effect).parameters:  # type: ignore[arg-type]
            raise ImproperlyConfigured(
                f"{machine}: side effect {t.name!r} takes an `as_task` argument, which edge calls "
                f"reserve for sending the transition as a Celery task; rename it"
            )
        if t.name in RESERVED_EDGE_NAMES:
            raise ImproperlyConfigured(
                f"{machine}: side effect {t.name!r} shadows a method of the bound state machine; rename it"
            )
        if _is_async(t.side_effect) or _is_async(t.precondition):
            raise ImproperlyConfigured(
                f"{machine}: side effect {t.name!r} (or its precondition) is an async function; side effects "
                f"run inside the transition's database transaction, which is synchronous in Django: make it a "
                f"plain function (await obj.<field>.a{t.name}() runs it in a worker thread)"
            )
        if (t.start, t.name) in seen:
            raise ImproperlyConfigured(
                f"{machine}: two edges from {t.start!r} use the side effect {t.name!r} "
                f"({seen[(t.start, t.name)]} and {t}); calling {t.name}() would be ambiguous"
            )
        seen[(t.start, t.name)] = t
    names = {t.name for t in result if t.name is not None}
    for name in sorted(names):
        if f"a{name}" in names:
            raise ImproperlyConfigured(
                f"{machine}: edges {name!r} and {'a' + name!r} collide: obj.<field>.a{name}() is the asyncio "
                f"call of {name!r}; rename {'a' + name!r}"
            )
    if start is not None and plain(start) not in {s for t in result for s in (t.start, t.end)}:
        raise ImproperlyConfigured(f"{machine}.start is {plain(start)!r}, which no transition names")
    return tuple(result)


def _is_async(func: Callable[..., Any] | None) -> bool:
    return func is not None and (
        inspect.iscoroutinefunction(func)
        or inspect.isasyncgenfunction(func)
        or inspect.iscoroutinefunction(getattr(func, "__call__", None))  # noqa: B004 - an instance's async __call__
    )


def attached_machine(model: type, name: str) -> StateMachine | None:
    """The machine a ``StateMachineField`` attached to ``model`` (or one of its bases) as ``name``.

    Looked up statically (the class attribute, not the bound machine an instance would get), so an
    untrusted ``name`` — a task's payload — runs no code; ``None`` for anything else.
    """
    descriptor = inspect.getattr_static(model, name, None) if isinstance(name, str) else None
    machine = getattr(descriptor, "machine", None)
    return machine if isinstance(machine, StateMachine) and machine.field_name == name else None
