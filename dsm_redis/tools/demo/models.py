"""The demo's shop: a ``Subscription`` billed and paid period after period, with a balance.

A subscription is ``due`` (its current period is billed, not paid) or ``paid``. ``pay`` charges the
card for the current period (due -> paid); ``bill`` starts the next period (paid -> due);
``deposit`` adds 1 to the balance in either state. The same rules exist twice, as the two
contenders run them:

- ``Subscription.cowboy_*``: deus-state-machina README's "cowboy" style: read the object, check its
  state in Python, modify, ``save()``. No lock, no transaction.
- ``SubscriptionMachine``: the same rules as a dsm_redis machine (``sub.machine.pay()``, ...),
  each transition under the object's lease and row lock, fenced.

How losses are measured, the same way for both:

- every card charge inserts a ``Charge`` row and every bill a ``Bill`` row, each naming its period.
  An insert cannot be overwritten by a racing ``save()``, so a second row for the same period is
  a transition the machine forbids (paid -> paid, or due -> due), even when a racing ``save()``
  hid it in the subscription's own row;
- every committed deposit adds 1 to ``balance``; the workers count the deposits that reported
  success, and the shortfall in the balances is the number of lost updates.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from django.db import models

from dsm_redis import State, StateMachine, StateMachineField, Transition

from . import EXTERNAL_CALL

DUE, PAID = "due", "paid"


def charge_card(sub: Subscription, token: int | None = None) -> None:
    """The external call of a payment; leaves a ledger row per charge."""
    time.sleep(EXTERNAL_CALL)
    Charge.objects.create(subscription=sub, period=sub.period, fencing_token=token)


def send_bill(sub: Subscription) -> None:
    """The external call of a bill; leaves a ledger row per bill."""
    time.sleep(EXTERNAL_CALL)
    Bill.objects.create(subscription=sub, period=sub.period)


class SubscriptionMachine(StateMachine):
    """due --pay--> paid --bill--> due; ``deposit`` is a self-loop in both states."""

    Due = State(DUE)
    Paid = State(PAID)

    # Side effects run with the row locked and read under the lease: a racer that read the same
    # state is refused (TransitionException) before it gets here, so it charges or bills nothing.
    def pay(self, instance: Subscription, transition: Transition) -> None:
        charge_card(instance, transition.fencing_token)

    def bill(self, instance: Subscription, transition: Transition) -> None:
        instance.period += 1
        send_bill(instance)

    def deposit(self, instance: Subscription, transition: Transition, *, amount: int = 1) -> None:
        balance = instance.balance  # read under the lock: no other writer can interleave
        time.sleep(EXTERNAL_CALL)
        instance.balance = balance + amount

    transitions = [
        Due | pay | Paid,
        Paid | bill | Due,
        Due | deposit | Due,
        Paid | deposit | Paid,
    ]


class Subscription(models.Model):
    status = models.CharField(max_length=10, choices=[(DUE, "Due"), (PAID, "Paid")], default=DUE)
    period = models.IntegerField(default=1)
    balance = models.IntegerField(default=0)
    machine = StateMachineField(SubscriptionMachine, "status")

    objects: ClassVar[models.Manager[Subscription]]  # Django adds it; declared for type checkers

    # Race (all three methods): between the read that loaded this instance and save(), other
    # processes may have paid, billed or deposited. Their check passed too, on the same stale
    # read, so both charge or both bill; and save() writes every column as read, so it puts back
    # a stale balance (a lost deposit) and possibly a stale status (a second charge later).
    def cowboy_pay(self) -> bool:
        """The README's cowboy code; returns whether it paid."""
        if self.status == DUE:
            charge_card(self)
            self.status = PAID
            self.save()
            return True
        return False

    def cowboy_bill(self) -> bool:
        if self.status == PAID:
            self.period += 1
            send_bill(self)
            self.status = DUE
            self.save()
            return True
        return False

    def cowboy_deposit(self, amount: int = 1) -> None:
        balance = self.balance
        time.sleep(EXTERNAL_CALL)
        self.balance = balance + amount
        self.save()

    def __str__(self) -> str:
        return f"subscription {self.pk} ({self.status}, period {self.period}, balance {self.balance})"


class Charge(models.Model):
    """One row per card charge; ``fencing_token`` is the lease's token (None for cowboy code)."""

    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="charges")
    period = models.IntegerField()
    fencing_token = models.BigIntegerField(null=True)

    objects: ClassVar[models.Manager[Charge]]


class Bill(models.Model):
    """One row per bill sent, for the period it starts."""

    subscription = models.ForeignKey(Subscription, on_delete=models.CASCADE, related_name="bills")
    period = models.IntegerField()

    objects: ClassVar[models.Manager[Bill]]


def create_subscriptions(count: int) -> list[int]:
    """``count`` due subscriptions in their first period; their primary keys."""
    return [s.pk for s in Subscription.objects.bulk_create(Subscription() for _ in range(count))]


def reset_subscriptions() -> None:
    """Give the next contender the same starting point: the first period, due, balance 0."""
    Charge.objects.all().delete()
    Bill.objects.all().delete()
    Subscription.objects.update(status=DUE, period=1, balance=0)


def _duplicates(ledger: type[Charge] | type[Bill]) -> int:
    """Rows beyond the first per (subscription, period): each one a forbidden transition."""
    rows = ledger.objects.count()
    return rows - ledger.objects.values("subscription_id", "period").distinct().count()


def tally(deposits_committed: int) -> dict[str, Any]:
    """What the database holds now: lost deposits and forbidden transitions, counted from rows."""
    balance = Subscription.objects.aggregate(total=models.Sum("balance"))["total"] or 0
    return {"lost": deposits_committed - balance, "illegal": _duplicates(Charge) + _duplicates(Bill)}
