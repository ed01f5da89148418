"""What each spawned demo process runs.

A worker configures Django from the settings dict the parent passes (same database, same Redis,
same key prefix), then, for each contender in turn, waits at the barrier with the others and the
parent, races, and reports its counts on the results queue. Each round it picks a shared
subscription at random (the same sequence for both contenders), pays it if it reads as due or
bills the next period if it reads as paid, then deposits 1 into its balance.
"""

from __future__ import annotations

import contextlib
import random
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

BARRIER_TIMEOUT = 120.0  # seconds: the first wait includes every worker's Django start-up

COMMITTED, REFUSED, GAVE_UP = "committed", "refused", "gave up"


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs, picklable for the ``spawn`` start method."""

    settings: dict[str, Any]
    subscription_pks: list[int]
    rounds: int
    contenders: tuple[str, ...]


@dataclass
class Counts:
    """One worker's tally for one contender, as the code under test saw it."""

    attempted: int = 0
    committed: int = 0
    refused: int = 0
    gave_up: int = 0
    deposits: int = 0  # committed deposits: what the balances should add up to

    def record(self, outcome: str, *, deposit: bool = False) -> None:
        self.attempted += 1
        if outcome == COMMITTED:
            self.committed += 1
            self.deposits += int(deposit)
        elif outcome == REFUSED:
            self.refused += 1
        else:
            self.gave_up += 1


Operation = Callable[[Any], str]


def _cowboy(method: str) -> Operation:
    def operation(sub: Any) -> str:
        result = getattr(sub, f"cowboy_{method}")()
        return REFUSED if result is False else COMMITTED  # False: its own state check said no

    return operation


def _dsm_redis(edge: str) -> Operation:
    def operation(sub: Any) -> str:
        from dsm_redis import LockError, TransitionException

        try:
            getattr(sub.machine, edge)()
        except TransitionException:
            return REFUSED  # the row moved on since we read it: the machine refused, wrote nothing
        except LockError:
            return GAVE_UP  # no lease or row lock in time: nothing was written either
        return COMMITTED

    return operation


# contender -> what it runs for each operation
OPERATIONS: dict[str, dict[str, Operation]] = {
    "cowboy": {name: _cowboy(name) for name in ("pay", "bill", "deposit")},
    "dsm_redis": {name: _dsm_redis(name) for name in ("pay", "bill", "deposit")},
}


def race(contender: str, plan: Plan, index: int, progress: Any) -> Counts:
    """``plan.rounds`` rounds on randomly picked shared subscriptions: pay if due, else bill;
    then deposit."""
    from dsm_redis.tools.demo.models import DUE, Subscription

    run = OPERATIONS[contender]
    rng = random.Random(index)  # the same picks for both contenders: the same load
    counts = Counts()
    for _ in range(plan.rounds):
        pk = rng.choice(plan.subscription_pks)
        sub = Subscription.objects.get(pk=pk)  # how a view or a task starts: load the object
        counts.record(run["pay" if sub.status == DUE else "bill"](sub))
        counts.record(run["deposit"](Subscription.objects.get(pk=pk)), deposit=True)
        with progress.get_lock():
            progress.value += 1
    return counts


def _setup(settings_dict: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    settings.configure(**settings_dict)
    django.setup()


def main(index: int, plan: Plan, barrier: Any, progress: Any, results: Any) -> None:
    """Process entry point: set up, then one barrier-synchronised race per contender."""
    try:
        _setup(plan.settings)
        for contender in plan.contenders:
            barrier.wait(timeout=BARRIER_TIMEOUT)
            counts = race(contender, plan, index, progress)
            results.put(("done", index, asdict(counts)))
    except BaseException:  # noqa: BLE001 - any failure, reported to the parent with its traceback
        results.put(("error", index, traceback.format_exc()))
        barrier.abort()  # wake the parent and the other workers instead of letting them time out
    finally:
        with contextlib.suppress(Exception):  # Django may not be set up if _setup failed
            from django.db import connections

            connections.close_all()  # the parent drops the database once every worker has gone
