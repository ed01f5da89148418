"""The Celery path under interleavings: diverted walks redelivered, lock errors after the commit,
malformed payloads, reused task ids, a worker killed mid-walk.

Each test states the interleaving it drives and the contract item it checks. The worker-based tests
run a real prefork worker (``tests.celery_worker.Worker`` that also loads
``tests/interleaving_tasks.py``); the payload checks run the transition task in this process
(``run_transition``, the same code a worker runs on a message).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from celery.signals import before_task_publish
from django.db import transaction
from django.db.models.signals import post_save

from dsm_redis import TransitionException, object_lock
from dsm_redis import tasks as dsm_tasks
from dsm_redis.backends import get_backend
from dsm_redis.keys import counter_key, object_key
from dsm_redis.models import AppliedTask
from tests import interleaving_tasks
from tests.celery_app import QUEUE
from tests.celery_worker import Worker, run_transition
from tests.helpers import WAIT, fresh, key_prefix, wait_for
from tests.testapp.models import Account, Order, SeedModel, Switch, TestStates

pytestmark = pytest.mark.django_db(transaction=True)
INCLUDE = ("tests.interleaving_tasks",)  # what the workers here import besides the app's tasks


@pytest.fixture(scope="module")
def interleaving_worker(django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # A worker that also imports tests.interleaving_tasks; it serves its own queue only.
    w = Worker(
        tmp_path_factory.mktemp("interleavings") / "worker.log",
        "interleavings",
        f"{QUEUE}-interleavings",
        concurrency=2,
        include=INCLUDE,
    )
    yield w
    w.stop()


@pytest.fixture
def sent() -> Any:
    """Payloads this process publishes."""
    payloads: list[dict[str, Any]] = []

    def record(sender: Any = None, headers: Any = None, body: Any = None, **kwargs: Any) -> None:
        payloads.append(body[1])

    before_task_publish.connect(record, weak=False)
    yield payloads
    before_task_publish.disconnect(record)


def route_transitions(monkeypatch: pytest.MonkeyPatch, queue: str) -> None:
    """Send asynchronous transitions to ``queue`` (served by this module's workers only)."""
    monkeypatch.setattr(
        dsm_tasks.transition, "apply_async", functools.partial(dsm_tasks.transition.apply_async, queue=queue)
    )


def ran_twice(worker: Any, task_id: str) -> bool:
    return worker.log.read_text().count(f"dsm_redis.transition[{task_id}] succeeded") == 2


# -- 1. a walk diverted by TransitionFailed keeps no record of its diverted step -------------------


def test_a_walk_diverted_by_transition_failed_is_not_applied_again_by_a_late_copy(
    interleaving_worker, sent, monkeypatch
):
    # THE_WAY_TO_FAILURE -[this_transition_will_fail]-> FAILURE_IS_ACTUALLY_AN_OPTION raises
    # TransitionFailed(FAIL): the step is rolled back (its record with it) and the error edge
    # THE_WAY_TO_FAILURE -> FAIL commits, recording nothing for its source state; _walk then records
    # FAIL, the *end* state. A copy delivered once the object is back in THE_WAY_TO_FAILURE finds no
    # record for that state and takes the step (side effect, then error edge) a second time.
    route_transitions(monkeypatch, interleaving_worker.queue)
    obj = SeedModel.objects.create(state=TestStates.THE_WAY_TO_FAILURE)
    result = obj.state_machine.async_transition_through(TestStates.FAILURE_IS_ACTUALLY_AN_OPTION)
    assert result.get(timeout=WAIT) == TestStates.FAIL
    # The object comes back to the state the walk left (the same move as
    # test_celery.test_async_transition_through_resumes_a_walk_and_ignores_late_copies).
    SeedModel.objects.filter(pk=obj.pk).update(state=TestStates.THE_WAY_TO_FAILURE)
    dsm_tasks.transition.apply_async(kwargs=sent[-1], task_id=result.id)  # the broker delivers it again
    wait_for(lambda: ran_twice(interleaving_worker, result.id), "the late copy", [interleaving_worker.log])
    # Contract 1: a late copy is a no-op; the step from THE_WAY_TO_FAILURE was taken by this task id.
    assert fresh(obj).state == TestStates.THE_WAY_TO_FAILURE


def test_a_diverted_walk_is_taken_once_per_task_id_in_process(captured):
    # The same, counted: the object is saved into FAIL once per delivery.
    obj = SeedModel.objects.create(state=TestStates.THE_WAY_TO_FAILURE)
    obj.state_machine.async_transition_through(TestStates.FAILURE_IS_ACTUALLY_AN_OPTION)
    ((task_id, payload),) = captured
    saves: list[int] = []

    def count(sender: Any, instance: Any, **kwargs: Any) -> None:
        saves.append(instance.state)

    post_save.connect(count, sender=SeedModel, weak=False, dispatch_uid="interleaving-saves")
    try:
        assert run_transition(payload, task_id) == TestStates.FAIL
        SeedModel.objects.filter(pk=obj.pk).update(state=TestStates.THE_WAY_TO_FAILURE)
        run_transition(payload, task_id)
    finally:
        post_save.disconnect(sender=SeedModel, dispatch_uid="interleaving-saves")
    assert saves == [TestStates.FAIL]
    assert fresh(obj).state == TestStates.THE_WAY_TO_FAILURE


# -- 2. retry_lock_errors re-runs a body whose transaction committed ------------------------------


def test_retry_lock_errors_does_not_rerun_a_body_whose_transaction_committed(interleaving_worker):
    # The body (atomic=True) deposits and registers an on-commit hook that takes another object's
    # lease. Django runs the hook after the COMMIT, inside `with transaction.atomic()`: its
    # LockTimeout leaves the block after the deposit committed, run_locked takes it for a rolled-back
    # body ("The transaction that raised it committed nothing") and re-sends the task, which
    # deposits again — once per re-send until the other lease is free.
    # Now the hook's LockTimeout is raised to Celery (the task fails), and the body ran once.
    account, other = Account.objects.create(), Account.objects.create()
    with object_lock(other):
        result = interleaving_tasks.deposit_then_notify.apply_async(
            (account.pk, other.pk), queue=interleaving_worker.queue
        )
        with pytest.raises(Exception) as failed:
            result.get(timeout=WAIT)
    assert type(failed.value).__name__ == "LockTimeout", failed.value
    row = fresh(account)
    assert (row.balance, row.deposits) == (1, 1)


# -- 3. payload fields checked only after the lease, or not as TransitionException ---------------


def test_a_malformed_expected_state_is_refused_before_the_lease(captured):
    switch = Switch.objects.create()
    switch.machine.async_transition_through("on")
    ((_, payload),) = captured
    # Contract 3: refused before any lease (TransitionException), no fencing counter left. Today:
    # TypeError("'int' object is not iterable") from inside the body, after the lease and the door.
    with pytest.raises(TransitionException):
        run_transition({**payload, "expected": 5})
    assert not get_backend().client.exists(counter_key(key_prefix(), object_key(switch)))


@pytest.mark.parametrize("kind,target", [("to", ["on"]), ("through", {"state": "on"})])
def test_an_unhashable_target_is_a_clear_refusal(captured, kind, target):
    switch = Switch.objects.create()
    (switch.machine.async_transition_to if kind == "to" else switch.machine.async_transition_through)("on")
    ((_, payload),) = captured
    with pytest.raises(TransitionException):  # today: TypeError: unhashable type
        run_transition({**payload, "target": target})


def test_as_task_in_an_edges_kwargs_is_refused_not_relayed(captured):
    # {"as_task": true} in the kwargs of an "edge" payload reaches _call_edge: the worker commits the
    # applied record for this task id, applies nothing, and enqueues a second task (a new id) that
    # applies the edge. The task reports the old state as its result.
    order = Order.objects.create()
    order.machine.pay(as_task=True, amount=5)
    ((task_id, payload),) = captured
    with pytest.raises(TransitionException):
        run_transition({**payload, "kwargs": {"amount": 5, "as_task": True}}, task_id)
    assert len(captured) == 1 and not AppliedTask.objects.filter(task_id=task_id).exists()


# -- 4. applied records are keyed by task id alone ----------------------------------------------


def test_a_task_id_reused_for_another_object_is_not_taken_for_a_duplicate(captured):
    # dsm_redis.transition.apply_async(kwargs=..., task_id=...) with an id already applied to another
    # object: the record (task id only; object_key is stored but not compared) makes it a silent,
    # successful no-op.
    a, b = Account.objects.create(), Account.objects.create()
    a.machine.deposit(as_task=True, amount=1)
    b.machine.deposit(as_task=True, amount=1)
    (id_a, payload_a), (_, payload_b) = captured
    assert run_transition(payload_a, id_a) == "open"
    with pytest.raises(TransitionException, match="already applied to another object"):
        run_transition(payload_b, id_a)  # a clear refusal, not a silent no-op
    assert (fresh(a).balance, fresh(b).balance) == (1, 0)


# -- 5. the payload is validated at the call but serialised at the commit -------------------------


def test_arguments_mutated_after_the_call_are_sent_unchecked(sent, monkeypatch):
    # _check_json runs when you call; the message is built from the same objects when the
    # transaction commits. A value changed in between is sent without the check.
    monkeypatch.setattr(dsm_tasks.transition, "apply_async", lambda kwargs, **options: sent.append(kwargs))
    order = Order.objects.create()
    amount = [5]
    with transaction.atomic():
        order.machine.pay(as_task=True, amount=amount)
        amount.append((1, 2))  # a tuple: refused at the call ("would not survive JSON unchanged")
    assert sent[-1]["kwargs"] == {"amount": [5]}


# -- tried and held: a worker SIGKILLed mid-walk ---------------------------------------------------


def test_a_walk_cut_by_sigkill_resumes_on_redelivery_and_takes_each_step_once(tmp_path, redis, monkeypatch):
    # START -> THE_WAY_TO_FAILURE -> FAIL (two steps, two transactions). The worker is SIGKILLed
    # inside the second step (after its pre_save, before its COMMIT): acks_late redelivers the
    # message once the visibility timeout has passed; it waits (contention retries) for the dead
    # holder's lease to run out, then resumes from THE_WAY_TO_FAILURE.
    from django.conf import settings

    obj = SeedModel.objects.create()
    base = f"interleavings:{settings.DSM_REDIS['OPTIONS']['KEY_PREFIX']}:{obj.pk}"
    redis.set(f"{base}:stall", TestStates.FAIL)
    queue = f"{QUEUE}-interleavings-kill"
    route_transitions(monkeypatch, queue)
    victim = Worker(tmp_path / "victim.log", "victim", queue, concurrency=2, include=INCLUDE)
    try:
        result = obj.state_machine.async_transition_through(TestStates.FAIL)
        wait_for(lambda: redis.get(f"{base}:stalled"), "the second step to stall", [victim.log])
    finally:
        victim.kill()
    assert fresh(obj).state == TestStates.THE_WAY_TO_FAILURE  # the first step committed, alone
    survivor = Worker(tmp_path / "survivor.log", "survivor", queue, concurrency=2, include=INCLUDE)
    try:
        assert result.get(timeout=WAIT) == TestStates.FAIL
    finally:
        survivor.stop()
    saves = [int(s.split(b":")[0]) for s in redis.lrange(f"{base}:saves", 0, -1)]
    # By workers: into THE_WAY_TO_FAILURE once; into FAIL twice (the killed attempt, never committed,
    # and the resumed one).
    assert saves == [TestStates.THE_WAY_TO_FAILURE, TestStates.FAIL, TestStates.FAIL]
    assert fresh(obj).state == TestStates.FAIL
