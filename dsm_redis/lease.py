"""Holding leases: the thread's registry, ``hold``, ``object_lock``, and commit-then-release.

The lease itself — its state, its lock and every change of it, its renewal tick, its judgement by
the database — is ``lifecycle.Lease``. This module owns who holds which lease in this thread and
when a block's end releases it.

Safety contract:
- A lease is re-entrant for its holder, the *thread* that took it: nested transitions,
  ``transition_through``, ``TransitionFailed`` and ``object_lock`` around several calls all run
  under the outermost acquisition (one fencing token). Another thread of the same process contends
  for it like another process would. A thread re-enters only a lease that has a live block of its
  own or is parked for a transaction still open; the lease is registered inside the block's
  ``try``, so a block that fails while setting up (the renewer refusing it, an asynchronous
  exception on any line before the block runs) gives it back instead of leaving an entry every
  later block would re-enter, a raised ``depth``, or a key in Redis.
- Entering ``object_lock`` (not re-entering it) passes the fencing door (``fence.barrier``): the
  token is judged before the block reads, so an older holder's late commit cannot overwrite what
  the block read.
- While held, a lease is renewed (``lifecycle.py``: lost when it cannot be, and ``check()`` refuses
  every later commit).
- Commit, then release: when the outermost block ends inside caller transactions that the lease's
  work wrote in (``transaction.atomic()`` on one database or several), the lease is *parked* —
  still held, still renewed, re-entered by later calls in those transactions — until *every* one
  of them has ended: each commit runs our on-commit hook, and the last one releases. Releasing
  earlier would let the next holder take the lease and then wait on our row locks while we wait on
  the lease: a deadlock PostgreSQL cannot see. A rollback is noticed by the lease's renewal tick
  (Django has no rollback hook), which releases the lease once all of them are over.
- dsm_redis's on-commit hooks are robust and run before any hook of the caller's, whenever that
  was registered (``commit_hooks.py``): the lease is released right after the COMMIT even if a
  caller's hook raises, and ``state_changed`` is sent (see ``signals.py`` for the order it is
  delivered in).
- ``after_release`` callbacks are only ever queued by commits (``state_changed`` is queued by the
  commit's own hook; a rolled-back transition queues nothing) or by an explicit request, so they
  are never dropped: they run on the holder's thread when the lease is released or dropped by a
  take-over; when the renewal tick released it after a rollback, at that thread's next ``hold``.
- A forked child never re-enters nor releases its parent's lease.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.db import connections, router
from django.db.transaction import TransactionManagementError

from . import telemetry
from .backends import LockBackend, get_backend
from .commit_hooks import commit_hook, in_test_case, watches_this_level
from .conf import get_config
from .exceptions import LockBackendUnavailable
from .keys import object_key
from .lifecycle import Lease
from .renewer import renewer as _renewer
from .signals import deliver_pending

if TYPE_CHECKING:
    from django.db.models import Model

__all__ = ["Lease", "object_lock"]

logger = logging.getLogger("dsm_redis")
_DEFAULT: Any = object()

_local = threading.local()


def _held() -> dict[str, Lease]:
    leases = getattr(_local, "leases", None)
    if leases is None:
        leases = _local.leases = {}
    return leases


def _forget_leases_after_fork() -> None:
    # A child forked while a thread held a lease inherits that thread's dict but not the lease:
    # the parent still owns it. Re-entering it in the child would let two processes work at once.
    global _local
    for lease in getattr(_local, "leases", {}).values():
        lease.forked()  # the renewer may have been inside its lock at the fork
    _local = threading.local()


def held_lease(key: str) -> Lease | None:
    """The lease this thread holds on ``key``, if any."""
    lease = _held().get(key)
    return None if lease is None or lease.released else lease


@contextmanager
def hold(key: str, *, timeout: float | None = _DEFAULT, ttl: float | None = None) -> Iterator[Lease]:
    """Hold the lease on ``key`` for the block; re-enter it if this thread holds it already."""
    leases = _held()
    _deliver_orphans(leases)
    lease = leases.get(key)
    if lease is not None:
        reenter, lease = _take_over(leases, lease)
        if reenter:
            assert lease is not None
            record = lease.record
            depth = record.depth
            try:
                # Set inside the try and put back (not decremented) in the finally: an interrupt
                # landing on any line here cannot leave depth raised (the outermost block would
                # never release, and every later block would re-enter).
                record.depth = depth + 1
                yield lease
            finally:
                record.depth = depth
                if depth == 0 and lease.pid == os.getpid():
                    # We re-entered a lease parked for an open transaction: this block may have
                    # written on another database, whose transaction must keep it parked too.
                    _release_after_commit(lease)
            return
    config = get_config()
    backend = get_backend()
    grant = None
    try:
        # Everything after the acquire is inside the try: if the renewer refuses the lease (no
        # thread can be started) or an asynchronous exception lands anywhere here, the finally
        # gives it back; an entry left in the thread's dict would be re-entered (and never
        # released) by every later block, and a key left in Redis would block others for a TTL.
        if lease is None:
            ttl = config.ttl if ttl is None else ttl
            with telemetry.lease_wait(key):
                grant = backend.acquire(key, ttl=ttl, timeout=config.acquire_timeout if timeout is _DEFAULT else timeout)
            lease = Lease(key, backend, grant.owner, grant.fencing_token, ttl, grant.valid_until)
            leases[key] = lease
            if config.auto_renew:
                _renewer.add(lease)
        lease.record.depth = 1  # taken or taken over: no block of this thread holds it (see above)
        yield lease
    finally:
        if lease is None:
            if grant is not None:  # interrupted between the acquire and the Lease
                _release_owner(backend, key, grant.owner)
        else:
            lease.record.depth = 0
            if lease.pid == os.getpid():  # a forked child unwinding its parent's block owns nothing
                _release_after_commit(lease)


def _release_owner(backend: LockBackend, key: str, owner: str) -> None:
    try:
        backend.release(key, owner)
    except LockBackendUnavailable:
        logger.warning("could not give back the lease on %s: Redis unreachable; it expires in its TTL", key)


def _take_over(leases: dict[str, Lease], lease: Lease) -> tuple[bool, Lease | None]:
    """This thread's lease on a key: (re-enter it?, the lease this block may own, or None)."""
    found = lease.reclaim()  # decided under the lease's lock: its tick must not release it meanwhile
    if found == "reenter":
        return True, lease
    if found == "reuse":
        return False, lease
    del leases[lease.key]
    if found == "stale":
        # Lost while parked, or in the dict with no live block and not parked (a block whose
        # registration failed half-way): never re-entered, given back.
        lease.give_back()
    _run_after_release(lease)
    return False, None


def _deliver_orphans(leases: dict[str, Lease]) -> None:
    """Run the callbacks of leases released by their tick for this thread (a rollback), and those
    an interrupted delivery left (``_run_after_release``, ``signals.deliver_pending``).

    Only outside every transaction: receivers of committed transitions must not write into an
    unrelated transaction that may roll back (or run inside another object's side effect). Inside
    one, they wait for a later ``hold()`` made outside.
    """
    if any(connection.in_atomic_block for connection in connections.all(initialized_only=True)):
        return
    deliver_pending()
    left = getattr(_local, "left", None)
    while left:
        _run_callback(left.pop(0), "an earlier lease")
    for key, lease in list(leases.items()):
        if lease.released and lease.has_callbacks and leases.get(key) is lease:
            del leases[key]
            _run_after_release(lease)


def _release_after_commit(lease: Lease) -> None:
    """The outermost block is over: release now, or park until the transactions it wrote in end.

    Parked on *every* database written under the lease whose transaction is still open, and
    released when the last of them ends (a commit runs our hook; a rollback is noticed by the
    lease's tick): releasing at the first commit would let the next holder in while our other
    transaction still holds (or is about to write) what the lease guards.
    """
    for alias in sorted(lease.record.databases):
        connection = connections[alias]
        if not connection.in_atomic_block:
            continue
        current = lease.parked_on(alias)
        if (
            current is not None
            and current[0] is connection
            and any(watches_this_level(connection, h) for h in current[1])
            and not in_test_case(connection)  # captureOnCommitCallbacks sees only hooks of its block
        ):
            continue  # an earlier block of this transaction already waits for its commit
        lease.park(alias, connection, _release_hook(lease, alias))
    if not lease.waiting():
        _finish(lease)


def _release_hook(lease: Lease, alias: str) -> Callable[[], None]:
    @commit_hook("release")
    def release_on_commit() -> None:
        if not lease.unpark(alias, release_on_commit):  # this transaction is over: it no longer needs the lease
            _finish(lease)

    return release_on_commit


def after_release(key: str, callback: Callable[[], None]) -> None:
    """Run ``callback`` once this thread's lease on ``key`` is released (now, if none is held)."""
    lease = _held().get(key)
    if lease is None or not lease.queue_after_release(callback):
        callback()


def _finish(lease: Lease) -> None:
    """Release (once) and run the callbacks waiting for it, on the holder's thread."""
    leases = _held()
    if leases.get(lease.key) is lease:
        del leases[lease.key]
    try:
        lease.finish()
    finally:
        _run_after_release(lease)


def _run_after_release(lease: Lease) -> None:
    """Run, on the holder's thread, what waited for the release; never drop it silently.

    Every callback here was queued by something that committed (``state_changed`` is queued by the
    commit's own hook, so a rolled-back transition never queues one) or asked explicitly for the
    release; so whoever releases the lease, or drops it, runs them — never the renewer's thread.
    """
    try:
        while (callback := lease.next_callback()) is not None:
            _run_callback(callback, lease.key)
    except BaseException:
        # A receiver raised KeyboardInterrupt, a task's time limit...: the callbacks not run yet
        # (signals of committed transitions) go to this thread's next hold(), not to oblivion.
        rest = lease.take_callbacks()
        if rest:
            left = getattr(_local, "left", None)
            if left is None:
                left = _local.left = []
            left.extend(rest)
        raise


def _run_callback(callback: Callable[[], None], key: str) -> None:
    try:
        callback()
    except Exception:
        logger.exception("callback after releasing %s failed", key)


@contextmanager
def object_lock(
    obj: Model, *, timeout: float | None = _DEFAULT, ttl: float | None = None, using: str | None = None
) -> Iterator[Lease]:
    """Hold ``obj``'s lease across several steps; transitions inside re-enter it and are fenced.

    Entering it (not re-entering it) passes the fencing barrier on ``using`` (the model's write
    database by default) before the block runs: what the block reads afterwards cannot be
    overwritten by the late commit of a holder whose lease ran out (``fence.barrier``).
    """
    db = using or router.db_for_write(type(obj), instance=obj)
    require_managed_transactions(db)
    with hold(object_key(obj), timeout=timeout, ttl=ttl) as lease:
        if lease.depth == 1:  # this block alone: not re-entered from an enclosing block of this thread
            lease.enter_barrier(db)
        yield lease


def require_managed_transactions(using: str) -> None:
    """Refuse Django's manual transaction management (``set_autocommit(False)`` outside ``atomic``).

    There the transition's ``atomic()`` is a savepoint of a transaction no ``atomic`` block knows
    of: the lease would be released at the end of the block while the uncommitted write still holds
    the row (commit, then release, broken) and the row-lock bound would outlive the transition. As
    Django's own ``on_commit``, refuse it.
    """
    connection = connections[using]
    if not connection.get_autocommit() and not connection.in_atomic_block:
        raise TransactionManagementError(
            "dsm_redis cannot hold a lease in manual transaction management (set_autocommit(False)); "
            "use transaction.atomic()"
        )


@contextmanager
def lent(lease: Lease) -> Iterator[None]:
    """This thread works for ``lease``'s asyncio holder for the block (``aio.py``'s database step):
    a blocking call nested in it (a side effect's transition of another machine of the object)
    re-enters that lease instead of queueing behind it, and the commit's ``state_changed`` waits for
    its release, as under ``hold``."""
    leases = _held()
    previous = leases.get(lease.key)
    leases[lease.key] = lease
    try:
        yield
    finally:
        if previous is None:
            leases.pop(lease.key, None)
        else:
            leases[lease.key] = previous


def enter_barrier(lease: Lease, using: str) -> None:
    """Judge a lease that spans several transactions before its holder reads (``Lease.enter_barrier``)."""
    lease.enter_barrier(using)


os.register_at_fork(after_in_child=_forget_leases_after_fork)
