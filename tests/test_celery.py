"""Celery: ``locked_task`` and asynchronous transitions, in eager mode and with real prefork workers.

The workers are real ``celery worker --pool=prefork`` processes on the suite's Redis (broker in
database 1) and the test database on PostgreSQL. Nothing here measures time: overlap is judged from
enter/exit numbers drawn from one Redis counter by the task bodies themselves, and every wait is a
poll with a generous timeout that fails with the worker's log.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery.signals import before_task_publish
from django.db import OperationalError, connection, connections, transaction
from django.db.models.signals import pre_save
from django.test import override_settings

from dsm_redis import LockError, LockLost, LockTimeout, TransitionException, fence, object_lock
from dsm_redis import tasks as dsm_tasks
from dsm_redis.backends import get_backend
from dsm_redis.celery import locked_task
from dsm_redis.checks import celery_timeout_warnings
from dsm_redis.keys import counter_key, object_key, redis_name
from dsm_redis.models import FencingMark
from dsm_redis.tools.servers import RedisServer
from tests.celery_app import QUEUE, app
from tests.celery_worker import Worker, run_transition
from tests.helpers import WAIT, dsm_options, fresh, key_prefix, pg_connect, wait_for
from tests.procs import in_background
from tests.testapp import tasks
from tests.testapp.models import (
    Account,
    AuditLog,
    FencedAccount,
    Order,
    OrderStatus,
    SeedModel,
    Switch,
    TestStates,
)

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def published() -> Any:
    """Messages this process publishes: [(task id, task name, kwargs)]."""
    sent: list[tuple[str, str, dict[str, Any]]] = []

    def record(sender: Any = None, headers: Any = None, body: Any = None, **kwargs: Any) -> None:
        sent.append((headers["id"], headers["task"], body[1]))

    before_task_publish.connect(record, weak=False)
    yield sent
    before_task_publish.disconnect(record)


@pytest.fixture
def eager() -> Any:
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    yield
    app.conf.update(task_always_eager=False, task_eager_propagates=False)


def records(redis: Any, name: str) -> list[Any]:
    return [json.loads(x) for x in redis.lrange(tasks.key(name), 0, -1)]


def overlapping(intervals: list[list[Any]]) -> list[tuple[Any, Any]]:
    return [(a, b) for a, b in itertools.pairwise(sorted(intervals)) if b[0] < a[1]]


# -- packaging -------------------------------------------------------------------------------------


def test_dsm_redis_imports_without_celery_and_async_calls_say_how_to_install_it():
    code = """
import sys
sys.modules["celery"] = None  # as if it were not installed
import django
django.setup()
import dsm_redis, dsm_redis.tasks
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from tests.testapp.models import Order
order = Order(pk=1)
order._state.adding = False
for call in (lambda: order.machine.async_transition_to("paid"), lambda: order.machine.pay(as_task=True, amount=1)):
    try:
        call()
    except ImproperlyConfigured as exc:
        print("ImproperlyConfigured:", exc)
try:
    import dsm_redis.celery
except ImportError as exc:
    print("ImportError:", exc)
print("W1xx:", [m.id for m in checks.run_checks() if m.id.startswith("dsm_redis.W1")])
"""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert (
        lines[:2] == ["ImproperlyConfigured: Asynchronous transitions need Celery: pip install 'dsm_redis[celery]'"] * 2
    )
    assert lines[2] == "ImportError: dsm_redis.celery needs Celery: pip install 'dsm_redis[celery]'"
    assert lines[3] == "W1xx: []"


def test_the_transition_task_is_found_by_autodiscovery():
    app.loader.import_default_modules()  # what a worker does at start-up
    assert "dsm_redis.transition" in app.tasks
    assert app.tasks["dsm_redis.transition"].acks_late


# -- decorator and call-time errors ----------------------------------------------------------------


def test_decorator_misuse_is_reported_where_it_is_written():
    with pytest.raises(ValueError, match="on_contention"):
        locked_task("testapp.Account", pk_arg="account_id", on_contention="wait")
    with pytest.raises(TypeError, match="no parameter 'pk'"):
        locked_task("testapp.Account")(lambda account_id: None)
    with pytest.raises(TypeError, match="below @shared_task"):
        locked_task("testapp.Account", pk_arg="account_id")(tasks.ping._get_current_object())
    with pytest.raises(TypeError, match="unexpected keyword argument 'lease'"):
        # The injected lease is not part of the task's signature: Celery refuses it when sending.
        tasks.locked_deposit.apply_async((1,), {"tag": "x", "lease": 1})


def test_async_calls_are_checked_before_anything_is_sent(published):
    order = Order.objects.create()
    bad = {
        "a datetime": {"amount": order.updated},
        "a tuple": {"amount": (1, 2)},
        "a dict with int keys": {"amount": {1: 2}},
        "NaN": {"amount": float("nan")},
    }
    for kwargs in bad.values():
        with pytest.raises(TypeError, match="'amount'"):
            order.machine.pay(as_task=True, **kwargs)
    with pytest.raises(TypeError, match="keyword arguments only"):
        order.machine.pay(5, as_task=True)
    with pytest.raises(TypeError, match="amount"):
        order.machine.pay(as_task=True)  # missing argument
    with pytest.raises(TransitionException, match="cannot call edge 'ship'"):
        order.machine.ship(as_task=True)  # not from "new"
    with pytest.raises(TransitionException, match="no such edge"):
        order.machine.async_transition_to(OrderStatus.SHIPPED)
    with pytest.raises(TransitionException, match="has no state"):
        order.machine.async_transition_through("lost")
    with pytest.raises(AttributeError):
        order.machine.teleport(as_task=True)
    with pytest.raises(TransitionException, match="not saved"):
        Order().machine.pay(as_task=True, amount=1)
    assert published == []


# -- eager mode ------------------------------------------------------------------------------------


def test_eager_tasks_reenter_the_lease_their_caller_holds(eager):
    account = Account.objects.create()
    with object_lock(account) as lease:  # a task run eagerly under its object's lease: no self-contention
        assert tasks.locked_deposit.delay(account.pk, tag=uuid.uuid4().hex, work=0).get() == lease.fencing_token
        assert tasks.unbound_raise.delay(account_id=account.pk).get() == lease.fencing_token
        assert tasks.unbound_skip.delay(account.pk).get() == "ran"
        calls = tasks.CountingTask.calls
        # (throw=False: with task_eager_propagates Celery raises an eager self.retry() instead of running it)
        assert tasks.retry_budget.apply((account.pk,), throw=False).get()["token"] == lease.fencing_token
        assert tasks.CountingTask.calls > calls  # the custom base class's __call__ ran
    assert fresh(account).balance == 1


def test_eager_contention_raises_or_skips():
    account = Account.objects.create()
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:  # another thread is another holder: the lease is re-entrant per thread
        with object_lock(account):
            holding.set()
            done.wait(WAIT)

    join = in_background(holder)  # closes the holder thread's database connection (object_lock's door)
    try:
        holding.wait(WAIT)
        with pytest.raises(LockTimeout):
            tasks.unbound_raise.apply((account.pk,), throw=True)
        assert tasks.unbound_skip.apply((account.pk,)).state == "IGNORED"
    finally:
        done.set()
        join()


def test_a_locked_task_that_outlives_its_lease_commits_nothing():
    account = Account.objects.create()
    raw = {**app_settings(), "OPTIONS": {**app_settings()["OPTIONS"], "TTL": 0.3, "AUTO_RENEW": False}}
    with override_settings(DSM_REDIS=raw):
        with pytest.raises(LockLost):
            tasks.write_then_lose_lease.apply((account.pk,), throw=True)
    assert fresh(account).balance == 0


def app_settings() -> dict[str, Any]:
    from django.conf import settings

    return settings.DSM_REDIS


def test_eager_async_transition_happens_on_commit_and_never_after_a_rollback(eager):
    order = Order.objects.create()
    with transaction.atomic():
        order.machine.pay(as_task=True, amount=5)
        assert fresh(order).status == OrderStatus.NEW  # not before the commit
    assert fresh(order).status == OrderStatus.PAID and fresh(order).paid == 5  # run by the commit

    other = Order.objects.create()
    with pytest.raises(RuntimeError), transaction.atomic():
        other.machine.async_transition_to(OrderStatus.CANCELLED)
        raise RuntimeError("roll back")
    assert fresh(other).status == OrderStatus.NEW


def test_async_transition_through_resumes_a_walk_and_ignores_late_copies(monkeypatch):
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(dsm_tasks.transition, "apply_async", lambda kwargs, **options: sent.append(kwargs))
    obj = SeedModel.objects.create()
    obj.state_machine.async_transition_through(TestStates.FAIL)  # START -> THE_WAY_TO_FAILURE -> FAIL
    (payload,) = sent
    assert payload["expected"] == [TestStates.START, TestStates.THE_WAY_TO_FAILURE]
    run = dsm_tasks.transition._get_current_object()

    SeedModel.objects.filter(pk=obj.pk).update(state=TestStates.THE_WAY_TO_FAILURE)  # first step done, then lost
    assert run.apply(kwargs=payload, throw=True).get() == TestStates.FAIL  # the redelivery finishes the walk
    assert run.apply(kwargs=payload, throw=True).get() == TestStates.FAIL  # a late copy: no-op
    SeedModel.objects.filter(pk=obj.pk).update(state=TestStates.MIDDLE)
    assert run.apply(kwargs=payload, throw=True).get() == TestStates.MIDDLE  # moved elsewhere: no-op


# -- real workers ----------------------------------------------------------------------------------


def test_many_tasks_on_one_object_run_one_at_a_time(worker, redis):
    control, locked = Account.objects.create(), Account.objects.create()
    tag = uuid.uuid4().hex
    # The control: the same body without the lease does overlap on this worker (else this test
    # could not see an overlap at all).
    results = [tasks.cowboy_deposit.delay(control.pk, tag=f"{tag}-cowboy") for _ in range(6)]
    for r in results:
        r.get(timeout=WAIT)
    assert overlapping(records(redis, f"intervals:{tag}-cowboy"))

    n = 24
    # By name too (as beat and send_task do): the lease is taken where the task runs.
    results = [
        app.send_task(tasks.locked_deposit.name, (locked.pk,), {"tag": tag})
        if i % 4 == 0
        else tasks.locked_deposit.delay(locked.pk, tag=tag)
        for i in range(n)
    ]
    tokens = [r.get(timeout=WAIT) for r in results]
    intervals = records(redis, f"intervals:{tag}")
    assert len(intervals) == n  # every body ran, once
    assert overlapping(intervals) == []  # and no two overlapped
    assert len({pid for _, _, pid, _, _ in intervals}) > 1  # in several pool processes
    by_entry = [token for _, _, _, token, _ in sorted(intervals)]
    assert by_entry == sorted(by_entry) and len(set(tokens)) == n  # one lease each, tokens increasing
    account = fresh(locked)
    assert account.balance == account.deposits == n


def test_contention_retries_do_not_consume_max_retries(worker, redis):
    account = Account.objects.create()
    with object_lock(account) as held:
        result = tasks.retry_budget.delay(account.pk)  # max_retries=1, and it retries itself once
        unbound = tasks.unbound_retry.delay(account.pk)  # not bound: retried all the same
        for r in (result, unbound):
            contended = tasks.key(f"contended:{r.id}")
            wait_for(lambda key=contended: int(redis.get(key) or 0) >= 3, "three contention retries", [worker.log])
    outcome = result.get(timeout=WAIT)
    assert outcome["retries"] == 1  # its own retry only: the contention retries were not counted
    assert outcome["token"] > held.fencing_token
    assert unbound.get(timeout=WAIT) > held.fencing_token


def test_contention_in_a_worker_can_raise_or_skip(worker, redis):
    account = Account.objects.create()
    with object_lock(account):
        raising = tasks.unbound_raise.delay(account.pk)
        with pytest.raises(LockTimeout):  # pickled/serialised across the result backend
            raising.get(timeout=WAIT)
        skipped = tasks.unbound_skip.delay(account.pk)
        ended = tasks.key(f"ended:{skipped.id}")
        assert wait_for(lambda: redis.lrange(ended, 0, -1), "the skipped task", [worker.log]) == [b"IGNORED"]


def test_async_transition_is_sent_on_commit_and_runs_once(worker, published):
    order = Order.objects.create()
    with transaction.atomic():
        result = order.machine.pay(as_task=True, amount=5)
        assert published == []  # nothing leaves before the commit
    assert [(i, name) for i, name, _ in published] == [(result.id, "dsm_redis.transition")]
    assert result.get(timeout=WAIT) == OrderStatus.PAID
    row = fresh(order)
    assert (row.status, row.paid) == (OrderStatus.PAID, 5)

    # A duplicate of the same message (a redelivery, a second send) is a logged no-op.
    duplicate = dsm_tasks.transition.apply_async(kwargs=published[0][2])
    assert duplicate.get(timeout=WAIT) == OrderStatus.PAID
    assert AuditLog.objects.filter(order_id=order.pk, note="paid").count() == 1

    # A late request: asked from a stale view of the object ("new"), it finds it "paid": a no-op.
    late = order.machine.async_transition_through(OrderStatus.CANCELLED)  # autocommit: sent at once
    assert published[-1][2]["expected"] == [OrderStatus.NEW]
    assert late.get(timeout=WAIT) == OrderStatus.PAID
    assert fresh(order).machine.async_transition_to(OrderStatus.CANCELLED).get(timeout=WAIT) == OrderStatus.CANCELLED


def test_redelivered_self_loop_edge_is_applied_once(worker, published):
    account = Account.objects.create()
    result = account.machine.deposit(as_task=True, amount=3)  # open -> open: the state cannot tell
    assert result.get(timeout=WAIT) == "open"
    # The broker delivers the same message (same task id) again, after the commit. (Its result
    # key already holds the first run's result: wait for the worker to log the second run's end.)
    dsm_tasks.transition.apply_async(kwargs=published[-1][2], task_id=result.id)
    done = f"dsm_redis.transition[{result.id}] succeeded"
    wait_for(lambda: worker.log.read_text().count(done) == 2, "the redelivered copy", [worker.log])
    row = fresh(account)
    assert (row.balance, row.deposits) == (3, 1)


def test_async_transition_in_a_rolled_back_block_is_never_sent(worker, published):
    order = Order.objects.create()
    with pytest.raises(RuntimeError), transaction.atomic():
        order.machine.pay(as_task=True, amount=5)
        order.machine.async_transition_to(OrderStatus.CANCELLED)
        raise RuntimeError("roll back")
    assert published == []
    tasks.ping.delay().get(timeout=WAIT)  # the worker has drained what was before it in the queue
    assert fresh(order).status == OrderStatus.NEW


def test_sigkilled_worker_redelivers_and_never_runs_beside_a_live_holder(tmp_path, redis):
    queue = f"{QUEUE}-kill"
    account = Account.objects.create()
    key = object_key(account)
    victim = Worker(tmp_path / "victim.log", "victim", queue, concurrency=2)
    try:
        result = tasks.slow_first.apply_async((account.pk,), queue=queue)
        (first,) = wait_for(lambda: records(redis, f"entered:{account.pk}"), "the first run", [victim.log])
        assert get_backend().describe(key)["owner"] is not None  # the victim holds the lease
    finally:
        victim.kill()  # mid-task, before its ack (acks_late) and before its commit
    logs = [victim.log, tmp_path / "survivor.log"]

    # A live holder takes the lease once the dead one's TTL has run out, and keeps it while a new
    # worker gets the redelivered message: the redelivery must wait for it.
    with object_lock(account, timeout=WAIT) as held:
        held_from = redis.incr(tasks.key("seq"))
        survivor = Worker(logs[1], "survivor", queue, concurrency=2)
        try:
            contended = tasks.key(f"contended:{result.id}")
            wait_for(lambda: redis.get(contended), "the redelivered task to find the lease held", logs)
            held_until = redis.incr(tasks.key("seq"))
        except BaseException:
            survivor.stop()
            raise
    try:
        token = result.get(timeout=WAIT)
    finally:
        survivor.stop()

    entries = records(redis, f"entered:{account.pk}")
    assert len(entries) == 2  # the killed run and exactly one more
    second = entries[1]
    assert first[1] != second[1]  # another process
    assert first[2] < held.fencing_token < second[2] == token
    assert second[0] > held_until > held_from  # it entered after the live holder let go
    row = fresh(account)
    assert (row.balance, row.deposits) == (1, 1)  # the killed run's write never committed


# -- system checks ---------------------------------------------------------------------------------


def test_celery_timeout_checks(settings):
    conf = app.conf
    saved = conf.task_time_limit, dict(conf.broker_transport_options)
    try:
        conf.task_time_limit = 20
        assert [m.id for m in celery_timeout_warnings(app)] == ["dsm_redis.W102"]  # 6 s visibility < 20 s
        conf.broker_transport_options = {**saved[1], "visibility_timeout": 3600}
        assert celery_timeout_warnings(app) == []  # renewed leases cover any time limit
        dsm_options(settings, AUTO_RENEW=False)
        assert [m.id for m in celery_timeout_warnings(app)] == ["dsm_redis.W101"]  # 20 s > TTL 10 s
        conf.task_time_limit = 5
        assert celery_timeout_warnings(app) == []
        from django.core import checks

        assert "dsm_redis.W101" not in {m.id for m in checks.run_checks()}
    finally:
        conf.task_time_limit, conf.broker_transport_options = saved


# -- at most once per task id, a walk included (issue 9, finding 4) -------------------------------


def test_a_walk_resumes_after_a_crash_mid_walk_and_never_applies_twice_per_task_id(captured):
    obj = SeedModel.objects.create()
    obj.state_machine.async_transition_through(TestStates.FAIL)  # START -> THE_WAY_TO_FAILURE -> FAIL
    ((task_id, payload),) = captured

    def die_on_the_second_step(sender: Any, instance: Any, **kwargs: Any) -> None:
        if instance.state == TestStates.FAIL:
            raise RuntimeError("the worker died mid-walk")

    pre_save.connect(die_on_the_second_step, sender=SeedModel)
    try:
        with pytest.raises(RuntimeError):
            run_transition(payload, task_id)
    finally:
        pre_save.disconnect(die_on_the_second_step, sender=SeedModel)
    assert fresh(obj).state == TestStates.THE_WAY_TO_FAILURE  # the first step committed
    assert run_transition(payload, task_id) == TestStates.FAIL  # the redelivery resumes from there

    # The object comes back to where the walk started: the same message, delivered again, must
    # not walk a second time (its state alone cannot tell it from a new request).
    SeedModel.objects.filter(pk=obj.pk).update(state=TestStates.START)
    assert run_transition(payload, task_id) == TestStates.START
    assert fresh(obj).state == TestStates.START
    assert run_transition(payload) == TestStates.FAIL  # another task id is another request


def test_a_walk_redelivered_after_the_object_cycled_back_is_a_no_op(worker, published):
    switch = Switch.objects.create()
    result = switch.machine.async_transition_through("on")
    assert result.get(timeout=WAIT) == "on"
    fresh(switch).machine.turn_off()  # off again, as when the walk was asked for
    # The broker delivers the same message (same task id) again.
    dsm_tasks.transition.apply_async(kwargs=published[-1][2], task_id=result.id)
    done = f"dsm_redis.transition[{result.id}] succeeded"
    wait_for(lambda: worker.log.read_text().count(done) == 2, "the redelivered copy", [worker.log])
    row = fresh(switch)
    assert (row.state, row.flips) == ("off", 2)


# -- the applied-task insert is bounded (issue 9, finding 5) -------------------------------------


@pytest.mark.parametrize("kind", ["edge", "through"])
def test_a_copy_in_flight_makes_the_applied_task_insert_wait_only_until_row_lock_timeout(kind, settings, captured):
    dsm_options(settings, ROW_LOCK_TIMEOUT=0.2)
    if kind == "edge":
        obj: Any = Account.objects.create()
        obj.machine.deposit(as_task=True, amount=1)
    else:
        obj = Switch.objects.create()
        obj.machine.async_transition_through("on")
    ((task_id, payload),) = captured
    # What the other copy of this message inserts: the task id, or for a walk the record of its
    # step from "off" (the task id and a short hash of the JSON source state).
    step = hashlib.sha256(json.dumps("off").encode()).hexdigest()[:16]
    record = task_id if kind == "edge" else f"{task_id}:{step}"
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '10s'")  # an unbounded wait: a failure, not a hang
    try:
        with pg_connect() as other:
            # Another copy of the same message is in flight (its lease ran out, ours is new): its
            # record is inserted and not committed yet.
            other.execute("BEGIN")
            other.execute(
                "INSERT INTO dsm_redis_applied_task (task_id, object_key, applied_at) VALUES (%s, %s, now())",
                [record, object_key(obj)],
            )
            with pytest.raises(LockTimeout):
                run_transition(payload, task_id)
            other.execute("ROLLBACK")  # that copy failed: ours is the one to apply
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = 0")
    run_transition(payload, task_id)
    row = fresh(obj)
    assert (row.balance, row.deposits) == (1, 1) if kind == "edge" else (row.state, row.flips) == ("on", 1)


# -- locked_task and the fencing barrier (issue 17) ---------------------------------------------


# The test database on SQLite is in memory with a shared cache: a conflicting write fails at once
# with "database table is locked" (an OperationalError) instead of waiting.
REFUSED = (LockError, OperationalError)


def expire_key(key: str) -> None:
    """What a TTL running out does: the lease key disappears from Redis."""
    get_backend().client.delete(f"lock:{redis_name(key_prefix(), key)}")


@pytest.mark.django_db(databases=["default", "sqlite"], transaction=True)
@pytest.mark.parametrize("model", [Account, FencedAccount], ids=["mark-table", "own-column"])
def test_a_locked_task_without_atomic_is_not_overtaken_by_an_older_holders_late_commit(
    model, db_alias, settings, monkeypatch
):
    # The older holder's lease is judged by its own clock only: its renewer would otherwise notice
    # the key gone and make it give up, which is not the interleaving under test.
    dsm_options(settings, AUTO_RENEW=False)
    obj = model.objects.using(db_alias).create()
    inside, release = threading.Event(), threading.Event()
    outcome: dict[str, str] = {}

    def stalled() -> None:  # S's side effect: S has locked the row and judged its token
        inside.set()
        release.wait(WAIT)

    def older_holder() -> None:
        try:
            model.objects.using(db_alias).get(pk=obj.pk).machine.deposit(amount=1, effect=stalled)
            outcome["S"] = "committed"
        except REFUSED as exc:
            outcome["S"] = type(exc).__name__
        finally:
            connections.close_all()

    real_barrier = fence.barrier

    def door(*args: Any) -> None:
        release.set()  # S goes on to its COMMIT while the new holder is at the door
        real_barrier(*args)

    monkeypatch.setattr(fence, "barrier", door)

    @locked_task(model, pk_arg="pk", atomic=False, using=db_alias)
    def body(pk: int, lease: Any) -> None:
        row = model.objects.using(db_alias).get(pk=pk)  # read first (what atomic=False allows)...
        release.set()  # ...then S commits (without a barrier: after that read)...
        s.join(WAIT)
        with transaction.atomic(using=db_alias):  # ...then write, fenced, as the README says
            lease.fence(db_alias)
            row.balance += 10
            row.save(using=db_alias)

    s = threading.Thread(target=older_holder)
    s.start()
    try:
        assert inside.wait(WAIT)
        expire_key(object_key(obj))  # S's lease runs out while S is inside its transaction
        body(pk=obj.pk)  # called directly: a new holder with a newer token
        outcome["body"] = "committed"
    except REFUSED as exc:
        outcome["body"] = type(exc).__name__
    finally:
        release.set()
        s.join(WAIT)
    s_ok, body_ok = outcome["S"] == "committed", outcome["body"] == "committed"
    row = fresh(obj)
    # Both changes, or only those of whoever was not refused: never one write overwriting the other.
    assert (row.balance, row.deposits) == (s_ok * 1 + body_ok * 10, s_ok * 1), outcome


def test_a_locked_task_reanchors_a_fencing_counter_redis_lost():
    account = Account.objects.create()
    for _ in range(3):
        account.machine.deposit()
    mark = FencingMark.objects.get(pk=object_key(account)).token
    get_backend().client.delete(counter_key(key_prefix(), object_key(account)))  # Redis restarted empty
    # The next token is 1, below the mark. Nothing has been read under the lease yet: the body's
    # transaction re-anchors it instead of refusing every task for this object from now on.
    token = locked_task(Account, pk_arg="pk")(lambda pk, lease: lease.fencing_token)(pk=account.pk)
    assert token > mark


# -- every lock error is retried for asynchronous transitions (issue 20, item 3) -----------------


@pytest.fixture
def lease_redis(settings: Any) -> Any:
    """A Redis for leases only (as in test_faults.py); the env points a worker at it too."""
    server = RedisServer().start()
    dsm_options(settings, server.url)
    try:
        yield server, {"DSM_TEST_LOCK_REDIS_URL": server.url}
    finally:
        server.stop()


def test_a_burst_of_async_transitions_survives_a_restart_of_the_lease_redis(lease_redis, tmp_path, monkeypatch, redis):
    server, env = lease_redis  # the broker stays up
    queue = f"{QUEUE}-lock-redis"
    monkeypatch.setattr(
        dsm_tasks.transition, "apply_async", functools.partial(dsm_tasks.transition.apply_async, queue=queue)
    )
    accounts = [Account.objects.create() for _ in range(3)]
    worker = Worker(tmp_path / "lock-redis.log", "lockredis", queue, concurrency=3, env=env)
    try:
        for account in accounts:  # leases, counters and marks exist before the restart
            assert account.machine.deposit(as_task=True, amount=1).get(timeout=WAIT) == "open"
        server.stop()
        burst = [accounts[i % 3].machine.deposit(as_task=True, amount=1) for i in range(24)]
        # Every task of the burst has run at least once while Redis was down.
        wait_for(
            lambda: all(redis.exists(tasks.key(f"ended:{r.id}")) for r in burst), "the burst to meet Redis down",
            [worker.log],
        )  # fmt: skip
        server.start()  # same port, empty: no lease, no counter
        assert [r.get(timeout=WAIT) for r in burst] == ["open"] * 24
    finally:
        worker.stop()
    for account in accounts:
        row = fresh(account)
        assert (row.balance, row.deposits) == (9, 9)  # none lost, none applied twice


# -- the worker trusts no payload field (issue 18, items 2 and 4) --------------------------------


def test_the_worker_checks_every_payload_field_before_taking_a_lease(captured):
    order = Order.objects.create()
    order.machine.pay(as_task=True, amount=5)
    ((_, good),) = captured
    bad = {
        "an unknown kind": {**good, "kind": "teleport"},
        "an unknown model": {**good, "model": "testapp.nothing"},
        "a field that is not a state machine": {**good, "field": "paid"},
        "a property": {**good, "field": "pk"},
        "a method of the bound machine": {**good, "target": "transition_to"},
        "a dunder": {**good, "target": "__init__"},
        "an unknown state": {**good, "kind": "to", "target": "lost"},
        "an unknown database": {**good, "using": "elsewhere"},
        "not a primary key": {**good, "pk": "one"},
    }
    for what, payload in bad.items():
        with pytest.raises(TransitionException):
            run_transition(payload)
            pytest.fail(f"{what} was accepted")
    client = get_backend().client
    assert not client.exists(counter_key(key_prefix(), object_key(order)))  # no lease was ever taken
    row = fresh(order)
    assert (row.status, row.paid) == (OrderStatus.NEW, 0)
    assert not AuditLog.objects.filter(order_id=order.pk).exists()

    # A primary key with no row: nothing to do, and no fencing counter left behind in Redis.
    missing = order.pk + 10_000
    assert run_transition({**good, "pk": missing}) is None
    assert not client.exists(counter_key(key_prefix(), object_key(Order, missing)))
    assert run_transition(good) == OrderStatus.PAID  # the payload as sent is accepted
