"""The contenders: how each one runs one deposit on an object, retries included.

Every contender gets the object the way a view or a task would (``Model.objects.get(pk=...)``,
not timed) and then makes one *call* (timed, from the call to its return, retries included):

- ``cowboy``: the seed README's unprotected code: check the state in memory, change, ``save()``.
- ``seed``: deus-state-machina's algorithm, re-implemented here as a baseline: a per-instance
  ``RLock``, ``atomic``, ``select_for_update``, ``refresh_from_db``, side effect, ``save()``.
- ``pg-advisory``: what a PostgreSQL user might pick instead of Redis: ``atomic``, a transaction-scoped
  advisory lock per object (``pg_advisory_xact_lock``, as ``django-pglock`` takes it), then
  ``select_for_update().get()``, the side effect on that row, ``save()``.
- ``django-fsm-2``: ``ConcurrentTransitionMixin``; ``deposit()`` + ``save()`` inside ``atomic`` as
  its docs require; on ``ConcurrentTransition`` reload the object and retry until success.
- ``django-logic``: its state lock (``cache.add`` on Django's ``RedisCache``); on a ``locked``
  refusal sleep a random 0-``LOGIC_BACKOFF`` seconds, reload, retry until success.
- ``dsm_redis``: ``obj.machine.deposit()``; it waits for the lease itself (no retry loop).
- ``dsm_redis+column``: the same, on a model that opts into dsm_redis's ``FencingTokenField``
  (the fencing mark kept in the row instead of the shared mark table); left out when the installed
  dsm_redis has no such field.
- ``floor``: dsm_redis's protocol by hand (``bench.floor``): raw redis-py calls of its acquire and
  release scripts, raw psycopg statements on a connection of its own. A reference, not a peer: what
  the protocol costs with no library around it.
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

CONTENDERS = ["cowboy", "seed", "pg-advisory", "django-fsm-2", "django-logic", "dsm_redis"] + (["dsm_redis+column"] if _column else [])
CONTENDERS.append("floor")
DSM = [c for c in CONTENDERS if c.startswith("dsm_redis")]
FLOOR = "floor"
PEERS = [c for c in CONTENDERS if c not in DSM and c != FLOOR]
LOGIC_BACKOFF = 0.002  # seconds: upper bound of the random sleep before a refused call retries


class GaveUp(Exception):
    """A call retried past its hard deadline (counted, never silently dropped)."""


def model_for(name: str) -> Any:
    from bench.benchapp import models

    return {
        "cowboy": models.CowboyAccount,
        "seed": models.SeedAccount,
        "pg-advisory": models.AdvisoryAccount,
        "django-fsm-2": models.FsmAccount,
        "django-logic": models.LogicAccount,
        "dsm_redis": models.DsmAccount,
        "dsm_redis+column": getattr(models, "DsmColumnAccount", None),
        "floor": models.FloorAccount,
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


def _advisory(obj: Any, pk: int, hard_stop: float) -> tuple[Any, int]:
    from django.db import connection, transaction

    from bench.benchapp.models import deposit_effect

    model = type(obj)
    with transaction.atomic():
        with connection.cursor() as cursor:
            # One lock per object, held until the transaction ends; waiters wait inside PostgreSQL.
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"{model._meta.label_lower}:{pk}"])
        row = model.objects.select_for_update().get(pk=pk)
        if row.state != "open":
            raise RuntimeError(f"cannot deposit from {row.state}")
        deposit_effect(row)
        row.save()
    return row, 0


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


def _floor(obj: Any, pk: int, hard_stop: float) -> tuple[Any, int]:
    from bench import floor

    floor.client().deposit(pk)
    return obj, 0


# -- lease waits: from the call to the lease granted, measured in the racing workers only -----------

_dsm_waits: list[float] = []


def watch_lease_waits() -> None:
    """Time every lease acquire of this process's dsm_redis backend (a worker's, once).

    The backend's ``acquire`` is shadowed on the instance by a timer around it: from the call to the
    grant (or the exception), the acquire round trip included. The library itself is untouched.
    """
    from dsm_redis.backends import get_backend

    backend = get_backend()
    if "acquire" in vars(backend):
        return
    acquire = backend.acquire

    def timed(key: str, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return acquire(key, **kwargs)
        finally:
            _dsm_waits.append(time.perf_counter() - t0)

    backend.acquire = timed  # type: ignore[method-assign]


def take_lease_waits(name: str) -> list[float]:
    """The lease waits recorded since the last call, for a contender that takes leases."""
    if name == "floor":
        from bench import floor

        waits = floor.client().lease_waits
    elif name in DSM:
        waits = _dsm_waits
    else:
        return []
    out = list(waits)
    waits.clear()
    return out


CALLS: dict[str, Callable[[Any, int, float], tuple[Any, int]]] = {
    "cowboy": _cowboy,
    "seed": _seed_call,
    "pg-advisory": _advisory,
    "django-fsm-2": _fsm,
    "django-logic": _logic,
    "dsm_redis": _dsm,
    "dsm_redis+column": _dsm,
    "floor": _floor,
}
