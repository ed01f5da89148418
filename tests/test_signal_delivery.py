"""Signals of committed transitions whose delivery was interrupted, and transaction modes a lease
cannot serve: each test states the interleaving it drives, against the real servers."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection, transaction

from dsm_redis import state_changed
from dsm_redis.backends import get_backend
from dsm_redis.keys import object_key
from tests.testapp.models import ALIVE, DEAD, AuditLog, Cat

pytestmark = pytest.mark.django_db(transaction=True)


class Abort(BaseException):
    """An asynchronous exception: a worker's time limit, gevent's Timeout, KeyboardInterrupt."""


def owner_of(obj: Any) -> Any:
    return get_backend().describe(object_key(obj))["owner"]


# -- 1. orphaned signals are delivered inside whatever transaction the next hold() runs in


def test_an_orphaned_signal_is_not_delivered_inside_an_unrelated_transaction_that_rolls_back():
    """Item 3 (``_local.left`` / ``_deliver_orphans``).

    1. one commit transitions x twice (ALIVE, DEAD: two callbacks on x's lease); the ALIVE
       receiver raises a BaseException: the DEAD delivery goes to ``_local.left`` (it committed);
    2. the thread's next lease is taken inside a caller's ``transaction.atomic()`` for another cat y;
       ``hold()`` starts with ``_deliver_orphans``:
       x's DEAD receiver runs *inside* that open transaction and writes its audit row there;
    3. the caller's transaction rolls back (for a reason unrelated to x): the receiver's row for
       x's committed transition is gone, and the signal counts as delivered.

    Outside this path a receiver never runs inside a transaction that can still roll back: it runs
    from the commit's hooks, in autocommit.
    """
    x, y = Cat.objects.create(), Cat.objects.create()
    ran: list[bool] = []  # connection.in_atomic_block each time x's DEAD receiver ran

    def receiver(sender: Any, instance: Any, state: Any, **kwargs: Any) -> None:
        if instance.pk == x.pk and state == ALIVE:
            raise Abort
        if instance.pk == x.pk and state == DEAD:
            ran.append(connection.in_atomic_block)
            AuditLog.objects.create(order_id=x.pk, note=f"in atomic: {connection.in_atomic_block}")

    state_changed.connect(receiver, sender=Cat, weak=False)
    try:
        with pytest.raises(Abort):
            with transaction.atomic():
                x.state_machine.survive()
                x.state_machine.transition_to(DEAD)
        assert Cat.objects.get(pk=x.pk).state == DEAD  # committed
        with pytest.raises(ZeroDivisionError):
            with transaction.atomic():
                y.state_machine.survive()
                1 / 0
        y.state_machine.survive()  # one more lease in autocommit: whatever is still waiting runs here
    finally:
        state_changed.disconnect(receiver, sender=Cat)
    assert ran == [False], ran  # run once, outside any transaction that can still roll back
    assert list(AuditLog.objects.filter(order_id=x.pk).values_list("note", flat=True)) == ["in atomic: False"]


# -- manual transaction management is refused, as Django's on_commit refuses it


def test_manual_transaction_management_is_refused_and_changes_nothing():
    """With ``transaction.set_autocommit(False)`` a transition's ``atomic()`` is a savepoint of a
    transaction no atomic block knows of: the lease would be released while the uncommitted write
    holds the row, and the row-lock bound would outlive the transition. Refused up front."""
    from django.db.transaction import TransactionManagementError

    from dsm_redis import object_lock

    cat = Cat.objects.create()
    transaction.set_autocommit(False)
    try:
        with pytest.raises(TransactionManagementError, match="manual transaction management"):
            cat.state_machine.survive()
        with pytest.raises(TransactionManagementError, match="manual transaction management"):
            with object_lock(cat):
                pass
        transaction.rollback()
    finally:
        transaction.set_autocommit(True)
    assert Cat.objects.get(pk=cat.pk).state != ALIVE
    assert owner_of(cat) is None


# -- 4. a BaseException in a receiver strands signals queued in signals._deliveries, not _local.left


def test_a_signal_queued_behind_an_aborted_receiver_is_delivered_by_the_next_hold():
    """Item 3's promise ("the callbacks not run yet go to this thread's next hold()") covers the
    lease's own list only. Signals sent *while receivers run* wait in ``signals._deliveries.queue``:

    1. x's ALIVE receiver transitions y (autocommit): y's lease is released and y's signal is sent
       via ``deliver`` — which, a delivery being under way, only queues it;
    2. the same receiver then raises a BaseException: ``_drain`` unwinds, leaving y's signal in
       the per-thread queue; ``_local.left`` stays empty;
    3. the thread's next ``hold()`` (``object_lock`` on z) delivers nothing: y's committed DEAD is
       stranded until some later transition on this thread sends a signal (never, for a thread
       that only reads from now on).
    """
    from dsm_redis import object_lock

    x, y, z = Cat.objects.create(), Cat.objects.create(state=ALIVE), Cat.objects.create()
    seen: list[Any] = []

    def receiver(sender: Any, instance: Any, state: Any, **kwargs: Any) -> None:
        seen.append((instance.pk, state))
        if instance.pk == x.pk and state == ALIVE:
            Cat.objects.get(pk=y.pk).state_machine.transition_to(DEAD)
            raise Abort

    state_changed.connect(receiver, sender=Cat, weak=False)
    try:
        with pytest.raises(Abort):
            x.state_machine.survive()
        assert Cat.objects.get(pk=y.pk).state == DEAD  # committed
        with object_lock(z):
            pass
    finally:
        state_changed.disconnect(receiver, sender=Cat)
        from dsm_redis import signals

        signals._deliveries.queue.clear()  # do not leak the stranded signal into other tests
    assert (y.pk, DEAD) in seen, seen
