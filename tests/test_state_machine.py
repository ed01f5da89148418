"""deus-state-machina's behaviour, on PostgreSQL and SQLite, through the real Redis backend.

The first block is deus-state-machina's own test suite with only the import line changed.
"""

from __future__ import annotations

import pickle

import pytest

from dsm_redis import TransitionException, TransitionFailed, object_lock, state_changed
from tests.testapp.models import (
    ALIVE,
    DEAD,
    UNKNOWN,
    Account,
    AuditLog,
    Cat,
    Order,
    OrderStatus,
    Parcel,
    SeedModel,
    Switch,
    TestStates,
)

pytestmark = pytest.mark.django_db(databases=["default", "sqlite"], transaction=True)


def fetch(obj):
    return type(obj).objects.using(obj._state.db).get(pk=obj.pk)


# -- deus-state-machina's own tests (unsaved objects) ---------------------------------------------


def test_successful_state_transition(db_alias):
    obj = SeedModel()
    obj._state.db = db_alias
    assert obj.state == TestStates.START
    obj.state_machine.transition_to(TestStates.TRANSITION_TO_MIDDLE_ENABLED, can_transition_to_middle=True)
    assert obj.state == TestStates.TRANSITION_TO_MIDDLE_ENABLED
    obj.state_machine.go_to_middle()
    obj.state_machine.transition_to(TestStates.ANOTHER_END)
    assert obj.state == TestStates.ANOTHER_END
    assert obj.side_effects == 1
    assert fetch(obj).state == TestStates.ANOTHER_END


def test_failure(db_alias):
    obj = SeedModel.objects.using(db_alias).create()
    obj.state_machine.transition_to(TestStates.THE_WAY_TO_FAILURE)
    assert obj.state_machine.transition_to(TestStates.FAILURE_IS_ACTUALLY_AN_OPTION) == TestStates.FAIL
    assert obj.state == TestStates.FAIL
    row = fetch(obj)
    assert row.state == TestStates.FAIL
    assert row.note == ""  # the failed side effect's change was rolled back


def test_failure_transition_through(db_alias):
    obj = SeedModel.objects.using(db_alias).create()
    obj.state_machine.transition_through(TestStates.FAILURE_IS_ACTUALLY_AN_OPTION)
    assert obj.state == TestStates.FAIL
    assert fetch(obj).state == TestStates.FAIL


def test_transition_by_side_effect_name(db_alias):
    obj = SeedModel.objects.using(db_alias).create()
    obj.state_machine.enable_transition_to_middle(can_transition_to_middle=True)
    assert obj.state == TestStates.TRANSITION_TO_MIDDLE_ENABLED
    assert fetch(obj).can_transition_to_middle is True


def test_transition_by_side_effect_wrong_params(db_alias):
    obj = SeedModel.objects.using(db_alias).create()
    with pytest.raises(TypeError, match="can_transition_to_middle"):
        obj.state_machine.enable_transition_to_middle()
    with pytest.raises(TypeError):
        obj.state_machine.enable_transition_to_middle(can_transition_to_middle=True, colour="red")
    assert obj.state == TestStates.START
    assert fetch(obj).state == TestStates.START


def test_transition_to_side_effect_wrong_method_name(db_alias):
    obj = SeedModel.objects.using(db_alias).create()
    with pytest.raises(AttributeError, match="i_dont_exist"):
        obj.state_machine.i_dont_exist()
    assert obj.state == TestStates.START


# -- the README's Cat -------------------------------------------------------------------------------


def test_cat_survives_by_edge_and_by_state(db_alias):
    cat = Cat.objects.using(db_alias).create()
    assert cat.state_machine.survive() == ALIVE
    assert (cat.state, cat.can_meow) == (ALIVE, True)
    assert fetch(cat).can_meow is True
    assert cat.state_machine.transition_to(DEAD) == DEAD  # the None edge Alive -> Dead
    assert fetch(cat).state == DEAD


def test_kwargs_reach_the_side_effect(db_alias):
    cat = Cat.objects.using(db_alias).create()
    cat.state_machine.rip(reason="old age")
    row = fetch(cat)
    assert (row.state, row.cause) == (DEAD, "old age")
    assert row.time_of_death is not None


def test_precondition_failure_changes_nothing(db_alias):
    cat = Cat.objects.using(db_alias).create(age=31)
    with pytest.raises(TransitionException, match="precondition failed"):
        cat.state_machine.rip(reason="too old")
    assert (cat.state, cat.cause, cat.time_of_death) == (UNKNOWN, "", None)
    assert fetch(cat).state == UNKNOWN


def test_illegal_transition_names_states_and_changes_nothing(db_alias):
    cat = Cat.objects.using(db_alias).create(state=DEAD)
    with pytest.raises(TransitionException, match=r"2 \(Dead\).*1 \(Alive\)"):
        cat.state_machine.transition_to(ALIVE)
    with pytest.raises(TransitionException, match="survive"):
        cat.state_machine.survive()
    assert (cat.state, cat.can_meow) == (DEAD, False)
    assert fetch(cat).state == DEAD


def test_unknown_target_state(db_alias):
    cat = Cat.objects.using(db_alias).create()
    with pytest.raises(TransitionException, match="no state 42"):
        cat.state_machine.transition_to(42)
    assert fetch(cat).state == UNKNOWN


def test_stale_instance_is_resolved_against_the_row(db_alias):
    cat = Cat.objects.using(db_alias).create()
    stale = fetch(cat)
    cat.state_machine.survive()
    # The stale copy still says Unknown, but the row (read under the lock) says Alive.
    with pytest.raises(TransitionException, match=r"1 \(Alive\)"):
        stale.state_machine.rip()
    assert stale.state == UNKNOWN  # refused: the instance is left as it was
    assert stale.state_machine.transition_to(DEAD) == DEAD  # Alive -> Dead, from the row
    assert fetch(cat).state == DEAD


def test_transition_reads_the_row_not_the_instance(db_alias):
    cat = Cat.objects.using(db_alias).create()
    Cat.objects.using(db_alias).filter(pk=cat.pk).update(age=7)
    cat.state_machine.survive()
    assert cat.age == 7  # the row read under the lock replaced the stale in-memory value


def test_state_wrappers_and_enums_are_accepted(db_alias):
    order = Order.objects.using(db_alias).create()
    from dsm_redis import State

    assert order.machine.transition_to(State(OrderStatus.CANCELLED)) == "cancelled"
    order2 = Order.objects.using(db_alias).create()
    assert order2.machine.transition_to(OrderStatus.PAID, amount=5) == OrderStatus.PAID
    assert order2.machine.transition_to("cancelled") == OrderStatus.CANCELLED
    assert (fetch(order2).status, fetch(order2).paid) == ("cancelled", 5)


def test_ambiguous_target_names_the_edges(db_alias):
    order = Order.objects.using(db_alias).create(status=OrderStatus.PAID)
    with pytest.raises(TransitionException, match="ship, explode"):
        order.machine.transition_to(OrderStatus.SHIPPED)
    assert fetch(order).status == "paid"


def test_transition_failed_moves_to_error_state_with_kwargs(db_alias):
    order = Order.objects.using(db_alias).create()
    assert order.machine.pay(amount=0) == OrderStatus.FAILED
    row = fetch(order)
    assert (row.status, row.failure, row.paid) == ("failed", "bad amount 0", 0)


def test_crashing_side_effect_rolls_back_and_frees_the_object(db_alias):
    order = Order.objects.using(db_alias).create()
    order.machine.pay(amount=3)
    with pytest.raises(RuntimeError, match="crashed"):
        order.machine.explode()
    assert (order.status, order.paid) == ("paid", 3)  # in-memory instance restored
    row = fetch(order)
    assert (row.status, row.paid) == ("paid", 3)
    assert not AuditLog.objects.using(db_alias).filter(note="explode").exists()
    assert order.machine.ship() == "shipped"  # the lease was released: usable at once


def test_transition_through_walks_shortest_path(db_alias):
    cat = Cat.objects.using(db_alias).create()
    assert cat.state_machine.transition_through(DEAD) == DEAD
    assert fetch(cat).state == DEAD
    assert cat.state_machine.transition_through(DEAD) == DEAD  # already there: nothing to do
    with pytest.raises(TransitionException, match="no path"):
        cat.state_machine.transition_through(ALIVE)


def test_transition_through_multiple_steps_commit_each(db_alias):
    order = Order.objects.using(db_alias).create(status=OrderStatus.PAID)
    seen = []

    def receiver(sender, instance, state, field_name, **kwargs):
        seen.append(state)

    state_changed.connect(receiver, sender=Order)
    try:
        obj = SeedModel.objects.using(db_alias).create(can_transition_to_middle=True)
        # Start -> TheWayToFailure -> Fail is shorter than via the middle
        obj.state_machine.transition_through(TestStates.FAIL)
        assert fetch(obj).state == TestStates.FAIL
    finally:
        state_changed.disconnect(receiver, sender=Order)
    assert order.status == "paid"


def test_get_possible_transitions_applies_preconditions(db_alias):
    cat = Cat.objects.using(db_alias).create(age=40)
    possible = cat.state_machine.get_possible_transitions()
    assert [(t.start, t.end, t.side_effect.__name__) for t in possible] == [(UNKNOWN, ALIVE, "survive")]
    cat.age = 3
    assert {t.end for t in cat.state_machine.get_possible_transitions()} == {ALIVE, DEAD}


def test_state_changed_fires_after_commit_only(db_alias):
    seen = []

    def receiver(sender, instance, state, field_name, **kwargs):
        seen.append((instance.pk, state, field_name))

    state_changed.connect(receiver, sender=Order)
    try:
        order = Order.objects.using(db_alias).create()
        order.machine.pay(amount=2)
        with pytest.raises(RuntimeError):
            order.machine.explode()
        assert seen == [(order.pk, "paid", "status")]
    finally:
        state_changed.disconnect(receiver, sender=Order)


def test_emit_signal_on_state(db_alias):
    from django.dispatch import Signal

    from dsm_redis import emit_signal_on_state

    shipped = Signal()
    got = []
    shipped.connect(lambda sender, instance, **kw: got.append(instance.pk), weak=False)
    emit_signal_on_state(Order, "status", OrderStatus.SHIPPED, shipped)
    order = Order.objects.using(db_alias).create(status=OrderStatus.PAID)
    order.machine.ship()
    assert got == [order.pk]


def test_signal_not_sent_when_outer_transaction_rolls_back(db_alias):
    from django.db import transaction

    seen = []

    def receiver(sender, instance, state, **kwargs):
        seen.append(state)

    state_changed.connect(receiver, sender=Cat)
    try:
        cat = Cat.objects.using(db_alias).create()
        with pytest.raises(ZeroDivisionError):
            with transaction.atomic(using=db_alias):
                cat.state_machine.survive()
                1 / 0
        assert seen == []
        assert fetch(cat).state == UNKNOWN
    finally:
        state_changed.disconnect(receiver, sender=Cat)


def test_side_effect_sees_the_fencing_token(db_alias):
    order = Order.objects.using(db_alias).create()
    order.machine.pay(amount=1)
    order.machine.ship()
    tokens = list(
        AuditLog.objects.using(db_alias).filter(order_id=order.pk).order_by("id").values_list("token", flat=True)
    )
    assert len(tokens) == 2 and tokens[0] < tokens[1]


def test_object_lock_is_reentrant_across_transitions(db_alias):
    order = Order.objects.using(db_alias).create()
    with object_lock(order) as lease:
        order.machine.pay(amount=4)
        order.machine.ship()
        with object_lock(order) as inner:
            assert inner is lease
    tokens = set(AuditLog.objects.using(db_alias).filter(order_id=order.pk).values_list("token", flat=True))
    assert tokens == {lease.fencing_token}  # one lease, one token, both writes fenced by it


def test_nested_transition_from_a_side_effect(db_alias):
    parcel = Parcel.objects.using(db_alias).create()
    with object_lock(parcel) as lease:
        # ship's side effect calls parcel.billing.charge(): same object, so it re-enters the
        # lease and runs inside the same transaction instead of waiting for itself.
        assert parcel.state_machine.ship() == "shipped"
    row = fetch(parcel)
    assert (row.state, row.billing_state, row.charged_with) == ("shipped", "charged", lease.fencing_token)


def test_unsaved_object_is_saved_at_the_end(db_alias):
    cat = Cat(age=2)
    cat._state.db = db_alias
    cat.state_machine.survive()
    assert cat.pk is not None
    assert fetch(cat).state == ALIVE


def test_exceptions_pickle():
    from dsm_redis import LockBackendUnavailable, LockLost, LockTimeout, StaleFencingToken

    for exc in (
        TransitionException("x"),
        TransitionFailed(7, reason="r"),
        LockTimeout("t"),
        LockLost("l"),
        StaleFencingToken("s", token=1, mark=2),
        LockBackendUnavailable("u"),
    ):
        clone = pickle.loads(pickle.dumps(exc))
        assert type(clone) is type(exc) and clone.args == exc.args and vars(clone) == vars(exc)


def test_deus_state_machina_import_paths_map_one_to_one():
    # `from deus_state_machina.fields import StateMachineField` becomes `dsm_redis.fields`.
    from dsm_redis import StateMachineField as top_level
    from dsm_redis.fields import StateMachineField

    assert StateMachineField is top_level


def test_unsaved_object_walks_a_path_saved_by_its_first_step(db_alias):
    obj = SeedModel()
    obj._state.db = db_alias
    assert obj.state_machine.transition_through(TestStates.FAIL) == TestStates.FAIL
    assert obj.pk is not None and fetch(obj).state == TestStates.FAIL


def test_unsaved_object_transition_failed_moves_to_error_state(db_alias):
    obj = SeedModel(state=TestStates.THE_WAY_TO_FAILURE)
    obj._state.db = db_alias
    assert obj.state_machine.transition_to(TestStates.FAILURE_IS_ACTUALLY_AN_OPTION) == TestStates.FAIL
    row = fetch(obj)
    assert (row.state, row.note) == (TestStates.FAIL, "")


def test_transition_through_on_a_stale_instance_already_at_the_target_ends(db_alias, monkeypatch):
    from dsm_redis import protocol

    switch = Switch.objects.using(db_alias).create()
    fetch(switch).machine.turn_on()  # another process moved it; our instance still says "off"
    steps = 0
    step = protocol._step

    def counted(*args, **kwargs):
        nonlocal steps
        steps += 1
        assert steps < 10, "the walk does not end"
        return step(*args, **kwargs)

    monkeypatch.setattr(protocol, "_step", counted)
    assert switch.machine.transition_through("on") == "on"
    assert (switch.state, switch.flips) == ("on", 1)  # the instance now is the row
    assert fetch(switch).flips == 1


@pytest.mark.parametrize("same_instance", [True, False], ids=["same-instance", "another-instance"])
def test_a_side_effect_cannot_take_a_second_edge_of_its_own_machine(db_alias, same_instance):
    account = Account.objects.using(db_alias).create()
    sent = []

    def receiver(sender, instance, state, **kwargs):
        sent.append(state)

    def close_again():
        target = account if same_instance else fetch(account)
        target.machine.close()  # a second edge from "open", while open -> open is in progress

    state_changed.connect(receiver, sender=Account)
    try:
        with pytest.raises(TransitionException, match="in progress"):
            account.machine.deposit(effect=close_again)
    finally:
        state_changed.disconnect(receiver, sender=Account)
    row = fetch(account)
    assert (row.state, row.balance, row.deposits) == ("open", 0, 0)
    assert (account.state, account.balance) == ("open", 0)
    assert sent == []
    account.machine.close()  # and nothing is left behind
    assert fetch(account).state == "closed"


def test_a_side_effect_that_saves_an_unsaved_object_cannot_take_a_second_edge():
    """Claim: a side effect calling its own machine again on the same object (same row, any
    instance) raises TransitionException. For an unsaved object the running transition is recorded
    under id(instance); once the side effect saves the instance, its own machine's next call is
    identified by the lease key and is not refused: two edges from one state commit, and the outer
    write silently undoes the inner edge."""
    account = Account()  # unsaved: no row, no lease (routed to "default")
    seen: list[str] = []

    def save_and_close() -> None:  # e.g. saved to get a pk for a related row, then "finish up"
        account.save()
        try:
            account.machine.close()
            seen.append("second edge taken")
        except TransitionException:
            seen.append("refused")

    account.machine.deposit(amount=5, effect=save_and_close)
    row = Account.objects.get(pk=account.pk)
    assert seen == ["refused"], (seen, row.state)
