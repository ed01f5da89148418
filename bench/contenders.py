"""The five contenders: how each one runs one deposit on an object, retries included.

Every contender gets the object the way a view or a task would (``Model.objects.get(pk=...)``,
not timed) and then makes one *call* (timed, from the call to its return, retries included):

- ``cowboy``: the seed README's unprotected code: check the state in memory, change, ``save()``.
- ``seed``: deus-state-machina's algorithm, re-implemented here as a baseline: a per-instance
  ``RLock``, ``atomic``, ``select_for_update``, ``refresh_from_db``, side effect, ``save()``.
- ``django-fsm-2``: ``ConcurrentTransitionMixin``; ``deposit()`` + ``save()`` inside ``atomic`` as
  its docs require; on ``ConcurrentTransition`` reload the object and retry until success.
- ``django-logic``: its state lock (``cache.add`` on Django's ``RedisCache``); on a ``locked``
  refusal sleep a random 0-``LOGIC_BACKOFF`` seconds, reload, retry until success.
- ``dsm_redis``: ``obj.machine.deposit()``; it waits for the lease itself (no retry loop).
- ``dsm_redis+column``: the same, on a model that opts into dsm_redis's ``FencingTokenField``
  (the fencing mark kept in the row instead of the shared mark table); left out when the installed
  dsm_redis has no such field.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from django.dispatch import Signal

try:
    from dsm_redis.fence import FencingTokenField as _column
except ImportError:  # pragma: no cover
    _column = None

CONTENDERS = ["cowboy", "seed", "django-fsm-2", "django-logic", "dsm_redis"] + (["dsm_redis+column"] if _column else [])
DSM = [c for c in CONTENDERS if c.startswith("dsm_redis")]
PEERS = [c for c in CONTENDERS if c not in DSM]
LOGIC_BACKOFF = 0.002  # seconds: upper bound of the random sleep before a refused call retries


class GaveUp(Exception):
    """A call retried past its hard deadline (counted, never silently dropped)."""


def model_for(name: str) -> Any:
    from bench.benchapp import models

    return {
        "cowboy": models.CowboyAccount,
        "seed": models.SeedAccount,
        "django-fsm-2": models.FsmAccount,
        "django-logic": models.LogicAccount,
        "dsm_redis": models.DsmAccount,
        "dsm_redis+column": getattr(models, "DsmColumnAccount", None),
    }[name]


# -- seed: deus-state-machina's transition_to, reduced to the deposit edge ------------------------

_attach_lock = threading.RLock()


def _thread_lock(obj: Any) -> threading.RLock:
    with _attach_lock:
        lock = obj.__dict__.get("_seed_thread_lock")
        if lock is None:
            lock = obj.__dict__["_seed_thread_lock"] = threading.RLock()
        return lock


class SeedMachine:
    """The seed's order of operations: thread lock, atomic + SELECT ... FOR UPDATE, refresh_from_db,
    precondition, side effect, set the state, full ``save()``, then ``state_changed``."""

    state_changed = Signal()
    transitions = [("open", "deposit", "open")]

    def transition(self, obj: Any, edge: str) -> Any:
        from django.db import transaction

        from bench.benchapp.models import deposit_effect

        # The seed picks the edge from the in-memory state before locking.
        start, _, end = next(t for t in self.transitions if t[0] == obj.state and t[1] == edge)
        with _thread_lock(obj):
            with transaction.atomic():
                type(obj).objects.select_for_update().get(pk=obj.pk)
                obj.refresh_from_db()
                if obj.state != start:
                    raise RuntimeError(f"cannot {edge} from {obj.state}")
                deposit_effect(obj)
                obj.state = end
                obj.save()
        self.state_changed.send_robust(sender=type(obj), instance=obj, state=end, field_name="state")
        return end


_seed = SeedMachine()


# -- one call per contender: returns the number of retries it needed ----------------------------


def _cowboy(obj: Any, pk: int, hard_stop: float) -> tuple[Any, int]:
    obj.deposit()
    return obj, 0


def _seed_call(obj: Any, pk: int, hard_stop: float) -> tuple[Any, int]:
    _seed.transition(obj, "deposit")
    return obj, 0


def _fsm(obj: Any, pk: int, hard_stop: float) -> tuple[Any, int]:
    from django.db import transaction
    from django_fsm import ConcurrentTransition

    model = type(obj)
    retries = 0
    while True:
        try:
            with transaction.atomic():
                obj.deposit()
                obj.save()
            return obj, retries
        except ConcurrentTransition:
            retries += 1
            if time.monotonic() > hard_stop:
                raise GaveUp(retries) from None
            obj = model.objects.get(pk=pk)


def _logic(obj: Any, pk: int, hard_stop: float) -> tuple[Any, int]:
    from django_logic.exceptions import RefusalReason, TransitionNotAllowed

    model = type(obj)
    retries = 0
    while True:
        try:
            obj.process.deposit()
            return obj, retries
        except TransitionNotAllowed as refusal:
            if getattr(refusal, "reason", None) != RefusalReason.LOCKED:
                raise
            retries += 1
            if time.monotonic() > hard_stop:
                raise GaveUp(retries) from None
            time.sleep(random.random() * LOGIC_BACKOFF)
            obj = model.objects.get(pk=pk)


def _dsm(obj: Any, pk: int, hard_stop: float) -> tuple[Any, int]:
    obj.machine.deposit()
    return obj, 0


CALLS: dict[str, Callable[[Any, int, float], tuple[Any, int]]] = {
    "cowboy": _cowboy,
    "seed": _seed_call,
    "django-fsm-2": _fsm,
    "django-logic": _logic,
    "dsm_redis": _dsm,
    "dsm_redis+column": _dsm,
}
