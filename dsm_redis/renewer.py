"""Renewal: one daemon thread per process calls ``tick()`` on every held lease at its interval.

The renewer knows a lease only through a weak reference, its interval and one method: ``tick()``
renews (or otherwise looks after) the lease and returns the delay until the next call, or ``None``
when the lease needs no more calls (python-redis-lock's renewer, which calls ``extend()``, is the
model). What renewing means — a lease found gone or unreachable past its deadline is marked lost, a
lease parked for transactions that all rolled back is released — is the lease's own business
(``lifecycle.Lease.tick``).

Safety contract: the thread survives anything a tick raises (the lease is dropped; ``tick`` itself
marks it lost first, so losing it is never silent). It ticks leases one at a time: a Redis call
stalled for longer than TTL/3 delays the others, which then fail safe (lost), never unsafe.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from typing import Protocol

__all__: list[str] = []

logger = logging.getLogger("dsm_redis")


class Renewable(Protocol):
    key: str

    @property
    def renew_interval(self) -> float: ...

    def tick(self) -> float | None: ...


# An idle renewer wakes at least this often, so that adding a lease due later never has to wake it:
# on the hot path of a short transition, add() and discard() cost no thread switch.
_IDLE_WAKE = 1.0


class _Entry:
    __slots__ = ("ref", "active")

    def __init__(self, ref: weakref.ref[Renewable]) -> None:
        self.ref = ref
        self.active = True  # False once discarded: its heap entry is dropped when the thread comes across it


class Renewer:
    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # Also run in a forked child: the parent's thread does not exist there, and the parent's
        # condition may have been held at the moment of the fork.
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Entry]] = []
        self._entries: weakref.WeakKeyDictionary[Renewable, _Entry] = weakref.WeakKeyDictionary()
        self._sequence = itertools.count()
        self._wake_at = 0.0  # when the thread will next look at the heap on its own
        self._started = False

    def add(self, lease: Renewable) -> None:
        """Tick ``lease`` every ``lease.renew_interval`` from now on (once, however often added)."""
        due = time.monotonic() + lease.renew_interval
        with self._cond:
            if lease in self._entries:
                return
            entry = self._entries[lease] = _Entry(weakref.ref(lease))
            if not self._started:
                threading.Thread(target=self._run, name="dsm_redis-renewer", daemon=True).start()
                self._started = True
            heapq.heappush(self._heap, (due, next(self._sequence), entry))
            if due < self._wake_at:
                self._cond.notify()

    def discard(self, lease: Renewable) -> None:
        """Stop ticking ``lease`` (released)."""
        with self._cond:
            entry = self._entries.pop(lease, None)
            if entry is not None:
                entry.active = False

    def _run(self) -> None:
        while True:
            with self._cond:
                entry = self._next_due()
            # The lease is referenced only inside _tick_once: a local of this loop would keep the
            # lease ticked last alive while the thread sleeps, and renew an abandoned lease forever.
            self._tick_once(entry)

    def _tick_once(self, entry: _Entry) -> None:
        lease = entry.ref()
        if lease is None:
            return  # collected: nothing holds it any more
        try:
            delay = lease.tick()
        except Exception:  # the thread must survive anything (tick fails safe on its own)
            logger.exception("renewer: unexpected error on %s", lease.key)
            delay = None
        with self._cond:
            if delay is None:
                if self._entries.get(lease) is entry:
                    del self._entries[lease]
                entry.active = False
            elif entry.active:  # not discarded meanwhile
                # On the renewer's own thread, which recomputes its wake-up before it sleeps again.
                heapq.heappush(self._heap, (time.monotonic() + delay, next(self._sequence), entry))

    def _next_due(self) -> _Entry:
        heap = self._heap
        while True:
            while heap and not heap[0][2].active:
                heapq.heappop(heap)  # released since it was added
            if len(heap) > 64 and len(heap) > 4 * sum(1 for entry in heap if entry[2].active):
                heap[:] = [entry for entry in heap if entry[2].active]  # behind a long holder
                heapq.heapify(heap)
            now = time.monotonic()
            if heap and heap[0][0] <= now:
                self._wake_at = now  # busy: adds need not wake us, we look again when done
                return heapq.heappop(heap)[2]
            self._wake_at = min(heap[0][0] if heap else now + _IDLE_WAKE, now + _IDLE_WAKE)
            self._cond.wait(self._wake_at - now)


# The process's renewer. Leases are added by ``lease.hold`` and discarded when released.
renewer = Renewer()
