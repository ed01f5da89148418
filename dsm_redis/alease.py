"""Holding leases on asyncio: ``AsyncLease``, the task's registry, ``ahold``.

The asyncio counterpart of ``lease.hold``. A lease is the same ``lifecycle.Lease`` (token, local
deadline, ``check()``, ``lock_row``, ``fence``: what the transition's database step uses, in its
worker thread), taken, renewed and released through the backend's ``for_asyncio()`` calls
(``redis.asyncio`` for Redis: the same scripts and FIFO queue as blocking holders).

Safety contract:
- Ownership is per asyncio *task*, kept in a context variable (never a thread-local: many tasks
  share the loop's thread). A task re-enters a lease it holds (nested ``ahold`` blocks, the steps of
  ``atransition_through``, transitions inside ``aobject_lock``); a task it starts inherits the
  context but not the lease (its ``task`` differs): it contends as another process would.
- Waiting for a busy object is an ``await`` on the release's wake-up: no thread, no database
  connection. A waiter cancelled anywhere leaves the queue and gives back a grant that reached it
  (``backends``: ``AsyncLeases.acquire``).
- While held, the lease is renewed by an asyncio task of its own every TTL/3, which marks it lost
  when Redis says it is gone, or when Redis stays unreachable past the local deadline (as
  ``Lease.tick``); ``check()`` then raises ``LockLost`` before the commit. The renewal stops at the
  release, and also when the holding task has ended without releasing (it cannot renew a lease
  nobody will give back). A lease spanning transactions is never parked: the asyncio path refuses
  to run inside a caller's transaction (``aio.py``), so every commit is over before the release.
- The release runs when the outermost block ends, also when the holder is cancelled (shielded from
  a second cancellation) and when the block is closed from another context (an async generator
  the loop finalizes); then the ``state_changed`` signals its commits queued are delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

from asgiref.sync import sync_to_async

from . import telemetry
from .backends import AsyncLeases, LockBackend, get_backend, shielded
from .conf import get_config
from .exceptions import LockBackendUnavailable
from .lifecycle import Lease
from .signals import state_changed

__all__ = ["AsyncLease"]

logger = logging.getLogger("dsm_redis")
DEFAULT: Any = object()  # no timeout given: ACQUIRE_TIMEOUT

# key -> the lease a task holds on it. Immutable: a task started inside a block copies the mapping
# with its context, and must not see (or change) its parent's entries as its own.
_HELD: ContextVar[Mapping[str, AsyncLease]] = ContextVar("dsm_redis_aleases", default=MappingProxyType({}))


class AsyncLease(Lease):
    """A lease held by an asyncio task; to the database step it is an ordinary ``Lease``."""

    def __init__(
        self,
        key: str,
        backend: LockBackend,
        calls: AsyncLeases,
        owner: str,
        fencing_token: int,
        ttl: float,
        valid_until: float,
    ) -> None:
        # ``backend`` (blocking) serves the one call made from the database step's thread: re-anchoring.
        super().__init__(key, backend, owner, fencing_token, ttl, valid_until)
        self.calls = calls
        self.task = asyncio.current_task()
        self._renewal: asyncio.Task[None] | None = None

    def start_renewing(self) -> None:
        self._renewal = asyncio.get_running_loop().create_task(self._renew(), name=f"dsm_redis renew {self.key}")

    async def _renew(self) -> None:
        delay: float | None = self.renew_interval
        while delay is not None:
            await asyncio.sleep(delay)
            if self.task is not None and self.task.done():
                # Its holder ended without a release (a coroutine dropped mid-block): never renew it.
                self._lose(f"lease on {self.key} abandoned by its task", "error")
                await self.release()
                return
            delay = await self._renew_once()

    async def _renew_once(self) -> float | None:
        """One renewal (``Lease._tick`` for a lease that is never parked); the delay to the next."""
        if self.released or self.lost is not None:
            return None
        sent = time.monotonic()
        try:
            ok = await self.calls.renew(self.key, self.owner, self.ttl)
        except LockBackendUnavailable as exc:
            if self.remaining <= 0:
                self._lose(f"lease on {self.key} could not be renewed ({type(exc).__name__}) and expired", "unreachable")
                logger.error("%s", self.lost)
                return None
            logger.warning("renewing lease on %s failed (%s); retrying", self.key, type(exc).__name__)
            return min(1.0, self.ttl / 10)
        except Exception:  # fail safe: an unexpected error leaves the lease lost, never silently ours
            logger.exception("renewer: unexpected error on %s", self.key)
            self._lose(f"lease on {self.key} could not be renewed (unexpected error)", "error")
            return None
        if not ok:
            self._lose(f"lease on {self.key} was lost: it expired or another holder took it", "gone")
            logger.error("%s", self.lost)
            return None
        with self._lock:
            self._valid_until = sent + self.ttl
        return self.renew_interval

    async def release(self) -> None:
        """Stop renewing and give the lease back (owner-checked), once; never raises for Redis."""
        with self._lock:
            first = not self._released
            self._released = self._finished = True
        renewal, self._renewal = self._renewal, None
        if renewal is not None and renewal is not asyncio.current_task():
            renewal.cancel()
        if not first:
            return
        try:
            released = await self.calls.release(self.key, self.owner)
        except LockBackendUnavailable:
            logger.warning("could not release lease on %s: Redis unreachable; it expires in its TTL", self.key)
            return
        if not released and self.lost is None:
            logger.warning("lease on %s had expired or been taken before release", self.key)


def held_alease(key: str) -> AsyncLease | None:
    """The lease the current task holds on ``key``, if any."""
    lease = _HELD.get().get(key)
    if lease is None or lease.released or lease.task is not asyncio.current_task():
        return None
    return lease


@asynccontextmanager
async def ahold(key: str, *, timeout: float | None = DEFAULT, ttl: float | None = None) -> AsyncIterator[AsyncLease]:
    """Hold the lease on ``key`` for the block; re-enter it if this task holds it already."""
    lease = held_alease(key)
    if lease is not None:
        depth = lease.record.depth
        try:
            lease.record.depth = depth + 1
            yield lease
        finally:
            lease.record.depth = depth
        return
    config = get_config()
    backend = get_backend()
    calls = backend.for_asyncio()
    ttl = config.ttl if ttl is None else ttl
    with telemetry.lease_wait(key):
        grant = await calls.acquire(key, ttl=ttl, timeout=config.acquire_timeout if timeout is DEFAULT else timeout)
    registered = None
    lease = None
    try:
        # Everything after the acquire is inside the try: cancelled on any line here, the finally
        # gives the lease back rather than leave it held by nobody for a TTL.
        lease = AsyncLease(key, backend, calls, grant.owner, grant.fencing_token, ttl, grant.valid_until)
        registered = _HELD.set(MappingProxyType({**_HELD.get(), key: lease}))
        if config.auto_renew:
            lease.start_renewing()
        lease.record.depth = 1
        yield lease
    finally:
        if registered is not None:
            try:
                _HELD.reset(registered)
            except ValueError:
                # Closed from another context: an async generator dropped inside its block (an
                # ``async for`` left with ``break``) is closed by the loop in a task of its own.
                # The holder's entry names a lease released below, never re-entered; the release
                # must not be skipped (the holder's task lives on, and the renewal with it).
                pass
        if lease is None:
            await shielded(_give_back(calls, key, grant.owner))
        else:
            lease.record.depth = 0
            await shielded(_release_then_signal(lease))


async def _give_back(calls: AsyncLeases, key: str, owner: str) -> None:
    # Cut off between the acquire and the lease: never raise over the exception that cut it off.
    try:
        await calls.release(key, owner)
    except LockBackendUnavailable:
        logger.warning("could not give back the lease on %s: Redis unreachable; it expires in its TTL", key)


async def _release_then_signal(lease: AsyncLease) -> None:
    """Release, then deliver what the lease's commits queued for after it (``state_changed``)."""
    try:
        await lease.release()
    finally:
        callbacks = lease.take_callbacks()
        if callbacks:
            if state_changed.has_listeners():
                # Receivers are synchronous code (they may query): a worker thread, as the step.
                await sync_to_async(_run_callbacks)(callbacks, lease.key)
            else:
                _run_callbacks(callbacks, lease.key)  # nobody listens: nothing that could block


def _run_callbacks(callbacks: list[Callable[[], None]], key: str) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.exception("callback after releasing %s failed", key)
