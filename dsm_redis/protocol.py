"""The transition protocol, in the order it runs.

For a saved object, one transition (or the outermost of nested ones):

1. lease       take the object's lease (``lease.hold``): one Redis round trip sets the lock with its
               TTL and mints the fencing token; a nested call re-enters the lease it already holds;
2. transaction open a transaction (a savepoint inside a caller's ``atomic``);
   row lock    ``SELECT ... FOR UPDATE`` the row, bounded by the row-lock timeout, judging the
               lease's fencing token in the same statement where the database allows
               (``Lease.lock_row``, ``fence.lock_row``); the row read here *is* the current
               state — no refresh query;
3. check       resolve the request (edge name, target state, next step of a path) against that
               fresh row, run the precondition, validate the side effect's arguments, then run
               the side effect;
4. write       save only the columns that changed (``pre_save``/``post_save`` fire), and refuse
               to commit if the lease was lost meanwhile (``LockLost``); with history on, write
               the transition's record in the same transaction (``history.record``);
5. commit      leave the atomic block; then release the lease (owner-checked); then send
               ``state_changed`` (queued with ``transaction.on_commit``, so a rolled-back
               transition never signals; dsm_redis's hooks run before the caller's, and an
               object's signals are delivered in commit order: ``signals.py``).

Anything raised before the commit rolls the row back and restores the in-memory instance.
``TransitionFailed(error_state)`` from a side effect rolls the transition back and runs the edge to
``error_state`` in a new transaction under the same lease. An unsaved object has no row to lock:
the same steps run without lease and row lock, and it is saved (inserted) at the end, as
deus-state-machina did.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import connections, router, transaction
from django.db.models import Model
from django.db.models.fields.mixins import FieldCacheMixin

from . import history, telemetry
from .commit_hooks import commit_hook, on_commit_first
from .exceptions import LockLost, TransitionException, TransitionFailed
from .fence import save_judged
from .keys import object_key
from .lease import Lease, after_release, hold, require_managed_transactions
from .signals import deliver, state_changed

if TYPE_CHECKING:
    from .machine import StateMachine, Transition

__all__: list[str] = []  # internal: machines call run() and run_through(); aio.py run_held() and walk()

logger = logging.getLogger("dsm_redis")

# Given the object as it is now, the transition to take (None: nothing to do).
Resolve = Callable[[Model], "Transition | None"]
# Called inside each step's transaction of a walk, with the locked row and the edge it will take.
OnStep = Callable[[Model, "Transition"], None]

# (object, machine field) pairs whose side effect is running in this context. A side effect that
# calls its own machine on the same object again would resolve against the state *before* the
# outer edge and commit a mix of two edges from one state: refused (_refuse_reentry).
_RUNNING: ContextVar[frozenset[tuple[Any, str]]] = ContextVar("dsm_redis_running", default=frozenset())


@telemetry.traced()
def run(machine: StateMachine, instance: Model, resolve: Resolve, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One transition; returns the state the object is in afterwards."""
    using = router.db_for_write(type(instance), instance=instance)
    if instance.pk is None or instance._state.adding:
        return _step(machine, instance, resolve, args, kwargs, using, None)[0]
    require_managed_transactions(using)
    with hold(object_key(instance)) as lease:  # 1. lease
        return _step(machine, instance, resolve, args, kwargs, using, lease)[0]


@telemetry.traced(walk=True)
def run_through(machine: StateMachine, instance: Model, target: Any, *, on_step: OnStep | None = None) -> Any:
    """Walk the shortest path to ``target`` one transaction per step, all under one lease."""
    using = router.db_for_write(type(instance), instance=instance)
    if instance.pk is None or instance._state.adding:
        # No row to lock yet: this step inserts it.
        state, done = _step_toward(machine, instance, target, using, None, on_step)
        if done:
            return state
    require_managed_transactions(using)
    with hold(object_key(instance)) as lease:
        return walk(machine, instance, target, using, lease, on_step)


def run_held(
    machine: StateMachine,
    instance: Model,
    resolve: Resolve,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    using: str,
    lease: Lease,
) -> Any:
    """Steps 2-5 of one transition under ``lease``, which the caller holds (the asyncio path,
    ``aio.py``, runs this as its one call in a worker thread)."""
    return _step(machine, instance, resolve, args, kwargs, using, lease)[0]


def walk(
    machine: StateMachine, instance: Model, target: Any, using: str, lease: Lease, on_step: OnStep | None = None
) -> Any:
    """The steps of ``run_through`` under ``lease``, which the caller holds, until the walk is over."""
    while True:
        state, done = _step_toward(machine, instance, target, using, lease, on_step)
        if done:
            return state


def _step_toward(
    machine: StateMachine, instance: Model, target: Any, using: str, lease: Lease | None, on_step: OnStep | None
) -> tuple[Any, bool]:
    def resolve(row: Model) -> Transition | None:
        return machine.edge_toward(row, target)

    state, done = _step(machine, instance, resolve, (), {}, using, lease, on_step)
    # Each step is its own fenced transaction; stop at the target — judged on the row read
    # under the lock, not on the instance, which may be older than the row — or where a
    # TransitionFailed diverted the walk to its error state (as deus-state-machina did).
    return state, done or state == target


def _step(
    machine: StateMachine,
    instance: Model,
    resolve: Resolve,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    using: str,
    lease: Lease | None,
    on_step: OnStep | None = None,
) -> tuple[Any, bool]:
    """One transition in one transaction; ``lease`` is None for an unsaved object (no row to lock).

    ``on_step(row, transition)`` runs inside the transaction once the transition is chosen, also for
    the edge to an error state that a ``TransitionFailed`` diverts to (it replaces the failed one).

    Returns the object's state afterwards, and whether the request is over without a step to its
    own end: nothing to do (the row already is where it asked for), or diverted by ``TransitionFailed``.
    """
    _refuse_reentry(machine, instance, lease)
    # A nested call on the instance this lease is already transitioning, inside the same open
    # transaction: the row is locked and the instance is current; a second SELECT would only
    # overwrite the outer side effect's unsaved changes.
    nested = lease is not None and lease.record.changing(instance)
    in_caller_transaction = connections[using].in_atomic_block
    original = _snapshot(instance)
    committed: list[bool] = []
    transition: Transition | None = None  # the edge a TransitionFailed diverts from (history.diverted)
    if lease is not None:
        lease.record.wrote(using)  # if this is a caller's transaction, its commit releases the lease
    try:
        with telemetry.step(using), transaction.atomic(using=using):  # 2. transaction
            # First of our on-commit hooks: if a later one raises out of the COMMIT, the transition
            # did commit, and the instance must keep its new state.
            transaction.on_commit(partial(committed.append, True), using=using)
            row = instance
            if lease is not None and not nested:
                row = lease.lock_row(instance, using, in_caller_transaction=in_caller_transaction)
            if lease is not None:
                lease.check()  # a lease lost while waiting for the row must not start a side effect
            transition = resolve(row)  # 3. check against the row read under the lock
            telemetry.resolved(machine, row, transition, None if lease is None else lease.fencing_token)
            if transition is None:
                if row is not instance:
                    _adopt_row(instance, row)  # the caller's instance may be older than the row
                return machine.current_state(row), True
            machine.check_arguments(transition, instance, args, kwargs)
            if on_step is not None:
                on_step(row, transition)
            if row is not instance:
                _adopt_row(instance, row)
            before = _snapshot(instance)
            if transition.side_effect is not None:
                _run_side_effect(machine, instance, transition, lease, args, kwargs, nested)
            setattr(instance, machine.state_field_name, transition.end)
            if lease is None:
                with history.inserting(instance):  # this transition's record stands for the creation
                    instance.save(using=using)  # unsaved: inserted, as deus-state-machina did
            else:
                _write(instance, before, machine.state_field_name, using, lease)  # 4. write
                try:
                    lease.check()  # refuse to commit work done after the lease ran out
                except LockLost:
                    logger.error("refusing to commit %s on %s: lease lost", transition, lease.key)
                    raise
            history.record(machine, instance, transition, lease, args, kwargs, using)  # commits with the write, or not at all
            key, token = (lease.key, lease.fencing_token) if lease is not None else (None, None)
            # Ahead of every hook of the caller's: one that raises cannot drop the signal, and a
            # transition one of them makes cannot signal before this one (signals.py).
            on_commit_first(partial(_signal, instance, transition.end, machine, key, token), using)
        # 5. committed (or our savepoint released inside a caller's transaction)
        return transition.end, False
    except TransitionFailed as failed:
        telemetry.diverted()
        _restore(instance, original)
        target = machine.check_known(failed.error_state)
        resolve_error = partial(machine.edge_for_target, target=target)
        with history.diverted(machine, instance, transition):  # its record names the failed edge
            return _step(machine, instance, resolve_error, (), failed.kwargs, using, lease, on_step)[0], True
    except BaseException:
        if not committed:
            _restore(instance, original)
        raise


def _run_side_effect(
    machine: StateMachine,
    instance: Model,
    transition: Transition,
    lease: Lease | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    nested: bool,
) -> None:
    assert transition.side_effect is not None
    if lease is not None:
        lease.record.start_changing(instance)
    running = _RUNNING.set(_RUNNING.get() | {(i, machine.field_name) for i in _identities(instance, lease)})
    try:
        transition.side_effect(machine, instance, transition.under(lease), *args, **kwargs)
    finally:
        _RUNNING.reset(running)
        if lease is not None and not nested:
            lease.record.done_changing(instance)


def _identities(instance: Model, lease: Lease | None) -> set[Any]:
    # The instance, and the row (its lease key) when saved, whichever instance of it a side effect
    # holds; an unsaved object's side effect may save it and then call its machine under a lease.
    return {id(instance)} if lease is None else {id(instance), lease.key}


def _refuse_reentry(machine: StateMachine, instance: Model, lease: Lease | None) -> None:
    running = _RUNNING.get()
    if any((i, machine.field_name) in running for i in _identities(instance, lease)):
        raise TransitionException(
            f"{type(machine).__name__}: a transition of {machine.field_name!r} on this object is in progress "
            f"(called from its own side effect); one edge per transition — other machines may nest"
        )


# -- instance bookkeeping --------------------------------------------------------------------------


def _snapshot(instance: Model) -> dict[str, Any]:
    # Only loaded values: touching a deferred field would cost a query. Containers are copied so
    # that a side effect mutating a JSONField in place is seen as a change.
    values = instance.__dict__
    return {
        f.attname: copy.deepcopy(values[f.attname])
        if isinstance(values[f.attname], (dict, list))
        else values[f.attname]
        for f in instance._meta.concrete_fields
        if f.attname in values
    }


def _restore(instance: Model, snapshot: dict[str, Any]) -> None:
    for f in instance._meta.concrete_fields:
        if f.attname in snapshot:
            setattr(instance, f.attname, snapshot[f.attname])
        else:
            instance.__dict__.pop(f.attname, None)  # deferred again


def _adopt_row(instance: Model, row: Model) -> None:
    """Make ``instance`` the row read under the lock (what ``refresh_from_db`` would do)."""
    for f in instance._meta.concrete_fields:
        value = getattr(row, f.attname)
        if isinstance(f, FieldCacheMixin) and f.is_cached(instance) and instance.__dict__.get(f.attname) != value:
            f.delete_cached_value(instance)
        setattr(instance, f.attname, value)
    instance._state.db = row._state.db
    instance._state.adding = False


def _write(instance: Model, before: dict[str, Any], state_field: str, using: str, lease: Lease) -> None:
    names = {state_field}
    for f in instance._meta.concrete_fields:
        # auto_now fields change in pre_save, as they would for a plain save().
        if getattr(f, "auto_now", False) or instance.__dict__.get(f.attname) != before.get(f.attname):
            names.add(f.name)
    save_judged(instance, lease.token, using, names)  # with the lease's mark, judged by lock_row


@commit_hook("signal")
def _signal(instance: Model, state: Any, machine: StateMachine, key: str | None, token: int | None) -> None:
    # Runs among dsm_redis's first on-commit hooks, before any lease of the commit is released
    # (commit_hooks.on_commit_first); receivers run once the lease is released.
    send = partial(_send, instance, state, machine, token)
    if key is None:
        deliver(send)
    else:
        after_release(key, partial(deliver, send))  # the lease is released first, then receivers run


def _send(instance: Model, state: Any, machine: StateMachine, fencing_token: int | None) -> None:
    for receiver, response in state_changed.send_robust(
        sender=type(instance),
        instance=instance,
        state=state,
        field_name=machine.state_field_name,
        fencing_token=fencing_token,
    ):
        if isinstance(response, Exception):
            logger.error("state_changed receiver %r raised", receiver, exc_info=response)
