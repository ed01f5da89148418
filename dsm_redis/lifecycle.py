"""One held lease's state and every change of it: ``Lease`` and its per-hold bookkeeping.

The lease owns its state: each change (judged, renewed, lost, parked, unparked, released,
finished) is one method, made under the lease's own lock where another thread (the renewer, a
commit hook) may change the same state. Other modules read it, and the holder's thread keeps its
bookkeeping in ``lease.record`` (``Record``); nothing else writes a lease's fields.

Safety contract:
- While held, a lease is ticked every TTL/3 by the process's renewer (``renewer.py``, when
  ``AUTO_RENEW``). A tick that finds the lease gone marks it *lost*; one that cannot reach Redis
  keeps trying until the lease's local deadline passes, then marks it lost. Either way
  ``Lease.check()`` raises ``LockLost`` from then on, and the protocol calls it before every commit.
- ``valid_until`` is measured from *before* the acquire/renew request was sent, so the local view
  of the lease ends no later than Redis's. It is a local clock: a process paused between
  ``check()`` and its COMMIT can still commit late, and that is what the fencing token (judged by
  the database, ``fence.py``) and the row lock are for.
- The token is judged by the database through ``fence.py``, which knows only the ``Token`` value.
  Only the lease's *first* judgement may re-anchor a counter Redis lost (it passes ``_reanchor``
  then); once accepted, the token is anchored (see ``fence.py``).
- A lease parked until the transactions it wrote in end is released by its tick once every one of
  them has ended uncommitted (Django has no rollback hook): only the Redis side; its callbacks stay
  for the holder's thread (``lease.py``), so ``state_changed`` receivers never run on the renewer's.
- Release is owner-checked and never raises over the body's exception; a release that finds the
  lease already gone is logged (the work was fenced, so nothing unsafe was committed).

Longer than most modules here, and kept whole: it is one class whose every change of state is
made under one lock, and the invariants of that lock read best in one place.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from django.db import connections
from django.db.transaction import TransactionManagementError

from . import fence as fencing
from . import telemetry
from .backends import LockBackend
from .commit_hooks import on_commit_first, pending
from .conf import get_config
from .exceptions import LockBackendUnavailable, LockLost
from .renewer import renewer
from .token import Token

if TYPE_CHECKING:
    from django.db.models import Model

__all__ = ["Lease"]

logger = logging.getLogger("dsm_redis")

Hook = Callable[[], None]


class Record:
    """The holder thread's bookkeeping of one lease, from its outermost block to its release."""

    __slots__ = ("depth", "databases", "in_transaction", "parked", "after_release")

    def __init__(self) -> None:
        self.depth = 0  # live ``hold`` blocks of the holder thread, the outermost included
        # databases written under this lease: each one's open transaction keeps it parked.
        self.databases: set[str] = set()
        # ids of instances a transition under this lease is changing in an open transaction.
        self.in_transaction: set[int] = set()
        # per database, the holder's connection whose open transaction wrote under the lease and the
        # on-commit hooks that will release it. Every hook registered for a database's transaction
        # is kept: a savepoint rollback can drop a later one while an earlier one (and the work it
        # waits for) stays pending. Changed under the lease's lock (the renewer reads it).
        self.parked: dict[str, tuple[Any, list[Hook]]] = {}
        # run after release (state_changed receivers), so they never contend with their own lease.
        # Changed under the lease's lock.
        self.after_release: list[Hook] = []

    def wrote(self, using: str) -> None:
        """Work under the lease in ``using``'s transaction: if that is a caller's, its commit releases it."""
        self.databases.add(using)

    def changing(self, instance: Any) -> bool:
        """A transition under this lease is changing ``instance`` in an open transaction."""
        return id(instance) in self.in_transaction

    def start_changing(self, instance: Any) -> None:
        self.in_transaction.add(id(instance))

    def done_changing(self, instance: Any) -> None:
        self.in_transaction.discard(id(instance))


class Lease:
    """A held lease. ``fencing_token`` strictly increases per object across leases."""

    def __init__(
        self, key: str, backend: LockBackend, owner: str, fencing_token: int, ttl: float, valid_until: float
    ) -> None:
        self.key = key
        self.backend = backend
        self.owner = owner
        self.ttl = ttl
        self.pid = os.getpid()
        self.record = Record()
        self._lock = threading.Lock()
        self._token = Token(key, fencing_token, owner)
        self._valid_until = valid_until
        self._lost: str | None = None
        self._judged = False  # accepted by the database once: its token is anchored, never re-anchored again
        self._released = False
        self._finished = False  # released by the holder's thread (not only by its tick)

    # -- what others read ---------------------------------------------------------------------------

    @property
    def token(self) -> Token:
        return self._token

    @property
    def fencing_token(self) -> int:
        return self._token.number

    @property
    def remaining(self) -> float:
        return self._valid_until - time.monotonic()

    @property
    def valid_until(self) -> float:
        return self._valid_until

    @property
    def lost(self) -> str | None:
        """Why the lease is lost, or ``None`` while it is ours."""
        return self._lost

    @property
    def judged(self) -> bool:
        return self._judged

    @property
    def released(self) -> bool:
        return self._released

    @property
    def depth(self) -> int:
        return self.record.depth

    @property
    def renew_interval(self) -> float:
        return self.ttl / 3

    def check(self) -> None:
        """Raise ``LockLost`` unless the lease is still ours by the local clock."""
        if self._lost is None and self.remaining <= 0:
            self._lose(f"lease on {self.key} expired (TTL {self.ttl}s) before the work committed", "expired")
        if self._lost is not None:
            raise LockLost(self._lost)

    # -- judged by the database (fence.py) ------------------------------------------------------------

    def fence(self, using: str = "default") -> None:
        """Judge this lease's token in the current transaction of ``using``, before your own writes.

        Transitions do this themselves; call it when you write the object (or anything guarded by
        its lease) yourself inside ``object_lock``. Raises ``StaleFencingToken`` when a newer lease
        has committed — also when Redis brought this lease back after losing it (the token is
        never re-anchored here: see ``fence.py``) — ``LockLost`` when this lease has run out, and
        ``LockTimeout`` when the row lock is not obtained within ``ROW_LOCK_TIMEOUT``.
        """
        if not connections[using].in_atomic_block:
            # In autocommit the mark would commit at once and hold nothing until your write.
            raise TransactionManagementError("Lease.fence() must be called inside transaction.atomic()")
        self.check()
        self._accepted(fencing.fence(self._token, using, get_config().effective_row_lock_timeout))
        self.record.databases.add(using)

    def enter_barrier(self, using: str) -> None:
        """Judge a lease that spans several transactions before its holder reads (``fence.barrier``)."""
        self.check()
        timeout = get_config().effective_row_lock_timeout
        self._accepted(fencing.barrier(self._token, using, timeout, self._first_judgement()))
        if connections[using].in_atomic_block:
            self.record.databases.add(using)  # the judged mark stays locked until the caller commits

    def lock_row(self, instance: Model, using: str, *, in_caller_transaction: bool) -> Model:
        """A transition's ``SELECT ... FOR UPDATE`` of ``instance``'s row, judging the token
        (``fence.lock_row``); the row as it is now."""
        row, token = fencing.lock_row(
            instance,
            using,
            self._token,
            get_config().effective_row_lock_timeout,
            in_caller_transaction=in_caller_transaction,
            reanchor=self._first_judgement(),
        )
        self._accepted(token)
        return row

    def _first_judgement(self) -> Callable[[int], Token | None] | None:
        # Re-anchoring is sound only where nothing has been read under the lease yet (fence.py).
        return None if self._judged else self._reanchor

    def _accepted(self, token: Token | None) -> None:
        if token is not None:  # None: nothing was judged (no row to protect)
            with self._lock:
                self._judged = True

    def _reanchor(self, floor: int) -> Token | None:
        """Redis lost our counter: mint a token above ``floor`` if Redis confirms we own the lease."""
        number = self.backend.reanchor(self.key, self.owner, floor)
        if number is None:
            return None
        logger.warning(
            "fencing counter for %s re-anchored: token %s was behind the database mark %s; now %s",
            self.key,
            self._token.number,
            floor,
            number,
        )
        with self._lock:
            self._token = self._token.renumbered(number)
        telemetry.token_reanchored(self.key)
        return self._token

    # -- renewal: the renewer's one call --------------------------------------------------------------

    def tick(self) -> float | None:
        """Renew the lease (or release it, parked for transactions that all rolled back); the delay
        until the next tick, or ``None`` when no more ticks are needed."""
        try:
            return self._tick()
        except Exception:  # fail safe: an unexpected error leaves the lease lost, never silently ours
            logger.exception("renewer: unexpected error on %s", self.key)
            self._lose(f"lease on {self.key} could not be renewed (unexpected error)", "error")
            return None

    def _tick(self) -> float | None:
        if self._released:
            # Marked released: its give-back may have been cut short (an interrupt in finish());
            # renewing it would keep the object taken for as long as anything holds this object.
            return None
        # A parked lease whose caller's transaction rolled back: nothing else releases it.
        if self.record.parked and self._release_if_rolled_back():
            return None
        watch = self.renew_interval if self.record.parked else None  # keep watching for its transaction's end
        if self._lost is not None:  # nothing left to renew; a parked one is still watched
            return watch
        sent = time.monotonic()
        try:
            ok = self.backend.renew(self.key, self.owner, self.ttl)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the renewer must not die silently
            # Redis down (or refusing): retry until the local deadline passes, then mark it lost.
            if self.remaining <= 0:
                self._lose(f"lease on {self.key} could not be renewed ({type(exc).__name__}) and expired", "unreachable")
                logger.error("%s", self._lost)
                return self.renew_interval if self.record.parked else None
            logger.warning("renewing lease on %s failed (%s); retrying", self.key, type(exc).__name__)
            return min(1.0, self.ttl / 10)
        if not ok:
            self._lose(f"lease on {self.key} was lost: it expired or another holder took it", "gone")
            logger.error("%s", self._lost)
            return self.renew_interval if self.record.parked else None
        with self._lock:
            self._valid_until = sent + self.ttl
        logger.debug("lease on %s renewed", self.key)
        return self.renew_interval

    def _lose(self, reason: str, cause: str) -> None:
        """Mark the lease lost (once): ``cause`` is expired, gone, unreachable or error (telemetry.py)."""
        with self._lock:
            first = self._lost is None
            if first:
                self._lost = reason
        if first:
            telemetry.lease_lost(self.key, cause)

    # -- parked until the transactions it wrote in end ------------------------------------------------

    def parked_on(self, alias: str) -> tuple[Any, list[Hook]] | None:
        return self.record.parked.get(alias)

    def park(self, alias: str, connection: Any, hook: Hook) -> None:
        """Keep the lease until ``hook`` runs at the commit of ``connection``'s open transaction."""
        with self._lock:
            # Hook first, then the parked entry: the renewer must never see a parked lease whose
            # hook is not registered yet (it would take it for rolled back).
            on_commit_first(hook, alias)
            current = self.record.parked.get(alias)
            if current is not None and current[0] is connection:
                current[1].append(hook)
            else:
                self.record.parked[alias] = (connection, [hook])

    def unpark(self, alias: str, hook: Hook) -> bool:
        """``hook``'s transaction committed: it no longer needs the lease. Still parked for another?"""
        with self._lock:
            current = self.record.parked.get(alias)
            if current is not None and hook in current[1]:
                del self.record.parked[alias]
            return self._waiting()

    def waiting(self) -> bool:
        """Parked for a transaction still open."""
        with self._lock:
            return self._waiting()

    def _waiting(self) -> bool:
        return bool(self.record.parked) and not self._parked_transactions_ended()

    def _parked_transactions_ended(self) -> bool:
        """Parked, and every transaction it waits for is over without having released it.

        Django has no rollback hook; but a rollback drops the transaction's on-commit callbacks
        (and a commit runs them, and ours then stops waiting for it), so ours missing from the
        connection's list means that transaction is over.
        """
        parked = list(self.record.parked.values())
        return bool(parked) and not any(pending(connection, hook) for connection, hooks in parked for hook in hooks)

    def reclaim(self) -> Literal["reenter", "reuse", "released", "stale"]:
        """The holder thread meets this lease again in its registry: what is it to that thread?

        ``"reenter"`` (a block of the thread holds it, or it is parked for a transaction still open),
        ``"reuse"`` (parked for transactions that ended uncommitted, and still ours), ``"released"``
        (by its tick, after its caller's transaction rolled back) or ``"stale"`` (lost while parked,
        or registered with no live block: never re-entered, now marked released; give it back).
        """
        with self._lock:  # its tick must not release it while we decide
            if self._released:
                return "released"  # released by its tick after its caller's transaction rolled back
            if self.record.depth > 0:
                return "reenter"  # held by an enclosing block of this thread
            if self.record.parked and not self._parked_transactions_ended():
                return "reenter"  # parked for a transaction still open: this very one, or one around it
            if self.record.parked and self._lost is None and self.remaining > 0:
                self.record.parked.clear()  # parked for transactions that ended uncommitted: ours again
                return "reuse"
            self._released = True
            return "stale"

    # -- released ------------------------------------------------------------------------------------

    def _release_if_rolled_back(self) -> bool:
        """Release a parked lease whose callers' transactions all ended uncommitted (its tick).

        Only the Redis side: its callbacks (signals of transitions that committed on another
        database meanwhile, explicit ``after_release`` requests) stay for the holder's thread,
        which runs them at its next lease (``hold``) or when its own hook runs after all (a commit
        whose hooks had not run yet), so ``state_changed`` receivers never run on the renewer's thread.
        """
        with self._lock:
            if self._released or not self._parked_transactions_ended():
                return self._released
            self._released = True
        self.give_back()
        return True

    def finish(self) -> None:
        """Released by the holder's thread: give it back to Redis, once (its tick may have already)."""
        with self._lock:
            first = not self._released
            self._released = self._finished = True
            self.record.parked.clear()
        if first:
            self.give_back()

    def give_back(self) -> None:
        """The Redis side of a release: stop renewing, and release the lock, owner-checked."""
        renewer.discard(self)
        try:
            released = self.backend.release(self.key, self.owner)
        except LockBackendUnavailable:
            # Never raise here: it would mask the body's exception or report failure for committed
            # work. The lease expires by its TTL.
            logger.warning("could not release lease on %s: Redis unreachable; it expires in its TTL", self.key)
            return
        if not released and self._lost is None:
            logger.warning("lease on %s had expired or been taken before release", self.key)

    # -- what waits for the release -------------------------------------------------------------------

    def queue_after_release(self, callback: Hook) -> bool:
        """Queue ``callback`` for the release; ``False`` if the holder's thread released it already."""
        with self._lock:
            # Queued also when its tick released it (it may have taken a commit whose hooks are
            # still running for a rollback): the commit's release hook, or this thread's next hold(),
            # runs it, after the signals queued before it — never ahead of them.
            if self._released and self._finished:
                return False
            self.record.after_release.append(callback)
            return True

    @property
    def has_callbacks(self) -> bool:
        return bool(self.record.after_release)

    def next_callback(self) -> Hook | None:
        with self._lock:
            return self.record.after_release.pop(0) if self.record.after_release else None

    def take_callbacks(self) -> list[Hook]:
        with self._lock:
            rest, self.record.after_release = self.record.after_release, []
        return rest

    def forked(self) -> None:
        """This process is a child forked while the lease was held (``lease.py``): its own lock.

        Another thread of the parent (the renewer in a tick, a commit hook) may have been inside the
        lease's lock at the fork; that thread does not exist in the child, and its copy of the lock
        would stay held forever: ``check()`` on the inherited lease would wait instead of raising.
        """
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Lease {self.key} token={self.fencing_token} remaining={self.remaining:.1f}s>"
