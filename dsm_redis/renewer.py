"""Renewal: one daemon thread per process extends every held lease at TTL/3.

Safety contract: a renewal that finds the lease gone or owned by another marks the lease *lost*;
one that cannot reach Redis retries until the lease's local deadline passes, then marks it lost.
A lost lease refuses every later commit (``Lease.check``), so losing it is never silent. The thread
renews leases one at a time: a Redis call stalled for longer than TTL/3 delays the others, which
then fail safe (lost), never unsafe. A lease parked until its caller's transaction ends is released
here if that transaction ended without committing (Django has no rollback hook).
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lease import Lease

logger = logging.getLogger("dsm_redis")


class Renewer:
    def __init__(self, finish: Callable[[Lease], None]) -> None:
        self._finish = finish
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # Also run in a forked child: the parent's thread does not exist there, and the parent's
        # condition may have been held at the moment of the fork.
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Lease]] = []
        self._active: set[int] = set()
        self._started = False

    def add(self, lease: Lease) -> None:
        with self._cond:
            if id(lease) in self._active:
                return
            if not self._started:
                threading.Thread(target=self._run, name="dsm_redis-renewer", daemon=True).start()
                self._started = True
            self._active.add(id(lease))
            heapq.heappush(self._heap, (time.monotonic() + lease.ttl / 3, id(lease), lease))
            self._cond.notify()

    def discard(self, lease: Lease) -> None:
        with self._cond:
            self._active.discard(id(lease))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, ident, lease = heapq.heappop(self._heap)
                if ident not in self._active:
                    continue
            if lease.parked_transaction_ended():
                self._finish(lease)  # the caller's transaction rolled back: nothing will release it
                continue
            self._renew(lease)

    def _renew(self, lease: Lease) -> None:
        sent = time.monotonic()
        try:
            ok = lease.backend.renew(lease.key, lease.owner, lease.ttl)
        except Exception as exc:  # noqa: BLE001 - whatever fails, this thread must not die silently
            # Redis down (or refusing): retry until the local deadline passes, then mark it lost.
            if lease.remaining <= 0:
                lease.lost = f"lease on {lease.key} could not be renewed ({type(exc).__name__}) and expired"
                logger.error("%s", lease.lost)
                return
            logger.warning("renewing lease on %s failed (%s); retrying", lease.key, type(exc).__name__)
            self._schedule(lease, min(1.0, lease.ttl / 10))
            return
        if not ok:
            lease.lost = f"lease on {lease.key} was lost: it expired or another holder took it"
            logger.error("%s", lease.lost)
            return
        lease.valid_until = sent + lease.ttl
        logger.debug("lease on %s renewed", lease.key)
        self._schedule(lease, lease.ttl / 3)

    def _schedule(self, lease: Lease, delay: float) -> None:
        with self._cond:
            if id(lease) in self._active:
                heapq.heappush(self._heap, (time.monotonic() + delay, id(lease), lease))
                self._cond.notify()
