"""Leases: the per-object lock a holder takes, re-enters, renews and releases.

Safety contract:
- A lease is re-entrant for its holder, the *thread* that took it: nested transitions,
  ``transition_through``, ``TransitionFailed`` and ``object_lock`` around several calls all run
  under the outermost acquisition (one fencing token). Another thread of the same process contends
  for it like another process would.
- While held, a lease is renewed every TTL/3 by one renewer thread per process (when
  ``AUTO_RENEW``). A renewal that finds the lease gone marks it *lost*; one that cannot reach Redis
  keeps trying until the lease's local deadline passes, then marks it lost. Either way
  ``Lease.check()`` raises ``LockLost`` from then on, and the protocol calls it before every commit.
- ``valid_until`` is measured from *before* the acquire/renew request was sent, so the local view
  of the lease ends no later than Redis's. It is a local clock: a process paused between
  ``check()`` and its COMMIT can still commit late, and that is what the fencing token (judged by
  the database, ``fence.py``) and the row lock are for.
- Release is owner-checked and never raises over the body's exception; a release that finds the
  lease already gone is logged (the work was fenced, so nothing unsafe was committed).
- Commit, then release: when the outermost block ends inside a caller's ``transaction.atomic()``
  that the lease's work wrote in, the lease is *parked* — still held, still renewed, re-entered by
  later calls in that transaction — and released by ``transaction.on_commit``. Releasing earlier
  would let the next holder take the lease and then wait on our row locks while we wait on the
  lease: a deadlock PostgreSQL cannot see. If that transaction rolls back, the renewer releases it.
- A forked child never re-enters nor releases its parent's lease.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.db import connections, router, transaction
from django.db.transaction import TransactionManagementError

from .backends import LockBackend, get_backend
from .conf import get_config
from .exceptions import LockBackendUnavailable, LockLost
from .keys import object_key
from .renewer import Renewer

if TYPE_CHECKING:
    from django.db.models import Model

__all__ = ["Lease", "object_lock", "hold", "held_lease", "after_release"]

logger = logging.getLogger("dsm_redis")
_DEFAULT: Any = object()


class Lease:
    """A held lease. ``fencing_token`` strictly increases per object across leases."""

    def __init__(
        self, key: str, backend: LockBackend, owner: str, fencing_token: int, ttl: float, valid_until: float
    ) -> None:
        self.key = key
        self.backend = backend
        self.owner = owner
        self.fencing_token = fencing_token
        self.ttl = ttl
        self.valid_until = valid_until
        self.lost: str | None = None
        # Accepted by the database once (fence.py): its token is anchored, never re-anchored again.
        self.judged = False
        self.depth = 0
        # ids of instances a transition under this lease is changing in an open transaction.
        self.in_transaction: set[int] = set()
        # run after release (state_changed receivers), so they never contend with their own lease.
        self.after_release: list[Callable[[], None]] = []
        # databases written under this lease; the connection whose commit will release it.
        self.databases: set[str] = set()
        self.parked_on: Any = None
        self._release_on_commit: Callable[[], None] | None = None
        self.released = False
        self.renewing = False  # in the renewer's care
        self.pid = os.getpid()

    @property
    def remaining(self) -> float:
        return self.valid_until - time.monotonic()

    def check(self) -> None:
        """Raise ``LockLost`` unless the lease is still ours by the local clock."""
        if self.lost is None and self.remaining <= 0:
            self.lost = f"lease on {self.key} expired (TTL {self.ttl}s) before the work committed"
        if self.lost is not None:
            raise LockLost(self.lost)

    def fence(self, using: str = "default") -> None:
        """Judge this lease's token in the current transaction of ``using``, before your own writes.

        Transitions do this themselves; call it when you write the object (or anything guarded by
        its lease) yourself inside ``object_lock``. Raises ``StaleFencingToken`` when a newer lease
        has committed — also when Redis brought this lease back after losing it (the token is
        never re-anchored here: see ``fence.py``) — ``LockLost`` when this lease has run out, and
        ``LockTimeout`` when the row lock is not obtained within ``ROW_LOCK_TIMEOUT``.
        """
        from .fence import fence

        if not connections[using].in_atomic_block:
            # In autocommit the mark would commit at once and hold nothing until your write.
            raise TransactionManagementError("Lease.fence() must be called inside transaction.atomic()")
        self.check()
        fence(self, using, get_config().effective_row_lock_timeout)
        self.databases.add(using)

    def parked_transaction_ended(self) -> bool:
        """Parked, and the transaction it waits for is over without having released it.

        Django has no rollback hook; but a rollback drops the transaction's on-commit callbacks
        (and a commit runs them), so ours missing from the connection's list means it is over.
        """
        connection = self.parked_on
        if connection is None:
            return False
        pending = self._release_on_commit
        return not any(entry[1] is pending for entry in list(connection.run_on_commit))

    def reanchor(self, floor: int) -> bool:
        """Redis lost our counter: mint a token above ``floor`` if Redis confirms we own the lease."""
        token = self.backend.reanchor(self.key, self.owner, floor)
        if token is None:
            return False
        logger.warning(
            "fencing counter for %s re-anchored: token %s was behind the database mark %s; now %s",
            self.key,
            self.fencing_token,
            floor,
            token,
        )
        self.fencing_token = token
        return True

    def __repr__(self) -> str:
        return f"<Lease {self.key} token={self.fencing_token} remaining={self.remaining:.1f}s>"


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
    _local = threading.local()


def held_lease(key: str) -> Lease | None:
    """The lease this thread holds on ``key``, if any."""
    lease = _held().get(key)
    return None if lease is None or lease.released else lease


@contextmanager
def hold(key: str, *, timeout: float | None = _DEFAULT, ttl: float | None = None) -> Iterator[Lease]:
    """Hold the lease on ``key`` for the block; re-enter it if this thread holds it already."""
    leases = _held()
    lease = leases.get(key)
    if lease is not None:
        reenter, lease = _take_over(leases, lease)
        if reenter:
            assert lease is not None
            lease.depth += 1
            try:
                yield lease
            finally:
                lease.depth -= 1
            return
    if lease is None:
        config = get_config()
        backend = get_backend()
        ttl = config.ttl if ttl is None else ttl
        grant = backend.acquire(key, ttl=ttl, timeout=config.acquire_timeout if timeout is _DEFAULT else timeout)
        lease = Lease(key, backend, grant.owner, grant.fencing_token, ttl, grant.valid_until)
        leases[key] = lease
        if config.auto_renew:
            _renewer.add(lease)
    try:
        yield lease
    finally:
        if lease.pid == os.getpid():  # a forked child unwinding its parent's block owns nothing
            _release_after_commit(lease)


def _take_over(leases: dict[str, Lease], lease: Lease) -> tuple[bool, Lease | None]:
    """This thread's lease on a key: (re-enter it?, the lease this block may own, or None)."""
    stale = False
    with _finish_lock:  # the renewer must not release it while we decide
        if lease.released:
            pass  # released by the renewer after its caller's transaction rolled back
        elif not lease.parked_transaction_ended():
            return True, lease  # held by an enclosing block, or parked for this very transaction
        elif lease.lost is None and lease.remaining > 0:
            lease.parked_on = None  # parked for a transaction that ended uncommitted: ours again
            return False, lease
        else:
            stale = lease.released = True  # parked, uncommitted, and no longer valid: drop it
    del leases[lease.key]
    if stale:
        _renewer.discard(lease)
        _release(lease)
    return False, None


def _release_after_commit(lease: Lease) -> None:
    for alias in sorted(lease.databases):
        connection = connections[alias]
        if connection.in_atomic_block:

            def release_on_commit() -> None:
                _finish(lease)

            with _finish_lock:
                # Callback first, then parked_on: the renewer must never see a parked lease
                # whose callback is not registered yet (it would take it for rolled back).
                lease._release_on_commit = release_on_commit
                transaction.on_commit(release_on_commit, using=alias)
                lease.parked_on = connection
            return
    _finish(lease)


_finish_lock = threading.Lock()


def after_release(key: str, callback: Callable[[], None]) -> None:
    """Run ``callback`` once this thread's lease on ``key`` is released (now, if none is held)."""
    lease = held_lease(key)
    with _finish_lock:
        if lease is not None and not lease.released:
            lease.after_release.append(callback)
            return
    callback()


def _finish(lease: Lease) -> None:
    """Release (once) and run the callbacks waiting for it, on the holder's thread."""
    with _finish_lock:
        first = not lease.released
        lease.released = True
        callbacks, lease.after_release = lease.after_release, []
    leases = _held()
    if leases.get(lease.key) is lease:
        del leases[lease.key]
    try:
        if first:
            _renewer.discard(lease)
            _release(lease)
    finally:
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("callback after releasing %s failed", lease.key)


def release_if_rolled_back(lease: Lease) -> bool:
    """For the renewer: release a parked lease whose caller's transaction ended uncommitted.

    Only the Redis side: callbacks stay for the holder's thread (a commit's own callback runs
    them), so ``state_changed`` receivers never run on the renewer's thread.
    """
    with _finish_lock:
        if lease.released or not lease.parked_transaction_ended():
            return lease.released
        lease.released = True
    _renewer.discard(lease)
    _release(lease)
    return True


def _release(lease: Lease) -> None:
    try:
        released = lease.backend.release(lease.key, lease.owner)
    except LockBackendUnavailable:
        # Never raise here: it would mask the body's exception or report failure for committed
        # work. The lease expires by its TTL.
        logger.warning("could not release lease on %s: Redis unreachable; it expires in its TTL", lease.key)
        return
    if not released and lease.lost is None:
        logger.warning("lease on %s had expired or been taken before release", lease.key)


@contextmanager
def object_lock(
    obj: Model, *, timeout: float | None = _DEFAULT, ttl: float | None = None, using: str | None = None
) -> Iterator[Lease]:
    """Hold ``obj``'s lease across several steps; transitions inside re-enter it and are fenced.

    Entering it (not re-entering it) passes the fencing barrier on ``using`` (the model's write
    database by default) before the block runs: what the block reads afterwards cannot be
    overwritten by the late commit of a holder whose lease ran out (``fence.barrier``).
    """
    with hold(object_key(obj), timeout=timeout, ttl=ttl) as lease:
        if lease.depth == 0:  # not re-entered from an enclosing block of this thread
            enter_barrier(lease, using or router.db_for_write(type(obj), instance=obj))
        yield lease


def enter_barrier(lease: Lease, using: str) -> None:
    """Judge a lease that spans several transactions before its holder reads (``fence.barrier``)."""
    from .fence import barrier

    lease.check()
    barrier(lease, using, get_config().effective_row_lock_timeout)
    if connections[using].in_atomic_block:
        lease.databases.add(using)  # the judged mark stays locked until the caller commits


def _reset_after_fork() -> None:
    global _finish_lock
    _forget_leases_after_fork()
    _finish_lock = threading.Lock()  # another thread may have held it at the moment of the fork


_renewer = Renewer(release_if_rolled_back)
os.register_at_fork(after_in_child=_reset_after_fork)
