"""deus-state-machina's other public names, deprecated, on the real servers: each warns, and does
what the seed's did with dsm_redis's protection."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection, transaction

from dsm_redis import Lease, LockTimeout, TransitionException, object_lock
from tests.celery_app import app
from tests.helpers import dsm_options
from tests.procs import contend_from_another_thread
from tests.testapp.models import ALIVE, DEAD, UNKNOWN, Cat, Order, OrderStatus

pytestmark = pytest.mark.django_db(transaction=True)


def fresh(obj: Any) -> Any:
    return type(obj).objects.get(pk=obj.pk)


@pytest.fixture
def eager() -> Any:
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    yield
    app.conf.update(task_always_eager=False, task_eager_propagates=False)


def test_lock_object_locks_the_row_under_the_lease_in_a_transaction():
    from dsm_redis.utils import lock_object

    cat = Cat.objects.create()
    with pytest.warns(DeprecationWarning, match="lock_object"), lock_object(cat) as lease:
        assert isinstance(lease, Lease) and lease.fencing_token is not None
        assert connection.in_atomic_block
        assert contend_from_another_thread(cat) == "timeout"  # another holder is excluded
        cat.age = 7
        cat.save(update_fields=["age"])
        cat.state_machine.survive()  # re-enters the lease
    assert (fresh(cat).age, fresh(cat).state) == (7, ALIVE)
    assert contend_from_another_thread(cat) == "acquired"


def test_lock_object_rolls_back_with_its_block():
    from dsm_redis.utils import lock_object

    cat = Cat.objects.create()
    with pytest.warns(DeprecationWarning), pytest.raises(RuntimeError), lock_object(cat):
        cat.age = 9
        cat.save(update_fields=["age"])
        raise RuntimeError("roll back")
    assert fresh(cat).age == 1


def test_thread_lock_object_of_a_saved_object_is_its_lease_and_reenters():
    from dsm_redis.utils import thread_lock_object

    cat = Cat.objects.create()
    with pytest.warns(DeprecationWarning, match="thread_lock_object"), thread_lock_object(cat):
        with thread_lock_object(cat):  # re-entrant, as the seed's RLock
            assert contend_from_another_thread(cat) == "timeout"
            cat.state_machine.survive()
    assert fresh(cat).state == ALIVE
    assert contend_from_another_thread(cat) == "acquired"


def test_thread_lock_object_of_an_unsaved_object_is_a_reentrant_thread_lock():
    from dsm_redis.utils import thread_lock_object

    cat = Cat()
    other_entered = threading.Event()

    def other() -> None:
        with thread_lock_object(cat):
            other_entered.set()

    with pytest.warns(DeprecationWarning), thread_lock_object(cat), thread_lock_object(cat):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.2)
        assert not other_entered.is_set()  # excluded while this thread holds it
    thread.join(30)
    assert other_entered.is_set()


def test_the_machine_behind_the_bound_field_takes_the_object():
    cat = Cat.objects.create()
    with pytest.warns(DeprecationWarning, match="state_machine"):
        machine = cat.state_machine.state_machine
    assert (machine.field_name, machine.state_field_name) == ("state_machine", "state")
    assert machine.get_current_state(cat) == UNKNOWN
    assert {t.name for t in machine.get_possible_transitions(cat)} == {"survive", "rip"}
    assert machine.pretty_state_name(cat, DEAD) == "Dead" and machine.pretty_state_name(cat, 99) == ""
    assert machine.transition_to(cat, ALIVE) == ALIVE
    assert fresh(cat).state == ALIVE and cat.can_meow
    with pytest.raises(TransitionException):
        machine.transition_to(cat, ALIVE)
    other = Cat.objects.create()
    machine.transition_through(other, DEAD)
    assert fresh(other).state == DEAD


def test_the_machine_behind_the_bound_field_is_protected(settings):
    cat = Cat.objects.create()
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with object_lock(Cat.objects.get(pk=cat.pk)):
            holding.set()
            release.wait(30)
        connection.close()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(30)
        dsm_options(settings, ACQUIRE_TIMEOUT=0)
        with pytest.warns(DeprecationWarning), pytest.raises(LockTimeout):
            cat.state_machine.state_machine.transition_to(cat, ALIVE)
    finally:
        release.set()
        thread.join(30)
    assert fresh(cat).state == UNKNOWN


def test_schedule_transition_sends_the_transition_on_commit(eager):
    from dsm_redis import TransitionTask  # the seed's package exported it too

    order = Order.objects.create()
    with pytest.warns(DeprecationWarning, match="schedule_transition"), transaction.atomic():
        TransitionTask.schedule_transition(order, "machine", OrderStatus.PAID, amount=5)
        assert fresh(order).status == OrderStatus.NEW  # not before the commit
    assert (fresh(order).status, fresh(order).paid) == (OrderStatus.PAID, 5)

    (ship,) = [t for t in fresh(order).machine.get_possible_transitions() if t.name == "ship"]
    with pytest.warns(DeprecationWarning):
        TransitionTask.schedule_transition(fresh(order), "machine", ship)  # an edge, as the seed allowed
    assert fresh(order).status == OrderStatus.SHIPPED

    other = Order.objects.create()
    with pytest.warns(DeprecationWarning):
        TransitionTask.schedule_transition(other, "machine", OrderStatus.CANCELLED, transition_through=True)
    assert fresh(other).status == OrderStatus.CANCELLED


def test_the_seed_tasks_module_path_carries_over():
    from dsm_redis import compat, tasks

    assert tasks.TransitionTask is compat.TransitionTask  # deus_state_machina.tasks, renamed


def test_what_does_not_carry_over_is_refused():
    from dsm_redis.compat import TransitionTask

    order = Order.objects.create()
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="keyword arguments only"):
        TransitionTask.schedule_transition(order, "machine", OrderStatus.PAID, False, 5)
    with pytest.raises(TypeError, match="cannot be instantiated"):
        TransitionTask()
    assert fresh(order).status == OrderStatus.NEW


def test_the_warnings_point_at_the_callers_line():
    from dsm_redis.utils import lock_object

    cat = Cat.objects.create()
    with pytest.warns(DeprecationWarning) as caught, lock_object(cat):
        pass
    with pytest.warns(DeprecationWarning) as caught_too:
        cat.state_machine.state_machine
    assert [w.filename for w in [*caught, *caught_too]] == [__file__, __file__]


def test_the_seed_package_level_names_resolve():
    import dsm_redis
    from dsm_redis import compat

    assert dsm_redis.lock_object is compat.lock_object
    assert dsm_redis.thread_lock_object is compat.thread_lock_object
    with pytest.raises(AttributeError):
        dsm_redis.no_such_name
