"""The transition protocol on asyncio, in the order it runs; and ``aobject_lock``.

``await obj.<field>.atransition_to(...)``, ``atransition_through(...)``, ``a<edge>(...)``:

1. lease       take the object's lease on the event loop (``alease.ahold``): the same Redis
               scripts and FIFO queue as ``lease.hold``; a busy object is awaited on its release's
               wake-up, holding no thread and no database connection; a task re-enters a lease it
               holds;
2.-5.          BEGIN to COMMIT — row lock judging the fencing token, check, side effect, fenced
               write, commit — is ``protocol``'s own step, run as ONE ``sync_to_async`` call
               (thread-sensitive, as Django requires for its transactions): Django's async ORM has
               no transactions, and side effects stay synchronous functions. One switch to a
               worker thread per transition (per walk, for ``atransition_through``);
6. release     on the loop, owner-checked, once the step has committed (commit, then release);
7. signals     ``state_changed``, as the blocking path sends it (one more worker-thread call only
               when receivers are connected: they are synchronous code).

Same errors and signals as the blocking calls. Cancelled while waiting for the lease: nothing is
left queued. Cancelled while its step still waits for the worker thread (busy with other calls):
the step never runs, and the lease is released. Cancelled during the database step: the step
cannot be interrupted (it runs in its thread), so the task waits for it to end — committed or
rolled back — before the lease is released and ``CancelledError`` goes on. Inside a caller's ``transaction.atomic()`` (possible only when
async code is run from synchronous code through ``async_to_sync``), the commit would come after
the release: refused with ``TransactionManagementError``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import connections, router
from django.db.models import Model
from django.db.transaction import TransactionManagementError

from . import protocol, telemetry
from .alease import DEFAULT, AsyncLease, ahold
from .keys import object_key
from .lease import lent, require_managed_transactions

if TYPE_CHECKING:
    from .machine import StateMachine

__all__ = ["aobject_lock"]

T = TypeVar("T")


@telemetry.traced_async()
async def run(
    machine: StateMachine, instance: Model, resolve: protocol.Resolve, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """One transition; returns the state the object is in afterwards."""
    using = router.db_for_write(type(instance), instance=instance)
    if instance.pk is None or instance._state.adding:  # no row to lock: the step inserts it
        return await _in_thread(_untraced(protocol.run), machine, instance, resolve, args, kwargs)
    async with ahold(object_key(instance)) as lease:  # 1. lease
        step = partial(protocol.run_held, machine, instance, resolve, args, kwargs, using, lease)
        return await _in_thread(_held_step, lease, using, step)  # 2.-5. BEGIN..COMMIT
    # 6. released, 7. signalled: at the end of the block (alease)


@telemetry.traced_async(walk=True)
async def run_through(machine: StateMachine, instance: Model, target: Any) -> Any:
    """Walk the shortest path to ``target`` one transaction per step, under one lease, in one thread call."""
    using = router.db_for_write(type(instance), instance=instance)
    if instance.pk is None or instance._state.adding:
        # The first step inserts the row; the rest of the walk is the blocking one, in the thread.
        return await _in_thread(_untraced(protocol.run_through), machine, instance, target)
    async with ahold(object_key(instance)) as lease:
        walk = partial(protocol.walk, machine, instance, target, using, lease)
        return await _in_thread(_held_step, lease, using, walk)


def _untraced(run: Callable[..., T]) -> Callable[..., T]:
    # The blocking run without its own transition span: this call's span (traced_async) is it.
    return getattr(run, "__wrapped__", run)


def _held_step(lease: AsyncLease, using: str, work: Callable[[], T]) -> T:
    """In the worker thread: ``work`` (the protocol's step) under ``lease``, in a transaction of its own."""
    require_managed_transactions(using)
    if connections[using].in_atomic_block:
        raise TransactionManagementError(
            "dsm_redis: an asynchronous transition cannot run inside a caller's transaction.atomic() "
            "(its lease is released on the event loop, which would come before that transaction's commit)"
        )
    with lent(lease):
        return work()


class _Abandoned(Exception):
    """The caller was cancelled before the worker thread began its call: it was not run."""


async def _in_thread(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in Django's thread-sensitive worker thread; if cancelled meanwhile, wait for it
    to end first: the lease it runs under must not be released while its transaction is open.

    Cancelled while the call still waits for the thread (busy with other calls), it never starts:
    a caller told ``CancelledError`` (its ``timeout``, a client gone) must not find afterwards that
    the transition committed anyway, for lack of a thread when it gave up.
    """
    abandoned = threading.Event()

    def call() -> T:
        if abandoned.is_set():
            raise _Abandoned
        return func(*args)

    future = asyncio.ensure_future(sync_to_async(call)())
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        abandoned.set()  # the thread checks it before it begins; once begun, the call runs to its end
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue  # bounded by the step itself: its row-lock timeout and its side effect
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller asked to see
        raise


@asynccontextmanager
async def aobject_lock(
    obj: Model, *, timeout: float | None = DEFAULT, ttl: float | None = None, using: str | None = None
) -> AsyncIterator[AsyncLease]:
    """``object_lock`` for asyncio: hold ``obj``'s lease across several awaits; the a-transitions
    of this task inside re-enter it and are fenced.

    Entering it (not re-entering it) passes the fencing barrier on ``using`` (in a worker thread)
    before the block runs: what the block reads afterwards cannot be overwritten by the late commit
    of a holder whose lease ran out (``fence.barrier``).
    """
    db = using or router.db_for_write(type(obj), instance=obj)
    async with ahold(object_key(obj), timeout=timeout, ttl=ttl) as lease:
        if lease.depth == 1:
            await _in_thread(_barrier, lease, db)
        yield lease


def _barrier(lease: AsyncLease, using: str) -> None:
    require_managed_transactions(using)
    lease.enter_barrier(using)
