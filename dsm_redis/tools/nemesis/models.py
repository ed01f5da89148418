"""The objects the nemesis races on, their machine, and the journal of every committed write.

An ``Account`` is a per-object register: its value is ``(state, balance)``. Every operation of the
nemesis reads that value and writes a new one (a state of the cycle ``a -> b -> c -> a`` or the same
state, and a higher balance), and appends one ``Entry`` to the journal *in the transaction that
writes the account, after the account's UPDATE*: the UPDATE holds the account's row lock until the
commit, so per object the journal's ids are the commit order, whoever writes (dsm_redis or the
unprotected cowboy code).

Limits: the journal proves what committed and in which order; it says nothing about work outside
the database (there is none in the nemesis).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

from django.db import models, transaction

from dsm_redis import State, StateMachine, StateMachineField, Transition

STATES = ("a", "b", "c")
START = "a"
NEXT = {"a": "b", "b": "c", "c": "a"}
EDGES = sorted({(s, NEXT[s]) for s in STATES} | {(s, s) for s in STATES})  # the machine's edges, as (from, to)


@dataclass
class Pending:
    """What the operation running in this thread is: its id, and what to call before each write.

    ``before_write(step, from, to, token, owner)`` records the intended write in the history (the
    worker's hook) just before the journal row is inserted; ``steps`` counts the writes made.
    """

    op: str
    before_write: Callable[[int, tuple[str, int], tuple[str, int], int | None, str], None]
    on_commit: Callable[[int], None]
    think: float = 0.0  # seconds of "slow computation" between a read and its write
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


CURRENT: ContextVar[Pending | None] = ContextVar("dsm_redis_nemesis_op", default=None)


def journal_write(
    account: Account, before: tuple[str, int], after: tuple[str, int], token: int | None, owner: str
) -> None:
    """Write ``after`` to the account's row, then append the journal entry, in the current
    transaction; the history hears of it first, and again when (if) the transaction commits."""
    pending = CURRENT.get()
    if pending is None:
        raise RuntimeError("a nemesis write outside an operation")
    step = pending.steps
    pending.steps += 1
    pending.before_write(step, before, after, token, owner)
    Account.objects.filter(pk=account.pk).update(state=after[0], balance=after[1])
    Entry.objects.create(
        account_id=account.pk,
        op=pending.op,
        step=step,
        from_state=before[0],
        from_balance=before[1],
        to_state=after[0],
        to_balance=after[1],
        token=token,
        owner=owner,
    )
    transaction.on_commit(lambda: pending.on_commit(step))


def _think() -> None:
    pending = CURRENT.get()
    if pending is not None and pending.think > 0:
        time.sleep(pending.think)


class AccountMachine(StateMachine):
    """``a -> b -> c -> a`` (``advance``) and a self-loop in every state (``deposit``); both add
    ``amount`` to the balance as a read-modify-write with a slow computation in between."""

    A = State("a")
    B = State("b")
    C = State("c")

    def advance(self, instance: Account, transition: Transition, *, amount: int = 1) -> None:
        _side_effect(instance, transition, amount)

    def deposit(self, instance: Account, transition: Transition, *, amount: int = 1) -> None:
        _side_effect(instance, transition, amount)

    transitions = [
        A | advance | B,
        B | advance | C,
        C | advance | A,
        A | deposit | A,
        B | deposit | B,
        C | deposit | C,
    ]


def _side_effect(instance: Account, transition: Transition, amount: int) -> None:
    before = (instance.state, instance.balance)  # the row read under the lease and the row lock
    _think()
    after = (str(transition.end), instance.balance + amount)
    lease = transition.lease
    journal_write(instance, before, after, transition.fencing_token, lease.owner if lease is not None else "")
    # The protocol writes the state column (and the balance) again from the instance: same values.
    instance.balance = after[1]


class Account(models.Model):
    state = models.CharField(max_length=1, default=START)
    balance = models.BigIntegerField(default=0)
    machine = StateMachineField(AccountMachine, "state")

    objects: ClassVar[models.Manager[Account]]

    def __str__(self) -> str:
        return f"account {self.pk} ({self.state}, {self.balance})"


class Entry(models.Model):
    """One committed write: which operation (and step of it), the value it read and wrote, and the
    fencing token and lease owner it wrote under (None and "" for the cowboy contender)."""

    account_id = models.BigIntegerField(db_index=True)
    op = models.CharField(max_length=40)
    step = models.IntegerField()
    from_state = models.CharField(max_length=1)
    from_balance = models.BigIntegerField()
    to_state = models.CharField(max_length=1)
    to_balance = models.BigIntegerField()
    token = models.BigIntegerField(null=True)
    owner = models.CharField(max_length=64, blank=True)

    objects: ClassVar[models.Manager[Entry]]
