"""Renewal: one daemon thread per process extends every held lease at TTL/3.

Safety contract: a renewal that finds the lease gone or owned by another marks the lease *lost*;
one that cannot reach Redis retries until the lease's local deadline passes, then marks it lost.
A lost lease refuses every later commit (``Lease.check``), so losing it is never silent. The thread
renews leases one at a time: a Redis call stalled for longer than TTL/3 delays the others, which
then fail safe (lost), never unsafe. A lease parked until its callers' transactions end is released
here once they have all ended and the last did not commit (Django has no rollback hook).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lease import Lease

logger = logging.getLogger("dsm_redis")


# An idle renewer wakes at least this often, so that adding a lease due later never has to wake it:
# on the hot path of a short transition, add() and discard() cost no thread switch.
_IDLE_WAKE = 1.0


class Renewer:
    def __init__(self, release_if_rolled_back: Callable[[Lease], bool]) -> None:
        self._release_if_rolled_back = release_if_rolled_back
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # Also run in a forked child: the parent's thread does not exist there, and the parent's
        # condition may have been held at the moment of the fork.
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Lease]] = []
        self._sequence = itertools.count()
        self._wake_at = 0.0  # when the thread will next look at the heap on its own
        self._started = False

    def add(self, lease: Lease) -> None:
        due = time.monotonic() + lease.ttl / 3
        with self._cond:
            if lease.renewing:
                return
            lease.renewing = True
            if not self._started:
                threading.Thread(target=self._run, name="dsm_redis-renewer", daemon=True).start()
                self._started = True
            heapq.heappush(self._heap, (due, next(self._sequence), lease))
            if due < self._wake_at:
                self._cond.notify()

    def discard(self, lease: Lease) -> None:
        lease.renewing = False  # its heap entry is dropped when the thread comes across it

    def _run(self) -> None:
        while True:
            with self._cond:
                lease = self._next_due()
            try:
                # A parked lease whose caller's transaction rolled back: nothing else releases it.
                if lease.parked and self._release_if_rolled_back(lease):
                    continue
                self._renew(lease)
            except Exception:  # the thread must survive anything; the lease fails safe (lost)
                logger.exception("renewer: unexpected error on %s", lease.key)
                lease.lost = lease.lost or f"lease on {lease.key} could not be renewed (unexpected error)"

    def _next_due(self) -> Lease:
        heap = self._heap
        while True:
            while heap and not heap[0][2].renewing:
                heapq.heappop(heap)  # released since it was added
            if len(heap) > 64 and len(heap) > 4 * sum(1 for entry in heap if entry[2].renewing):
                heap[:] = [entry for entry in heap if entry[2].renewing]  # behind a long holder
                heapq.heapify(heap)
            now = time.monotonic()
            if heap and heap[0][0] <= now:
                self._wake_at = now  # busy: adds need not wake us, we look again when done
                return heapq.heappop(heap)[2]
            self._wake_at = min(heap[0][0] if heap else now + _IDLE_WAKE, now + _IDLE_WAKE)
            self._cond.wait(self._wake_at - now)

    def _renew(self, lease: Lease) -> None:
        if lease.lost is not None:  # nothing left to renew; a parked one is still watched
            if lease.parked:
                self._schedule(lease, lease.ttl / 3)
            return
        sent = time.monotonic()
        try:
            ok = lease.backend.renew(lease.key, lease.owner, lease.ttl)
        except Exception as exc:  # noqa: BLE001 - whatever fails, this thread must not die silently
            # Redis down (or refusing): retry until the local deadline passes, then mark it lost.
            if lease.remaining <= 0:
                lease.lost = f"lease on {lease.key} could not be renewed ({type(exc).__name__}) and expired"
                logger.error("%s", lease.lost)
                if lease.parked:
                    self._schedule(lease, lease.ttl / 3)  # keep watching for its transaction's end
                return
            logger.warning("renewing lease on %s failed (%s); retrying", lease.key, type(exc).__name__)
            self._schedule(lease, min(1.0, lease.ttl / 10))
            return
        if not ok:
            lease.lost = f"lease on {lease.key} was lost: it expired or another holder took it"
            logger.error("%s", lease.lost)
            if lease.parked:
                self._schedule(lease, lease.ttl / 3)  # keep watching for its transaction's end
            return
        lease.valid_until = sent + lease.ttl
        logger.debug("lease on %s renewed", lease.key)
        self._schedule(lease, lease.ttl / 3)

    def _schedule(self, lease: Lease, delay: float) -> None:
        # Called on the renewer's own thread, which recomputes its wake-up before it sleeps again.
        with self._cond:
            if lease.renewing:
                heapq.heappush(self._heap, (time.monotonic() + delay, next(self._sequence), lease))
