"""One model per contender, all with the same columns and the same business operation.

The operation is a *deposit*: a self-loop edge ``open -> open`` whose side effect reads the balance
from the instance and writes it back plus one (a read-modify-write, the shape of every lost update),
and counts the deposit. Each contender expresses it the way its library's documentation does.
"""

from __future__ import annotations

from django.db import models
from django_fsm import ConcurrentTransitionMixin, FSMField, transition
from django_logic import Process, Transition

from dsm_redis import State, StateMachine, StateMachineField

try:  # dsm_redis's opt-in fencing column (the mark kept in the row itself)
    from dsm_redis.fence import FencingTokenField
except ImportError:  # pragma: no cover - an older dsm_redis: that contender is left out
    FencingTokenField = None


def deposit_effect(instance: models.Model, amount: int = 1) -> None:
    """The business operation every contender runs: a read-modify-write of the balance."""
    balance = instance.balance
    instance.balance = balance + amount
    instance.deposits += 1


class CowboyAccount(models.Model):
    """The seed README's "cowboy" code: read, check the state, change, ``save()``; no lock."""

    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)

    def deposit(self) -> bool:
        if self.state == "open":
            deposit_effect(self)
            self.state = "open"
            self.save()
            return True
        return False


class SeedAccount(models.Model):
    """Driven by ``bench.contenders.SeedMachine`` (the seed's algorithm, re-implemented)."""

    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)


class AdvisoryAccount(models.Model):
    """Driven by ``bench.contenders._advisory``: what a PostgreSQL user might pick instead of Redis, a
    transaction-scoped advisory lock per object (as ``django-pglock``'s ``advisory(xact=True)``) plus
    ``select_for_update``."""

    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)


class FsmAccount(ConcurrentTransitionMixin, models.Model):
    """django-fsm-2 with ``ConcurrentTransitionMixin`` (its optimistic check on the state column)."""

    state = FSMField(default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)

    @transition(field=state, source="open", target="open")
    def deposit(self) -> None:
        deposit_effect(self)


def logic_deposit(instance: models.Model, **kwargs: object) -> None:
    # django-logic side effects receive the instance the caller loaded and persist their own
    # changes; the state lock is held around them.
    deposit_effect(instance)
    instance.save(update_fields=["balance", "deposits"])


class LogicAccountProcess(Process):
    process_name = "process"
    transitions = [
        # target=None: django-logic's documented form for an edge that writes no new state (it
        # still takes the state lock and revalidates the source); the cheapest correct form here.
        Transition(action_name="deposit", sources=["open"], target=None, side_effects=[logic_deposit]),
    ]


class LogicAccount(models.Model):
    """django-logic, its state lock on Django's ``RedisCache`` (bound in ``apps.py``)."""

    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)


class DepositMachine(StateMachine):
    def deposit(self, instance: models.Model, transition: object) -> None:
        deposit_effect(instance)

    transitions = [State("open") | deposit | State("open")]


class DsmAccount(models.Model):
    """dsm_redis: Redis lease + ``select_for_update`` + fencing token (Redis backend)."""

    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)
    machine = StateMachineField(DepositMachine, "state")


class FloorAccount(models.Model):
    """Driven by ``bench.floor`` (dsm_redis's protocol by hand: raw redis-py and psycopg)."""

    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)


if FencingTokenField is not None:

    class DsmColumnAccount(models.Model):
        """dsm_redis with ``FencingTokenField``: the fencing mark lives in the row, written by the
        transition's own UPDATE, instead of the shared mark table."""

        state = models.CharField(max_length=10, default="open")
        balance = models.IntegerField(default=0)
        deposits = models.IntegerField(default=0)
        fencing_token = FencingTokenField()
        machine = StateMachineField(DepositMachine, "state")
