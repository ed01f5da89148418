"""Leases: the per-object lock a holder takes, re-enters, renews and releases.

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
- Commit, then release: when the outermost block ends inside caller transactions that the lease's
  work wrote in (``transaction.atomic()`` on one database or several), the lease is *parked* —
  still held, still renewed, re-entered by later calls in those transactions — until *every* one
  of them has ended: each commit runs our on-commit hook, and the last one releases. Releasing
  earlier would let the next holder take the lease and then wait on our row locks while we wait on
  the lease: a deadlock PostgreSQL cannot see. A rollback is noticed by the renewer (Django has no
  rollback hook), which releases the lease once all of them are over.
- dsm_redis's on-commit hooks are robust and run before any hook of the caller's, whenever that
  was registered: the lease is released right after the COMMIT even if a caller's hook raises,
  and ``state_changed`` is sent (see ``signals.py`` for the order it is delivered in). Inside
  Django's ``TestCase`` (which never commits) they keep their registration order instead, so that
  ``captureOnCommitCallbacks`` — which takes hooks by position — runs them.
- ``after_release`` callbacks are only ever queued by commits (``state_changed`` is queued by the
  commit's own hook; a rolled-back transition queues nothing) or by an explicit request, so they
  are never dropped: they run on the holder's thread when the lease is released or dropped by a
  take-over; when the renewer released it after a rollback, at that thread's next ``hold``.
- A forked child never re-enters nor releases its parent's lease.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import connections, router, transaction
from django.db.transaction import TransactionManagementError

from .backends import LockBackend, get_backend
from .conf import get_config
from .exceptions import LockBackendUnavailable, LockLost
from .keys import object_key
from .renewer import Renewer
from .signals import deliver_pending

if TYPE_CHECKING:
    from django.db.models import Model

__all__ = ["Lease", "object_lock", "hold", "held_lease", "after_release"]

logger = logging.getLogger("dsm_redis")
_DEFAULT: Any = object()
F = TypeVar("F", bound=Callable[..., Any])


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
        self.depth = 0  # live ``hold`` blocks of the holder thread, the outermost included
        # ids of instances a transition under this lease is changing in an open transaction.
        self.in_transaction: set[int] = set()
        # run after release (state_changed receivers), so they never contend with their own lease.
        self.after_release: list[Callable[[], None]] = []
        # databases written under this lease; per database, the holder's connection whose open
        # transaction wrote under it and the on-commit hook that will release it (parked).
        self.databases: set[str] = set()
        # Every hook registered for a database's transaction is kept: a savepoint rollback can drop
        # a later one while an earlier one (and the work it waits for) stays pending.
        self.parked: dict[str, tuple[Any, list[Callable[[], None]]]] = {}
        self.released = False
        self.finished = False  # released by the holder's thread (not only by the renewer)
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
        """Parked, and every transaction it waits for is over without having released it.

        Django has no rollback hook; but a rollback drops the transaction's on-commit callbacks
        (and a commit runs them, and ours then stops waiting for it), so ours missing from the
        connection's list means that transaction is over.
        """
        parked = list(self.parked.values())
        return bool(parked) and not any(_pending(connection, hook) for connection, hooks in parked for hook in hooks)

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


def _pending(connection: Any, hook: Callable[[], None]) -> bool:
    return any(entry[1] is hook for entry in list(connection.run_on_commit))


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
            depth = lease.depth
            try:
                # Set inside the try and put back (not decremented) in the finally: an interrupt
                # landing on any line here cannot leave depth raised (the outermost block would
                # never release, and every later block would re-enter).
                lease.depth = depth + 1
                yield lease
            finally:
                lease.depth = depth
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
            grant = backend.acquire(key, ttl=ttl, timeout=config.acquire_timeout if timeout is _DEFAULT else timeout)
            lease = Lease(key, backend, grant.owner, grant.fencing_token, ttl, grant.valid_until)
            leases[key] = lease
            if config.auto_renew:
                _renewer.add(lease)
        lease.depth = 1  # taken or taken over: no block of this thread holds it (see above)
        yield lease
    finally:
        if lease is None:
            if grant is not None:  # interrupted between the acquire and the Lease
                _release_owner(backend, key, grant.owner)
        else:
            lease.depth = 0
            if lease.pid == os.getpid():  # a forked child unwinding its parent's block owns nothing
                _release_after_commit(lease)


def _release_owner(backend: LockBackend, key: str, owner: str) -> None:
    try:
        backend.release(key, owner)
    except LockBackendUnavailable:
        logger.warning("could not give back the lease on %s: Redis unreachable; it expires in its TTL", key)


def _take_over(leases: dict[str, Lease], lease: Lease) -> tuple[bool, Lease | None]:
    """This thread's lease on a key: (re-enter it?, the lease this block may own, or None)."""
    stale = False
    with _finish_lock:  # the renewer must not release it while we decide
        if lease.released:
            pass  # released by the renewer after its caller's transaction rolled back
        elif lease.depth > 0:
            return True, lease  # held by an enclosing block of this thread
        elif lease.parked and not lease.parked_transaction_ended():
            return True, lease  # parked for a transaction still open: this very one, or one around it
        elif lease.parked and lease.lost is None and lease.remaining > 0:
            lease.parked.clear()  # parked for transactions that ended uncommitted: ours again
            return False, lease
        else:
            # Lost while parked, or in the dict with no live block and not parked (a block whose
            # registration failed half-way): never re-entered, given back.
            stale = lease.released = True
    del leases[lease.key]
    if stale:
        _renewer.discard(lease)
        _release(lease)
    _run_after_release(lease)
    return False, None


def _deliver_orphans(leases: dict[str, Lease]) -> None:
    """Run the callbacks of leases the renewer released for this thread (see ``release_if_rolled_back``),
    and those an interrupted delivery left (``_run_after_release``, ``signals.deliver_pending``).

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
        if lease.released and lease.after_release and leases.get(key) is lease:
            del leases[key]
            _run_after_release(lease)


# -- the order of on-commit hooks ------------------------------------------------------------------
#
# Django runs a transaction's on-commit hooks in registration order and stops at the first
# non-robust one that raises. Ours (release the lease, send state_changed) used to be appended after
# the hooks the caller had registered earlier: a failing caller hook then kept the lease in Redis
# after the COMMIT and dropped the signal, and a caller hook that transitioned the object again
# committed (and signalled) before our earlier transition had signalled. So every dsm_redis hook is
# robust and runs before any hook that is not ours, whenever that one was registered.

_HOOK_ATTR = "dsm_redis_hook"


def commit_hook(kind: str) -> Callable[[F], F]:
    """Mark a callable as one of dsm_redis's on-commit hooks: ``"signal"``, ``"release"``..."""

    def mark(func: F) -> F:
        setattr(func, _HOOK_ATTR, kind)
        return func

    return mark


def _hook_kind(func: Any) -> str | None:
    kind = getattr(func, _HOOK_ATTR, None)
    if kind is None and isinstance(func, partial):
        kind = getattr(func.func, _HOOK_ATTR, None)
    return kind


# dsm_redis's hooks at the front of the list, by rank: every transition's signal hook before every
# release hook of the same commit (ranks equal keep registration order). A signal hook queues its
# delivery on the lease, which the release then runs: with all of one commit's signals queued
# before any release, a receiver that transitions another object of that commit finds that
# object's earlier signal already queued, and its own new one lands after it (signals.deliver).
_RANK = {"signal": 0, "release": 1}


def on_commit_first(func: Callable[[], None], using: str) -> None:
    """``transaction.on_commit(func, robust=True)`` for a hook marked with ``commit_hook``, moved
    ahead of every hook that is not dsm_redis's, whenever that one was registered.

    Closes the race above. Registered through ``transaction.on_commit`` so that Django's savepoint
    bookkeeping applies (a rolled-back savepoint drops it), then the entry it appended is moved
    into the front group of dsm_redis hooks, after those of its rank or lower.
    """
    connection = connections[using]
    transaction.on_commit(func, using=using, robust=True)
    if not connection.in_atomic_block:
        return  # autocommit: it has already run
    if _in_test_case(connection):
        # Django's TestCase never commits: hooks run only through captureOnCommitCallbacks, which
        # takes them by position (those appended after its start). Moving ours would hand it
        # someone else's hook instead; in registration order the capture runs ours, in order.
        return
    hooks = connection.run_on_commit
    entry = hooks.pop()
    rank = _RANK[_hook_kind(func) or "release"]
    index = 0
    while index < len(hooks) and (kind := _hook_kind(hooks[index][1])) is not None and _RANK[kind] <= rank:
        index += 1
    hooks.insert(index, entry)


def _in_test_case(connection: Any) -> bool:
    """Inside Django's ``TestCase`` transaction (which never commits)."""
    return any(getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def _release_after_commit(lease: Lease) -> None:
    """The outermost block is over: release now, or park until the transactions it wrote in end.

    Parked on *every* database written under the lease whose transaction is still open, and
    released when the last of them ends (a commit runs our hook; a rollback is noticed by the
    renewer): releasing at the first commit would let the next holder in while our other
    transaction still holds (or is about to write) what the lease guards.
    """
    for alias in sorted(lease.databases):
        connection = connections[alias]
        if not connection.in_atomic_block:
            continue
        current = lease.parked.get(alias)
        if (
            current is not None
            and current[0] is connection
            and any(_watches_this_level(connection, h) for h in current[1])
            and not _in_test_case(connection)  # captureOnCommitCallbacks sees only hooks of its block
        ):
            continue  # an earlier block of this transaction already waits for its commit
        release_on_commit = _release_hook(lease, alias)
        with _finish_lock:
            # Hook first, then the parked entry: the renewer must never see a parked lease whose
            # hook is not registered yet (it would take it for rolled back).
            on_commit_first(release_on_commit, alias)
            if current is not None and current[0] is connection:
                current[1].append(release_on_commit)
            else:
                lease.parked[alias] = (connection, [release_on_commit])
    with _finish_lock:
        waiting = lease.parked and not lease.parked_transaction_ended()
    if not waiting:
        _finish(lease)


def _watches_this_level(connection: Any, hook: Callable[[], None]) -> bool:
    # Pending, and registered at this savepoint level or outside it: nothing that could drop it
    # (a savepoint rollback) leaves the work we would park for now in place.
    current = set(connection.savepoint_ids)
    return any(entry[1] is hook and entry[0] <= current for entry in list(connection.run_on_commit))


def _release_hook(lease: Lease, alias: str) -> Callable[[], None]:
    @commit_hook("release")
    def release_on_commit() -> None:
        with _finish_lock:
            if alias in lease.parked and release_on_commit in lease.parked[alias][1]:
                del lease.parked[alias]  # this transaction is over: it no longer needs the lease
            waiting = bool(lease.parked) and not lease.parked_transaction_ended()
        if not waiting:
            _finish(lease)

    return release_on_commit


_finish_lock = threading.Lock()


def after_release(key: str, callback: Callable[[], None]) -> None:
    """Run ``callback`` once this thread's lease on ``key`` is released (now, if none is held)."""
    lease = _held().get(key)
    with _finish_lock:
        # Queued also when the renewer released it (it may have taken a commit whose hooks are
        # still running for a rollback): the commit's release hook, or this thread's next hold(),
        # runs it, after the signals queued before it — never ahead of them.
        if lease is not None and not (lease.released and lease.finished):
            lease.after_release.append(callback)
            return
    callback()


def _finish(lease: Lease) -> None:
    """Release (once) and run the callbacks waiting for it, on the holder's thread."""
    with _finish_lock:
        first = not lease.released
        lease.released = lease.finished = True
        lease.parked.clear()
    leases = _held()
    if leases.get(lease.key) is lease:
        del leases[lease.key]
    try:
        if first:
            _renewer.discard(lease)
            _release(lease)
    finally:
        _run_after_release(lease)


def _run_after_release(lease: Lease) -> None:
    """Run, on the holder's thread, what waited for the release; never drop it silently.

    Every callback here was queued by something that committed (``state_changed`` is queued by the
    commit's own hook, so a rolled-back transition never queues one) or asked explicitly for the
    release; so whoever releases the lease, or drops it, runs them — never the renewer's thread.
    """
    try:
        while True:
            with _finish_lock:
                if not lease.after_release:
                    return
                callback = lease.after_release.pop(0)
            _run_callback(callback, lease.key)
    except BaseException:
        # A receiver raised KeyboardInterrupt, a task's time limit...: the callbacks not run yet
        # (signals of committed transitions) go to this thread's next hold(), not to oblivion.
        with _finish_lock:
            rest, lease.after_release = lease.after_release, []
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


def release_if_rolled_back(lease: Lease) -> bool:
    """For the renewer: release a parked lease whose callers' transactions all ended uncommitted.

    Only the Redis side: its callbacks (signals of transitions that committed on another database
    meanwhile, explicit ``after_release`` requests) stay for the holder's thread, which runs them
    at its next lease (``hold``) or when its own hook runs after all (a commit whose hooks had not
    run yet), so ``state_changed`` receivers never run on the renewer's thread.
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
    db = using or router.db_for_write(type(obj), instance=obj)
    require_managed_transactions(db)
    with hold(object_key(obj), timeout=timeout, ttl=ttl) as lease:
        if lease.depth == 1:  # this block alone: not re-entered from an enclosing block of this thread
            enter_barrier(lease, db)
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
