from __future__ import annotations

import uuid

from django.db import models
from django.utils.timezone import now

from dsm_redis import (
    FencingTokenField,
    State,
    StateMachine,
    StateMachineField,
    TransitionFailed,
    permission,
    precondition,
)

UNKNOWN, ALIVE, DEAD = 0, 1, 2


class CatStateMachine(StateMachine):
    """The machine of deus-state-machina's README, plus a precondition and a None edge."""

    Unknown = State(UNKNOWN)
    Alive = State(ALIVE)
    Dead = State(DEAD)

    def survive(self, instance, transition):
        instance.can_meow = True

    @precondition(lambda cat: cat.age < 30)
    def rip(self, instance, transition, *, reason=""):
        instance.time_of_death = now()
        instance.cause = reason

    transitions = [
        Unknown | survive | Alive,
        Unknown | rip | Dead,
        Alive | None | Dead,
    ]


class Cat(models.Model):
    state = models.IntegerField(choices=[(UNKNOWN, "Unknown"), (ALIVE, "Alive"), (DEAD, "Dead")], default=UNKNOWN)
    can_meow = models.BooleanField(default=False)
    age = models.IntegerField(default=1)
    cause = models.CharField(max_length=100, blank=True)
    time_of_death = models.DateTimeField(null=True)
    state_machine = StateMachineField(CatStateMachine, "state")


class TestStates:
    """deus-state-machina's own test machine, ported with only the import line changed."""

    START = 0
    TRANSITION_TO_MIDDLE_ENABLED = 1
    MIDDLE = 2
    END = 3
    ANOTHER_END = 4
    THE_WAY_TO_FAILURE = 5
    FAILURE_IS_ACTUALLY_AN_OPTION = 6
    FAIL = 7

    @classmethod
    def choices(cls):
        return [(v, k) for k, v in cls.__dict__.items() if not k.startswith("_") and k[0].upper() == k[0]]


class SeedStateMachine(StateMachine):
    Start = State(TestStates.START)
    TransitionToMiddleEnabled = State(TestStates.TRANSITION_TO_MIDDLE_ENABLED)
    Middle = State(TestStates.MIDDLE)
    End = State(TestStates.END)
    AnotherEnd = State(TestStates.ANOTHER_END)
    TheWayToFailure = State(TestStates.THE_WAY_TO_FAILURE)
    Fail = State(TestStates.FAIL)
    FailureIsActuallyAnOption = State(TestStates.FAILURE_IS_ACTUALLY_AN_OPTION)

    def enable_transition_to_middle(self, obj, transition, *, can_transition_to_middle):
        obj.can_transition_to_middle = can_transition_to_middle

    @precondition(lambda obj: obj.can_transition_to_middle)
    def go_to_middle(self, obj, transition):
        pass

    @precondition(lambda obj: False)
    def never_gonna_happen(self, obj, transition):
        pass

    @precondition(lambda obj: True)
    def do_side_effect(self, obj, transition):
        obj.do_side_effect()

    def this_transition_will_fail(self, obj, transition):
        obj.note = "changed before failing"
        raise TransitionFailed(TestStates.FAIL)

    start = TestStates.START
    transitions = [
        Start | enable_transition_to_middle | TransitionToMiddleEnabled,
        Start | None | TheWayToFailure,
        TheWayToFailure | this_transition_will_fail | FailureIsActuallyAnOption,
        TheWayToFailure | None | Fail,
        TransitionToMiddleEnabled | go_to_middle | Middle,
        Middle | never_gonna_happen | End,
        Middle | do_side_effect | AnotherEnd,
    ]


class SeedModel(models.Model):
    state = models.IntegerField(default=TestStates.START, choices=TestStates.choices())
    state_machine = StateMachineField(SeedStateMachine, "state")
    can_transition_to_middle = models.BooleanField(default=False)
    note = models.CharField(max_length=100, blank=True)
    side_effects = models.IntegerField(default=0)

    def do_side_effect(self):
        self.side_effects += 1


class OrderStatus(models.TextChoices):
    NEW = "new", "New"
    PAID = "paid", "Paid"
    SHIPPED = "shipped", "Shipped"
    FAILED = "failed", "Payment failed"
    CANCELLED = "cancelled", "Cancelled"


class OrderMachine(StateMachine):
    """String states from an enum, built in a comprehension (no State class attributes)."""

    def pay(self, instance, transition, *, amount):
        if amount <= 0:
            raise TransitionFailed(OrderStatus.FAILED, reason=f"bad amount {amount}")
        instance.paid = amount
        AuditLog.objects.using(instance._state.db).create(
            order_id=instance.pk, token=transition.fencing_token, note="paid"
        )

    def fail(self, instance, transition, *, reason):
        instance.failure = reason

    def ship(self, instance, transition):
        AuditLog.objects.using(instance._state.db).create(
            order_id=instance.pk, token=transition.fencing_token, note="shipped"
        )

    def explode(self, instance, transition):
        instance.paid = -1
        AuditLog.objects.using(instance._state.db).create(order_id=instance.pk, note="explode")
        raise RuntimeError("side effect crashed")

    transitions = [
        State(OrderStatus.NEW) | pay | State(OrderStatus.PAID),
        State(OrderStatus.NEW) | fail | State(OrderStatus.FAILED),
        State(OrderStatus.PAID) | ship | State(OrderStatus.SHIPPED),
        State(OrderStatus.PAID) | explode | State(OrderStatus.SHIPPED),
        *[State(s) | None | State(OrderStatus.CANCELLED) for s in (OrderStatus.NEW, OrderStatus.PAID)],
    ]


class Order(models.Model):
    status = models.CharField(max_length=20, choices=OrderStatus.choices, default=OrderStatus.NEW)
    paid = models.IntegerField(default=0)
    failure = models.CharField(max_length=100, blank=True)
    updated = models.DateTimeField(auto_now=True)
    machine = StateMachineField(OrderMachine, "status")


class AuditLog(models.Model):
    order_id = models.IntegerField()
    token = models.BigIntegerField(null=True)
    note = models.CharField(max_length=50)


class AccountMachine(StateMachine):
    """A self-loop whose side effect is a read-modify-write: the shape of every lost update."""

    def deposit(self, instance, transition, *, amount=1, work=0.0, effect=None):
        if effect is not None:
            effect()  # something outside the database: must run once per committed deposit
        balance = instance.balance
        if work:
            import time

            time.sleep(work)  # an external call between the read and the write
        instance.balance = balance + amount
        instance.deposits += 1

    def close(self, instance, transition):
        pass

    transitions = [
        State("open") | deposit | State("open"),
        State("open") | close | State("closed"),
    ]


class Account(models.Model):
    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)
    machine = StateMachineField(AccountMachine, "state")


class Switch(models.Model):
    """Off/on: racing callers of turn_on() must not both succeed."""

    class Machine(StateMachine):
        def turn_on(self, instance, transition):
            instance.flips += 1

        def turn_off(self, instance, transition):
            instance.flips += 1

        transitions = [State("off") | turn_on | State("on"), State("on") | turn_off | State("off")]

    state = models.CharField(max_length=3, default="off")
    flips = models.IntegerField(default=0)
    machine = StateMachineField(Machine, "state")


class Parcel(models.Model):
    """Two machines on one object: one's side effect drives the other (a nested transition)."""

    class Shipping(StateMachine):
        def ship(self, instance, transition):
            instance.billing.charge()

        transitions = [State("packed") | ship | State("shipped")]

    class Billing(StateMachine):
        def charge(self, instance, transition):
            instance.charged_with = transition.fencing_token

        transitions = [State("open") | charge | State("charged")]

    state = models.CharField(max_length=10, default="packed")
    billing_state = models.CharField(max_length=10, default="open")
    charged_with = models.BigIntegerField(null=True)
    state_machine = StateMachineField(Shipping, "state")
    billing = StateMachineField(Billing, "billing_state")


class FencedAccount(models.Model):
    """An Account that keeps its fencing mark in its own row (FencingTokenField)."""

    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)
    fencing_token = FencingTokenField()
    machine = StateMachineField(AccountMachine, "state")


class ProxyCat(Cat):
    """Same row, same lease: a proxy must not get a key of its own."""

    class Meta:
        proxy = True


class Lion(Cat):
    """Multi-table inheritance: the child's row shares its parent's key and is locked parent first."""

    mane = models.CharField(max_length=10, default="short")


class KeyedAccount(models.Model):
    """An Account whose primary key is any string: long, with ':', braces and spaces."""

    key = models.CharField(primary_key=True, max_length=600)
    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)
    machine = StateMachineField(AccountMachine, "state")


class UuidAccount(models.Model):
    """An Account with a UUID primary key."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)
    machine = StateMachineField(AccountMachine, "state")


class DecimalAccount(models.Model):
    """An Account with a Decimal primary key: 1.0 and 1.00 name one row."""

    number = models.DecimalField(primary_key=True, max_digits=8, decimal_places=2)
    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)
    machine = StateMachineField(AccountMachine, "state")


class InvoiceMachine(StateMachine):
    """History on, edges with permissions: the admin's test machine."""

    history = True
    history_redact = ("card",)

    def pay(self, instance, transition, amount: int, card: str = ""):
        if amount <= 0:
            raise TransitionFailed("failed", reason=f"bad amount {amount}")
        instance.paid = amount

    def fail(self, instance, transition, *, reason=""):
        instance.failure = reason

    @permission("testapp.ship_invoice")
    def ship(self, instance, transition):
        pass

    @permission(lambda user, invoice: user.is_superuser)
    def refund(self, instance, transition):
        instance.paid = 0

    transitions = [
        State("new") | pay | State("paid"),
        State("new") | fail | State("failed"),
        State("paid") | ship | State("shipped"),
        State("paid") | refund | State("new"),
        State("new") | None | State("cancelled"),
    ]


class Invoice(models.Model):
    status = models.CharField(
        max_length=20,
        default="new",
        choices=[
            ("new", "New"),
            ("paid", "Paid"),
            ("shipped", "Shipped"),
            ("failed", "Failed"),
            ("cancelled", "Cancelled"),
        ],
    )
    paid = models.IntegerField(default=0)
    failure = models.CharField(max_length=100, blank=True)
    machine = StateMachineField(InvoiceMachine, "status")

    class Meta:
        permissions = [("ship_invoice", "Can ship invoices")]

    def __str__(self) -> str:
        return f"Invoice {self.pk}"


class HistoryAccount(models.Model):
    """An Account whose machine records its history (the field's ``history=True``)."""

    state = models.CharField(max_length=10, default="open")
    balance = models.IntegerField(default=0)
    deposits = models.IntegerField(default=0)
    machine = StateMachineField(AccountMachine, "state", history=True)
