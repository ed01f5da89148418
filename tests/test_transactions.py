"""Transitions inside the caller's own ``transaction.atomic()`` (``ATOMIC_REQUESTS``, services).

The lease is released when the caller's transaction commits, not when the transition's savepoint
is released: otherwise another holder takes the lease, then waits on our row locks while our next
call waits on the lease — a deadlock PostgreSQL cannot see.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connection, connections, transaction

from dsm_redis import TransitionException, object_lock, state_changed
from dsm_redis.backends import get_backend
from dsm_redis.keys import object_key
from dsm_redis.lease import after_release, held_lease
from tests.helpers import dsm_options, killing_when_alive
from tests.procs import contend_from_another_thread
from tests.testapp.models import ALIVE, DEAD, Cat

pytestmark = pytest.mark.django_db(transaction=True)


def blocked_on_a_lease() -> bool:
    """True once some client of the lease Redis is waiting in BLPOP (a waiter for a lease)."""
    return any(c.get("cmd") == "blpop" for c in get_backend().client.client_list())


def survive_in_a_rolled_back_transaction(cat: Cat) -> None:
    with pytest.raises(ZeroDivisionError):
        with transaction.atomic():
            cat.state_machine.survive()
            1 / 0
    cat.state = 0  # the instance as the rolled-back row has it


def test_two_transitions_in_one_request_transaction_keep_the_lease(settings):
    dsm_options(settings, ACQUIRE_TIMEOUT=20)
    cat = Cat.objects.create()
    rival: dict[str, Any] = {}

    def other_request() -> None:
        try:
            Cat.objects.get(pk=cat.pk).state_machine.survive()
            rival["result"] = "survived"
        except TransitionException:
            rival["result"] = "refused"
        finally:
            connections.close_all()

    thread = threading.Thread(target=other_request)
    with transaction.atomic():  # ATOMIC_REQUESTS = True, say
        cat.state_machine.survive()
        thread.start()
        for _ in range(1000):  # the other request is now waiting for *our* lease
            if blocked_on_a_lease():
                break
            time.sleep(0.01)
        assert held_lease(object_key(cat)) is not None  # parked until our commit
        cat.state_machine.transition_to(DEAD)  # re-enters the parked lease: no wait, no deadlock
    thread.join()
    assert rival["result"] == "refused"  # it ran after our commit, against the Dead row
    assert Cat.objects.get(pk=cat.pk).state == DEAD
    assert get_backend().describe(object_key(cat))["owner"] is None


def test_signals_fire_at_the_callers_commit_after_release():
    seen: list[Any] = []

    def receiver(sender: Any, instance: Any, state: Any, **kwargs: Any) -> None:
        seen.append((state, get_backend().describe(object_key(instance))["owner"]))

    state_changed.connect(receiver, sender=Cat)
    try:
        cat = Cat.objects.create()
        with transaction.atomic():
            cat.state_machine.survive()
            assert seen == []
        assert seen == [(ALIVE, None)]  # after the commit, and the lease was already released
    finally:
        state_changed.disconnect(receiver, sender=Cat)


def test_a_rolled_back_callers_transaction_releases_the_parked_lease(settings):
    dsm_options(settings, TTL=0.6)
    cat = Cat.objects.create()
    with pytest.raises(ZeroDivisionError):
        with transaction.atomic():
            cat.state_machine.survive()
            lease = held_lease(object_key(cat))
            1 / 0
    assert Cat.objects.get(pk=cat.pk).state == 0
    for _ in range(500):  # Django has no rollback hook: the renewer notices at its next round
        if lease.released:
            break
        time.sleep(0.01)
    assert lease.released  # released by us, not merely expired
    cat.state = 0
    assert cat.state_machine.survive() == ALIVE  # and the object is usable again


def test_same_thread_reuses_a_parked_lease_after_rollback():
    cat = Cat.objects.create()
    survive_in_a_rolled_back_transaction(cat)
    with object_lock(cat, timeout=0):  # ours again at once, not a wait for our own lease
        assert cat.state_machine.survive() == ALIVE


def test_callers_lock_timeout_is_restored():
    cat = Cat.objects.create()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = '61s'")
        cat.state_machine.survive()
        with connection.cursor() as cursor:
            cursor.execute("SHOW lock_timeout")
            assert cursor.fetchone()[0] == "61s"


def test_after_a_rollback_the_next_transaction_takes_the_lease_over_and_releases_it():
    cat = Cat.objects.create()
    survive_in_a_rolled_back_transaction(cat)
    with transaction.atomic():  # the next request in this thread: a new transaction
        cat.state_machine.survive()
    assert contend_from_another_thread(cat) == "acquired"  # released at that commit, not kept


def test_a_parked_lease_that_was_lost_is_dropped_not_reused(settings):
    dsm_options(settings, TTL=0.3, AUTO_RENEW=False)
    cat = Cat.objects.create()
    survive_in_a_rolled_back_transaction(cat)  # parked; nothing renews it
    time.sleep(0.4)  # its TTL runs out while parked
    with transaction.atomic():  # the next request: it must take a fresh lease, not the dead one
        assert cat.state_machine.survive() == ALIVE
    assert Cat.objects.get(pk=cat.pk).state == ALIVE


def test_a_hook_failing_after_the_commit_leaves_the_instance_as_committed():
    from tests.testapp.models import Account

    account = Account.objects.create()
    # The side effect queues an on-commit hook that fails (e.g. a broker down when a task is sent):
    # the exception comes out of the COMMIT, after the transition has committed.
    with pytest.raises(ZeroDivisionError):
        account.machine.deposit(amount=5, effect=lambda: transaction.on_commit(lambda: 1 / 0))
    assert (account.balance, account.deposits) == (5, 1)  # not "restored" to what it no longer is
    row = Account.objects.get(pk=account.pk)
    assert (row.balance, row.deposits) == (5, 1)


def record_signals(seen: list[Any]) -> Any:
    """Connect a state_changed receiver appending (pk, state, fencing_token); returns it to disconnect."""

    def receiver(sender: Any, instance: Any, state: Any, fencing_token: Any = "missing", **kwargs: Any) -> None:
        seen.append((instance.pk, state, fencing_token))

    state_changed.connect(receiver, weak=False)
    return receiver


def test_a_failing_user_hook_registered_first_does_not_keep_the_lease_nor_drop_the_signal():
    cat = Cat.objects.create()
    seen: list[Any] = []
    receiver = record_signals(seen)
    try:
        with pytest.raises(ZeroDivisionError):
            with transaction.atomic():
                transaction.on_commit(lambda: 1 / 0)  # registered before the transition's hooks
                cat.state_machine.survive()
    finally:
        state_changed.disconnect(receiver)
    assert Cat.objects.get(pk=cat.pk).state == ALIVE  # committed
    assert contend_from_another_thread(cat) == "acquired"  # released at the commit, not at the TTL
    assert [(pk, state) for pk, state, _ in seen] == [(cat.pk, ALIVE)]


def test_a_transition_queued_on_commit_by_a_side_effect_signals_after_the_one_that_queued_it():
    from tests.testapp.models import Account

    account = Account.objects.create()
    seen: list[Any] = []
    receiver = record_signals(seen)
    try:
        account.machine.deposit(effect=lambda: transaction.on_commit(lambda: account.machine.close()))
    finally:
        state_changed.disconnect(receiver)
    assert Account.objects.get(pk=account.pk).state == "closed"
    assert [state for _, state, _ in seen] == ["open", "closed"]  # commit order: the row is closed
    tokens = {token for _, _, token in seen}
    assert len(tokens) == 1 and isinstance(tokens.pop(), int)  # both under the one lease


def test_a_receiver_transitioning_another_object_does_not_reorder_that_objects_signals():
    x, y = Cat.objects.create(), Cat.objects.create()
    seen: list[Any] = []
    receiver = record_signals(seen)

    kill_y = killing_when_alive(x, y)
    state_changed.connect(kill_y, sender=Cat, weak=False)
    try:
        with transaction.atomic():
            x.state_machine.survive()
            y.state_machine.survive()
    finally:
        state_changed.disconnect(kill_y, sender=Cat)
        state_changed.disconnect(receiver)
    assert Cat.objects.get(pk=y.pk).state == DEAD
    assert [state for pk, state, _ in seen if pk == y.pk] == [ALIVE, DEAD]  # commit order
    y_tokens = [token for pk, _, token in seen if pk == y.pk]
    # Never lower for a later commit (equal when one lease committed both, as here: the receiver
    # re-entered y's lease before its release ran), so a consumer elsewhere can drop older ones.
    assert y_tokens[0] <= y_tokens[1]


def test_an_unsaved_objects_signal_has_no_fencing_token():
    seen: list[Any] = []
    receiver = record_signals(seen)
    try:
        Cat().state_machine.survive()
    finally:
        state_changed.disconnect(receiver)
    assert [(state, token) for _, state, token in seen] == [(ALIVE, None)]


@pytest.mark.django_db(databases=["default", "sqlite"], transaction=True)
def test_a_lease_written_under_on_two_databases_is_held_until_both_transactions_end():
    cat = Cat.objects.create()
    with transaction.atomic(using="sqlite"):
        with transaction.atomic(using="default"):
            with object_lock(cat) as lease:
                lease.fence("sqlite")
                lease.fence("default")
        # default committed; the sqlite transaction that also wrote under the lease is still open
        assert contend_from_another_thread(cat) == "timeout"
    assert contend_from_another_thread(cat) == "acquired"  # released when the last one ended


@pytest.mark.django_db(databases=["default", "sqlite"], transaction=True)
def test_a_committed_signal_waiting_on_a_lease_whose_other_transaction_rolled_back_is_delivered(settings):
    dsm_options(settings, TTL=0.6)
    cat = Cat.objects.create()
    seen: list[Any] = []
    receiver = record_signals(seen)
    try:
        with pytest.raises(ZeroDivisionError):
            with transaction.atomic(using="sqlite"):
                with object_lock(cat) as lease:
                    lease.fence("sqlite")
                    cat.state_machine.survive()  # commits on default at once (autocommit there)
                assert seen == []  # the lease is parked on sqlite: receivers wait for its release
                1 / 0
        for _ in range(500):  # the renewer notices the rollback at its next round and releases it
            if lease.released:
                break
            time.sleep(0.01)
        assert lease.released
        assert Cat.objects.get(pk=cat.pk).state == ALIVE
        cat.state_machine.transition_to(DEAD)  # this thread's next touch of the object
    finally:
        state_changed.disconnect(receiver)
    # The committed ALIVE is not lost with the released lease, and arrives before DEAD.
    assert [state for _, state, _ in seen] == [ALIVE, DEAD]


def test_a_stale_parked_lease_dropped_by_a_take_over_delivers_its_committed_signals(settings):
    dsm_options(settings, TTL=0.3, AUTO_RENEW=False)
    cat = Cat.objects.create()
    ran: list[str] = []
    with pytest.raises(ZeroDivisionError):
        with transaction.atomic():
            cat.state_machine.survive()
            after_release(object_key(cat), lambda: ran.append("after release"))
            1 / 0
    time.sleep(0.4)  # its TTL runs out while parked; nothing renews it
    cat.state = 0
    assert cat.state_machine.survive() == ALIVE  # a fresh lease; the stale one is dropped
    assert ran == ["after release"]  # run deliberately when the lease was dropped, not lost


@pytest.mark.django_db(databases=["default", "sqlite"], transaction=True)
def test_a_parked_lease_re_entered_for_another_database_waits_for_that_transaction_too():
    cat = Cat.objects.create()
    with transaction.atomic(using="sqlite"):
        with transaction.atomic(using="default"):
            cat.state_machine.survive()  # parked on default
            with object_lock(cat) as lease:  # re-entered: parked for this very transaction
                lease.fence("sqlite")
        assert contend_from_another_thread(cat) == "timeout"  # sqlite's transaction is still open
    assert contend_from_another_thread(cat) == "acquired"
