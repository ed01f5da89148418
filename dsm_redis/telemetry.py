"""Observability: OpenTelemetry spans and metrics of leases, transitions and locked tasks.

Recorded through ``opentelemetry-api`` only (the ``otel`` extra): the application's SDK decides
where spans and metric points go. Until the application sets a tracer or meter provider the hooks
skip their work (the API would only swallow it). Without ``opentelemetry`` installed nothing of it
is imported, ``protocol.run`` is not even wrapped, and every other hook returns after one test of a
module constant. ``DSM_REDIS['OPTIONS']['TELEMETRY'] = False`` turns every hook off with the
package installed (default ``True``).

The names are this project's convention (OpenTelemetry has none for locks) and are stable: a
rename is a breaking change.

Spans (instrumentation scope ``dsm_redis``)::

    dsm_redis.transition          one transition call: an edge, transition_to, transition_through
    ├── dsm_redis.lease.wait      acquiring the object's lease (absent when the call re-enters one)
    └── dsm_redis.transition.step one transaction: row lock, check, side effect, write, commit
                                  (one per step of a walk; a TransitionFailed's error edge is its own)
    dsm_redis.task                one run of a locked_task body, its lease wait included; it has a
                                  link to every dsm_redis.transition span started inside it, and its
                                  dsm_redis.outcome is done | retried | skipped | lock_error | failed

Metrics (meter ``dsm_redis``)::

    dsm_redis.lease.wait           histogram, s      dsm_redis.outcome = acquired | timeout | unavailable
    dsm_redis.transition.duration  histogram, s      dsm_redis.outcome = committed | refused | failed | lock_error
    dsm_redis.lease.lost           counter, {lease}  dsm_redis.cause = expired | gone | unreachable | error
    dsm_redis.token.refused        counter, {token}  a fencing token the database refused (StaleFencingToken)
    dsm_redis.token.reanchored     counter, {token}  a fencing counter Redis lost, re-anchored above the mark
    dsm_redis.task.retried         counter, {task}   dsm_redis.reason = contention | lock_error
    dsm_redis.task.skipped         counter, {task}   a locked task ended by on_contention="skip"

Every metric also carries ``dsm_redis.model`` (``app_label.modelname``; a lease's is its root
model's); ``dsm_redis.transition.duration`` carries ``dsm_redis.machine`` (the machine's field
name), the task counters ``dsm_redis.task`` (the task's name). Outcomes of a transition:
``committed`` (it returned: its edge committed, or the row already was where it asked), ``refused``
(``TransitionException``: no such edge from the row's state, a precondition, a bad argument),
``failed`` (the side effect or the database raised anything else; also a ``TransitionFailed``,
whose error edge committed instead), ``lock_error`` (a ``LockError``: nothing was committed).
A lease is lost ``expired`` (its local deadline passed unrenewed), ``gone`` (Redis says it is no
longer ours), ``unreachable`` (Redis could not be reached until its deadline) or on an ``error``.

Cardinality rule: metric attributes take their values from code, never from data — models,
machines, outcomes, task names. Object ids (``dsm_redis.object``, the lease key
``app_label.modelname:pk``), fencing tokens and task ids are *span* attributes only. Spans also
carry ``dsm_redis.edge``, ``dsm_redis.source`` and ``dsm_redis.target`` (the step's; on the
transition span the request's: its source, the state it ended in, and the edge of a single-edge
call), ``dsm_redis.steps``, ``dsm_redis.database`` and ``dsm_redis.fencing_token``.
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .conf import get_config
from .exceptions import LockError, LockTimeout, TransitionException, TransitionFailed
from .keys import object_key

if TYPE_CHECKING:
    from django.db.models import Model

    from .machine import StateMachine, Transition

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace

    AVAILABLE = True
except ImportError:  # the otel extra is not installed: every hook is a no-op
    AVAILABLE = False

__all__ = [
    "SPAN_TRANSITION",
    "SPAN_LEASE_WAIT",
    "SPAN_STEP",
    "SPAN_TASK",
    "LEASE_WAIT",
    "TRANSITION_DURATION",
    "LEASE_LOST",
    "TOKEN_REFUSED",
    "TOKEN_REANCHORED",
    "TASK_RETRIED",
    "TASK_SKIPPED",
]

SCOPE = "dsm_redis"
SPAN_TRANSITION = "dsm_redis.transition"
SPAN_LEASE_WAIT = "dsm_redis.lease.wait"
SPAN_STEP = "dsm_redis.transition.step"
SPAN_TASK = "dsm_redis.task"
LEASE_WAIT = "dsm_redis.lease.wait"
TRANSITION_DURATION = "dsm_redis.transition.duration"
LEASE_LOST = "dsm_redis.lease.lost"
TOKEN_REFUSED = "dsm_redis.token.refused"
TOKEN_REANCHORED = "dsm_redis.token.reanchored"
TASK_RETRIED = "dsm_redis.task.retried"
TASK_SKIPPED = "dsm_redis.task.skipped"

# Attribute keys.
MODEL = "dsm_redis.model"
MACHINE = "dsm_redis.machine"
OUTCOME = "dsm_redis.outcome"
CAUSE = "dsm_redis.cause"
REASON = "dsm_redis.reason"
TASK = "dsm_redis.task"
OBJECT = "dsm_redis.object"  # spans only: an object id
EDGE = "dsm_redis.edge"
SOURCE = "dsm_redis.source"
TARGET = "dsm_redis.target"
STEPS = "dsm_redis.steps"
DATABASE = "dsm_redis.database"
FENCING_TOKEN = "dsm_redis.fencing_token"  # spans only
TASK_ID = "dsm_redis.task_id"  # spans only

# Seconds: a lease wait spans an uncontended round trip (~1 ms) to a queue of holders (seconds).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_NULL: AbstractContextManager[None] = nullcontext()
F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound=Callable[..., Awaitable[Any]])


def _histogram(meter: Any, name: str, description: str) -> Any:
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=BUCKETS
        )
    except TypeError:  # opentelemetry-api < 1.23: the SDK's View decides the buckets
        return meter.create_histogram(name, unit="s", description=description)


if AVAILABLE:
    _tracer = otel_trace.get_tracer(SCOPE)
    _meter = otel_metrics.get_meter(SCOPE)
    _lease_wait = _histogram(_meter, LEASE_WAIT, "Time to acquire an object's lease, by outcome")
    _transition_duration = _histogram(_meter, TRANSITION_DURATION, "Time of a transition call, by outcome")
    _lease_lost = _meter.create_counter(LEASE_LOST, unit="{lease}", description="Leases lost while held")
    _token_refused = _meter.create_counter(TOKEN_REFUSED, unit="{token}", description="Fencing tokens refused")
    _token_reanchored = _meter.create_counter(
        TOKEN_REANCHORED, unit="{token}", description="Fencing counters re-anchored above the database's mark"
    )
    _task_retried = _meter.create_counter(TASK_RETRIED, unit="{task}", description="Locked tasks re-sent")
    _task_skipped = _meter.create_counter(TASK_SKIPPED, unit="{task}", description="Locked tasks skipped")


_sdk_seen = False


def _sdk() -> bool:
    """An SDK (or any provider of the application's) is set, for traces or for metrics.

    Until one is, the API's proxies would swallow everything: the hooks skip even building it. A
    provider, once set, is never unset (the API sets each once per process), so that is remembered.
    """
    global _sdk_seen
    if _sdk_seen:
        return True
    unset = (
        isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider)
        and type(otel_metrics.get_meter_provider()).__name__ in _UNSET_METER_PROVIDERS
    )
    _sdk_seen = not unset
    return _sdk_seen


# The API's stand-in until the application sets a meter provider (private to the API: named, not
# imported; a version that renames it only costs the shortcut above, never a record).
_UNSET_METER_PROVIDERS = frozenset({"_ProxyMeterProvider"})


def enabled() -> bool:
    """Hooks record: the package is installed, ``TELEMETRY`` is on, and a provider is set."""
    return AVAILABLE and get_config().telemetry and _sdk()


def _value(state: Any) -> Any:
    """A state as an attribute value: an enum's value, a plain str/bool/int/float, else its str()."""
    if isinstance(state, enum.Enum):
        state = state.value
    for kind in (bool, int, float, str):
        if isinstance(state, kind):
            return kind(state)
    return str(state)


def _model_of_key(key: str) -> str:
    return key.partition(":")[0]


def _ended(span: Any, exc: BaseException | None, error: bool) -> None:
    if exc is not None and span.is_recording():
        span.record_exception(exc)
        if error:
            span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.end()


# -- the transition ---------------------------------------------------------------------------------


class _Transition:
    """One transition call being recorded: its span, its steps, its outcome."""

    __slots__ = (
        "walk",
        "attributes",
        "span",
        "started",
        "context",
        "active",
        "step",
        "edges",
        "source",
        "target",
        "diverted",
    )

    def __init__(self, machine: StateMachine, instance: Model, walk: bool) -> None:
        self.walk = walk
        self.attributes: dict[str, Any] = {MODEL: type(instance)._meta.label_lower, MACHINE: machine.field_name}
        self.step: Any = None
        self.edges: list[str | None] = []
        self.source: Any = None
        self.target: Any = None
        self.diverted = False
        span_attributes = dict(self.attributes)
        if instance.pk is not None:
            span_attributes[OBJECT] = object_key(instance)  # the lease's key: its root model's label
        self.span = _tracer.start_span(SPAN_TRANSITION, attributes=span_attributes)
        task = _TASK.get()
        if task is not None and task.span.is_recording() and hasattr(task.span, "add_link"):  # API >= 1.23
            task.span.add_link(self.span.get_span_context())
        self.started = time.perf_counter()

    def __enter__(self) -> None:
        self.context = otel_context.attach(otel_trace.set_span_in_context(self.span))
        self.active = _ACTIVE.set(self)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        elapsed = time.perf_counter() - self.started
        try:
            outcome = _outcome(exc, self.diverted)
            _transition_duration.record(elapsed, {**self.attributes, OUTCOME: outcome})
            span = self.span
            if span.is_recording():
                found: dict[str, Any] = {OUTCOME: outcome, STEPS: len(self.edges)}
                if self.source is not None:
                    found[SOURCE] = self.source
                if self.target is not None:
                    found[TARGET] = self.target
                if not self.walk and self.edges and self.edges[0] is not None:
                    found[EDGE] = self.edges[0]  # the edge asked for (diverted or not)
                span.set_attributes(found)
        finally:
            _ACTIVE.reset(self.active)
            otel_context.detach(self.context)
            _ended(self.span, exc, _is_error(exc))

    def resolved(self, source: Any, transition: Transition | None, token: int | None) -> None:
        if self.source is None:
            self.source = _value(source)
        self.target = _value(source if transition is None else transition.end)
        if transition is None:
            return
        self.edges.append(transition.name)
        step = self.step
        if step is not None and step.is_recording():
            found: dict[str, Any] = {SOURCE: _value(transition.start), TARGET: self.target}
            if transition.name is not None:
                found[EDGE] = transition.name
            if token is not None:
                found[FENCING_TOKEN] = token
            step.set_attributes(found)


def _outcome(exc: BaseException | None, diverted: bool) -> str:
    if exc is None:
        return "failed" if diverted else "committed"
    if isinstance(exc, TransitionException):
        return "refused"
    if isinstance(exc, LockError):
        return "lock_error"
    return "failed"


def _is_error(exc: BaseException | None) -> bool:
    """A span status of error: not for a refusal or a TransitionFailed (the machine working)."""
    return exc is not None and not isinstance(exc, (TransitionException, TransitionFailed))


_ACTIVE: ContextVar[_Transition | None] = ContextVar("dsm_redis_telemetry_transition", default=None)


def traced(*, walk: bool = False) -> Callable[[F], F]:
    """Record each call of ``run(machine, instance, ...)`` (``protocol.run``; ``walk``: ``run_through``).

    Without the package, ``run`` itself, undecorated.
    """

    def decorate(run: F) -> F:
        if not AVAILABLE:
            return run

        @functools.wraps(run)
        def recorded(machine: StateMachine, instance: Model, *args: Any, **kwargs: Any) -> Any:
            if not (get_config().telemetry and _sdk()):
                return run(machine, instance, *args, **kwargs)
            with _Transition(machine, instance, walk):
                return run(machine, instance, *args, **kwargs)

        return cast(F, recorded)

    return decorate


def traced_async(*, walk: bool = False) -> Callable[[A], A]:
    """``traced`` for the asyncio transitions (``aio.run``, ``aio.run_through``): the span is
    current on the loop, and the database step, run in a worker thread with a copy of the
    context, records its step span under it."""

    def decorate(run: A) -> A:
        if not AVAILABLE:
            return run

        @functools.wraps(run)
        async def recorded(machine: StateMachine, instance: Model, *args: Any, **kwargs: Any) -> Any:
            if not (get_config().telemetry and _sdk()):
                return await run(machine, instance, *args, **kwargs)
            with _Transition(machine, instance, walk):
                return await run(machine, instance, *args, **kwargs)

        return cast(A, recorded)

    return decorate


class _Step:
    __slots__ = ("recording", "span", "context", "outer")

    def __init__(self, recording: _Transition, using: str) -> None:
        self.recording = recording
        self.span = _tracer.start_span(SPAN_STEP, attributes={DATABASE: using})

    def __enter__(self) -> None:
        self.context = otel_context.attach(otel_trace.set_span_in_context(self.span))
        self.outer, self.recording.step = self.recording.step, self.span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.recording.step = self.outer
        otel_context.detach(self.context)
        _ended(self.span, exc, _is_error(exc))


def step(using: str) -> AbstractContextManager[None]:
    """Record one transaction of the transition being recorded (``protocol._step``)."""
    recording = _ACTIVE.get() if AVAILABLE else None
    return _NULL if recording is None else _Step(recording, using)


def resolved(machine: StateMachine, row: Model, transition: Transition | None, token: int | None) -> None:
    """The step chose ``transition`` (None: nothing to do) against ``row``, read under the lock."""
    recording = _ACTIVE.get() if AVAILABLE else None
    if recording is not None:
        recording.resolved(machine.current_state(row), transition, token)


def diverted() -> None:
    """A side effect raised ``TransitionFailed``: the call's outcome is ``failed``."""
    recording = _ACTIVE.get() if AVAILABLE else None
    if recording is not None:
        recording.diverted = True


# -- the lease ---------------------------------------------------------------------------------------


class _LeaseWait:
    __slots__ = ("model", "span", "context", "started")

    def __init__(self, key: str) -> None:
        self.model = _model_of_key(key)
        self.span = _tracer.start_span(SPAN_LEASE_WAIT, attributes={MODEL: self.model, OBJECT: key})
        self.started = time.perf_counter()

    def __enter__(self) -> None:
        self.context = otel_context.attach(otel_trace.set_span_in_context(self.span))

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        elapsed = time.perf_counter() - self.started
        try:
            if exc is None:
                outcome: str | None = "acquired"
            elif isinstance(exc, LockTimeout):
                outcome = "timeout"
            elif isinstance(exc, LockError):
                outcome = "unavailable"
            else:
                outcome = None  # interrupted (a time limit, KeyboardInterrupt): none of the three
            if outcome is not None:
                _lease_wait.record(elapsed, {MODEL: self.model, OUTCOME: outcome})
                if self.span.is_recording():
                    self.span.set_attribute(OUTCOME, outcome)
        finally:
            otel_context.detach(self.context)
            _ended(self.span, exc, exc is not None and not isinstance(exc, LockTimeout))


def lease_wait(key: str) -> AbstractContextManager[None]:
    """Record acquiring the lease on ``key`` (``lease.hold``)."""
    if not enabled():
        return _NULL
    return _LeaseWait(key)


def lease_lost(key: str, cause: str) -> None:
    """A held lease was lost (``Lease._lose``): ``cause`` is expired, gone, unreachable or error."""
    if enabled():
        _lease_lost.add(1, {MODEL: _model_of_key(key), CAUSE: cause})


def token_refused(key: str) -> None:
    """The database refused a fencing token (``fence._judge``)."""
    if enabled():
        _token_refused.add(1, {MODEL: _model_of_key(key)})


def token_reanchored(key: str) -> None:
    """A fencing counter Redis lost was re-anchored above the database's mark (``Lease._reanchor``)."""
    if enabled():
        _token_reanchored.add(1, {MODEL: _model_of_key(key)})


# -- locked tasks -------------------------------------------------------------------------------------


class _Task:
    __slots__ = ("span", "context", "active", "outcome")

    def __init__(self, name: str | None, task_id: str | None, key: str) -> None:
        attributes: dict[str, Any] = {MODEL: _model_of_key(key), OBJECT: key}
        if name is not None:
            attributes[TASK] = name
        if task_id is not None:
            attributes[TASK_ID] = task_id
        self.span = _tracer.start_span(SPAN_TASK, attributes=attributes)
        self.outcome: str | None = None

    def __enter__(self) -> None:
        self.context = otel_context.attach(otel_trace.set_span_in_context(self.span))
        self.active = _TASK.set(self)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            outcome = self.outcome or (
                "done" if exc is None else "lock_error" if isinstance(exc, LockError) else "failed"
            )
            if self.span.is_recording():
                self.span.set_attribute(OUTCOME, outcome)
        finally:
            _TASK.reset(self.active)
            otel_context.detach(self.context)
            _ended(self.span, exc, self.outcome is None and exc is not None)


# The locked task running in this context: the transitions inside link to it.
_TASK: ContextVar[_Task | None] = ContextVar("dsm_redis_telemetry_task", default=None)


def task(name: str | None, task_id: str | None, key: str) -> AbstractContextManager[None]:
    """Record one run of a locked task's body under the lease on ``key`` (``celery.run_locked``)."""
    if not enabled():
        return _NULL
    return _Task(name, task_id, key)


def _task_outcome(outcome: str) -> None:
    recording = _TASK.get()
    if recording is not None:
        recording.outcome = outcome


def task_retried(name: str, key: str, reason: str) -> None:
    """A locked task was re-sent: ``reason`` is contention (the lease was busy) or lock_error."""
    if enabled():
        _task_retried.add(1, {MODEL: _model_of_key(key), TASK: name, REASON: reason})
        _task_outcome("retried")


def task_skipped(name: str, key: str) -> None:
    """A locked task ended by ``on_contention="skip"``."""
    if enabled():
        _task_skipped.add(1, {MODEL: _model_of_key(key), TASK: name})
        _task_outcome("skipped")
