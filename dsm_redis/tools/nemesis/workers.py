"""What each nemesis worker process runs: random operations on the shared accounts, each one
recorded in the history before it starts and when it ends.

A worker is started as ``python -m dsm_redis.tools.nemesis.workers CONFIG SLOT`` (inside its host's
network namespace when there are hosts). It configures Django from the run's config file, reads
its own history file to resume numbering after a restart, and loops until the run's deadline (a
``time.monotonic()`` value: one clock for the whole machine) or its operation budget.

The schedule is derived from the seed: operation n of slot s is always the same (kind, object,
amount, think time, target), so ``--seed`` replays the same operations (their interleaving and
outcomes of course vary with timing and faults). Outcomes: ``ok`` (returned), ``fail``
(``TransitionException`` or any ``LockError``: nothing was committed), ``info`` (anything else:
a dropped connection, maybe during COMMIT; the process killed leaves no ``complete`` at all).

``DSM_NEMESIS_UNFENCED=1`` (read here only, for the negative control) makes the database accept
every fencing token in this process: a monkeypatch of ``dsm_redis.fence``'s judgement, never a
change to the library.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .history import FAIL, INFO, OK, HistoryWriter, read_events

UNFENCED_ENV = "DSM_NEMESIS_UNFENCED"
MAX_OPS = 1_000_000  # per worker slot: a bound on the loop besides the deadline
BACKOFF = (0.05, 0.25)  # seconds a worker waits after an operation that did not succeed

# kind -> weight in the mix
KINDS: dict[str, int] = {
    "advance": 4,  # an edge along the cycle, read-modify-write of the balance in its side effect
    "deposit": 3,  # the self-loop edge
    "transition_to": 2,
    "transition_through": 2,
    "object_lock": 3,  # read under object_lock, think, then a fenced hand-written write
    "locked_task": 2,  # a locked_task body run in-process (atomic: fenced before it reads)
    "locked_task_unatomic": 1,  # atomic=False: reads, thinks, then fences its own write
}


@dataclass(frozen=True)
class Plan:
    """One scheduled operation."""

    n: int
    kind: str
    obj: int
    amount: int
    think: float
    target: str


def schedule(seed: int, slot: int, objects: list[int], think: float) -> Any:
    """The endless, seed-determined sequence of operations of one worker slot."""
    from .models import STATES

    rng = random.Random(f"{seed}:ops:{slot}")
    kinds, weights = list(KINDS), list(KINDS.values())
    n = 0
    while True:
        kind = rng.choices(kinds, weights)[0]
        slow = kind in ("object_lock", "locked_task_unatomic")
        yield Plan(
            n=n,
            kind=kind,
            obj=rng.choice(objects),
            amount=rng.randint(1, 9),
            think=rng.uniform(0.02, 0.3) if slow else rng.uniform(0.0, think),
            target=rng.choice(STATES),
        )
        n += 1


# -- the operations --------------------------------------------------------------------------------


def _read(pk: int) -> tuple[Any, tuple[str, int]]:
    from .models import Account

    account = Account.objects.get(pk=pk)
    return account, (account.state, account.balance)


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


def dsm_operation(plan: Plan) -> None:
    """One operation through dsm_redis."""
    from django.db import transaction

    from dsm_redis import object_lock

    from .models import journal_write

    account, _ = _read(plan.obj)  # how a view or a task starts: load the object (maybe stale)
    if plan.kind == "advance":
        account.machine.advance(amount=plan.amount)
    elif plan.kind == "deposit":
        account.machine.deposit(amount=plan.amount)
    elif plan.kind == "transition_to":
        account.machine.transition_to(plan.target, amount=plan.amount)
    elif plan.kind == "transition_through":
        account.machine.transition_through(plan.target)
    elif plan.kind == "object_lock":
        with object_lock(account) as lease:
            _, before = _read(plan.obj)  # read under the lease (after its door), outside a transaction
            _sleep(plan.think)  # a slow computation
            after = (before[0], before[1] + plan.amount)
            with transaction.atomic():
                lease.fence()
                journal_write(account, before, after, lease.fencing_token, lease.owner)
    elif plan.kind in ("locked_task", "locked_task_unatomic"):
        _locked_task(plan.kind == "locked_task")(pk=plan.obj, amount=plan.amount, think=plan.think)
    else:
        raise ValueError(plan.kind)


_TASKS: dict[bool, Callable[..., Any]] = {}


def _locked_task(atomic: bool) -> Callable[..., Any]:
    """The decorated function, called directly (as a task body runs in a worker, in-process)."""
    task = _TASKS.get(atomic)
    if task is not None:
        return task
    from django.db import transaction

    from dsm_redis.celery import locked_task

    from .models import journal_write

    @locked_task("dsm_redis_nemesis.Account", pk_arg="pk", on_contention="raise", atomic=atomic)
    def body(pk: int, *, amount: int, think: float, lease: Any) -> None:
        account, before = _read(pk)  # atomic: inside the body's fenced transaction
        _sleep(think)
        after = (before[0], before[1] + amount)
        if atomic:
            journal_write(account, before, after, lease.fencing_token, lease.owner)
            return
        with transaction.atomic():
            lease.fence()
            journal_write(account, before, after, lease.fencing_token, lease.owner)

    _TASKS[atomic] = body
    return body


class Refused(Exception):
    """The cowboy code's own state check said no: nothing was written."""


def cowboy_operation(plan: Plan) -> None:
    """The same operation as the seed README's unprotected code: read, check in Python, write."""
    from django.db import transaction

    from .models import NEXT, journal_write

    def step(target: str | None) -> None:
        account, before = _read(plan.obj)
        state = before[0]
        if target is None:
            target = state
        if target not in (state, NEXT[state]):
            raise Refused(f"no edge {state} -> {target}")
        _sleep(plan.think)
        with transaction.atomic():
            journal_write(account, before, (target, before[1] + plan.amount), None, "")

    if plan.kind == "advance":
        _, (state, _) = _read(plan.obj)
        step(NEXT[state])
    elif plan.kind in ("deposit", "object_lock", "locked_task", "locked_task_unatomic"):
        step(None)
    elif plan.kind == "transition_to":
        step(plan.target)
    elif plan.kind == "transition_through":
        for _ in range(3):
            _, (state, _) = _read(plan.obj)
            if state == plan.target:
                return
            step(NEXT[state])
    else:
        raise ValueError(plan.kind)


# -- the loop --------------------------------------------------------------------------------------


def _outcome(exc: BaseException) -> str:
    from dsm_redis import LockError, TransitionException

    return FAIL if isinstance(exc, (TransitionException, LockError, Refused)) else INFO


def disable_fencing() -> None:
    """The negative control: the database's judgement of fencing tokens accepts everything."""
    from dsm_redis import fence

    if not hasattr(fence, "_judge"):
        raise RuntimeError("dsm_redis.fence has no _judge(): update the nemesis's fencing-off switch")

    def accept(verdict: Any, lease: Any, rejudge: Any) -> None:
        return None

    fence._judge = accept  # type: ignore[attr-defined]


def _setup(settings_dict: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    settings.configure(**settings_dict)
    django.setup()
    if os.environ.get(UNFENCED_ENV) == "1":
        disable_fencing()


def _next_op(path: Path) -> int:
    """Resume after a restart: one past the highest operation this slot ever invoked."""
    highest = -1
    if path.exists():
        for event in read_events(path):
            if event.get("type") == "invoke":
                highest = max(highest, int(str(event["op"]).rpartition(".")[2]))
    return highest + 1


def main(config_path: str, slot: int) -> int:
    config = json.loads(Path(config_path).read_text())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _setup(config["settings"])
    from django.db import connections

    from . import models

    history_path = Path(config["history_dir"]) / f"w{slot}.jsonl"
    first = _next_op(history_path)
    writer = HistoryWriter(history_path)
    run = cowboy_operation if config["contender"] == "cowboy" else dsm_operation
    deadline = int(config["deadline_ns"])
    plans = schedule(int(config["seed"]), slot, list(config["objects"]), float(config["think"]))
    for plan in plans:
        if plan.n < first:
            continue
        if time.monotonic_ns() >= deadline or plan.n >= MAX_OPS:
            break
        op = f"w{slot}.{plan.n}"

        def before_write(step: int, before: Any, after: Any, token: Any, owner: str, op: str = op) -> None:
            writer.emit(
                "write", op=op, step=step, **{"from": list(before), "to": list(after)}, token=token, owner=owner
            )

        def on_commit(step: int, op: str = op) -> None:
            writer.emit("commit", op=op, step=step)

        pending = models.Pending(op, before_write, on_commit, think=plan.think)
        writer.emit("invoke", op=op, obj=plan.obj, f=plan.kind, worker=slot, pid=os.getpid())
        scope = models.CURRENT.set(pending)
        try:
            run(plan)
        except Exception as exc:  # noqa: BLE001 - every outcome is recorded, none stops the worker
            outcome = _outcome(exc)
            writer.emit("complete", op=op, outcome=outcome, error=f"{type(exc).__name__}: {exc}"[:300])
            if outcome == INFO:
                with contextlib.suppress(Exception):
                    connections.close_all()  # a dropped or broken connection: reconnect next time
            # Back off as a client would: a partitioned worker must not spin on instant errors.
            time.sleep(random.uniform(*BACKOFF))
        else:
            writer.emit("complete", op=op, outcome=OK)
        finally:
            models.CURRENT.reset(scope)
    with contextlib.suppress(Exception):
        connections.close_all()
    writer.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1], int(sys.argv[2])))
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - the parent reads this from the worker's log
        traceback.print_exc()
        sys.exit(3)
