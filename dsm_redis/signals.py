"""Signals, as deus-state-machina sent them; both fire once per *committed* transition.

``state_changed`` is sent with ``instance``, ``state``, ``field_name`` and ``fencing_token`` after
the transaction commits and the lease is released (a rolled-back transition never sends it).
Receivers run with ``send_robust``: one that raises is logged and does not turn a committed
transition into an error.

Order: on the thread that committed them, an object's signals are delivered in the order its
transitions committed, also when a receiver or an on-commit hook transitions objects in turn.
dsm_redis's own on-commit hooks run before any hook of yours (whenever you registered it), a
commit's signals are queued before any of its leases is released, and signals sent while
receivers are running wait in a per-thread FIFO queue until those are done. ``fencing_token`` is the token of
the lease the transition committed under (``None`` for an unsaved object, which has no lease):
transitions of one object committed later carry a token at least as high, so a receiver that
hands the signal to another process can let it drop stale ones. Signals of transitions committed
on different threads or processes are not ordered with respect to each other.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from django.dispatch import Signal

from .machine import StateValue, plain

__all__ = ["state_changed", "emit_signal_on_state"]

state_changed = Signal()


class _Deliveries(threading.local):
    def __init__(self) -> None:
        self.queue: deque[Callable[[], None]] = deque()
        self.delivering = False  # receivers are running on this thread: later signals wait


_deliveries = _Deliveries()


def deliver(send: Callable[[], None]) -> None:
    """Run ``send`` now, or after the deliveries this thread is already in the middle of (FIFO).

    Closes the race where a receiver (or a commit's hook) transitions an object whose earlier,
    already committed transition has not been signalled yet: its newer signal would overtake it.
    """
    _deliveries.queue.append(send)
    _drain()


def deliver_pending() -> None:
    """Deliver what an interrupted delivery (a receiver's ``BaseException``) left queued."""
    _drain()


def _drain() -> None:
    state = _deliveries
    if state.delivering:
        return  # the delivery already under way on this thread runs it after
    state.delivering = True
    try:
        while state.queue:
            state.queue.popleft()()
    finally:
        state.delivering = False


def emit_signal_on_state(model: Any, target_field_name: str, target_state: StateValue, signal: Signal) -> None:
    """Send ``signal(sender=model, instance=...)`` whenever ``model`` enters ``target_state``."""
    target = plain(target_state)

    def handler(instance: Any, state: Any, field_name: str, **kwargs: Any) -> None:
        if field_name == target_field_name and plain(state) == target:
            signal.send(sender=model, instance=instance)

    state_changed.connect(handler, sender=model, weak=False)
