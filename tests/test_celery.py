"""Celery: ``locked_task`` and asynchronous transitions, in eager mode and with real prefork workers.

The workers are real ``celery worker --pool=prefork`` processes on the suite's Redis (broker in
database 1) and the test database on PostgreSQL. Nothing here measures time: overlap is judged from
enter/exit numbers drawn from one Redis counter by the task bodies themselves, and every wait is a
poll with a generous timeout that fails with the worker's log.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery.signals import before_task_publish
from django.db import connections, transaction
from django.test import override_settings

from dsm_redis import LockLost, LockTimeout, TransitionException, object_lock
from dsm_redis import tasks as dsm_tasks
from dsm_redis.backends import get_backend
from dsm_redis.celery import locked_task
from dsm_redis.checks import celery_timeout_warnings
from dsm_redis.keys import object_key
from tests.celery_app import QUEUE, app
from tests.testapp import tasks
from tests.testapp.models import Account, AuditLog, Order, OrderStatus, SeedModel, TestStates

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parent.parent
WAIT = 60  # seconds: generous bounds on polls, never asserted as durations


# -- helpers ---------------------------------------------------------------------------------------


def wait_for(check: Callable[[], Any], what: str, logs: list[Path] = (), timeout: float = WAIT) -> Any:
    for _ in range(int(timeout / 0.05)):  # a guard against a hung test, not a speed test
        value = check()
        if value:
            return value
        time.sleep(0.05)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for log in logs if log.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


class Worker:
    """``celery -A tests.celery_app worker --pool=prefork`` in its own session (killable as a group)."""

    def __init__(self, log: Path, name: str, queue: str, concurrency: int = 3) -> None:
        self.log, self.queue = log, queue
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DSM_TEST_DB_NAME": connections["default"].settings_dict["NAME"],
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [
            sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "--pool=prefork",
            f"--concurrency={concurrency}", "--loglevel=INFO", f"--hostname={name}-{uuid.uuid4().hex[:6]}@%h",
            "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        connections.close_all()  # nothing of ours stays open in the database the worker uses
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            tasks.ping.apply_async(queue=queue).get(timeout=WAIT)
        except Exception:
            self.stop()
            raise AssertionError(f"worker did not start:\n{log.read_text()[-4000:]}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as a crashed host would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # warm shutdown (main process only): it stops its pool children
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        try:  # pool children left behind (there should be none)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def worker(django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    w = Worker(tmp_path_factory.mktemp("celery") / "worker.log", "main", QUEUE, concurrency=3)
    yield w
    w.stop()


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


def fresh(obj: Any) -> Any:
    return type(obj)._base_manager.get(pk=obj.pk)


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

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        holding.wait(WAIT)
        with pytest.raises(LockTimeout):
            tasks.unbound_raise.apply((account.pk,), throw=True)
        assert tasks.unbound_skip.apply((account.pk,)).state == "IGNORED"
    finally:
        done.set()
        thread.join()


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
        settings.DSM_REDIS = {**settings.DSM_REDIS, "OPTIONS": {**settings.DSM_REDIS["OPTIONS"], "AUTO_RENEW": False}}
        assert [m.id for m in celery_timeout_warnings(app)] == ["dsm_redis.W101"]  # 20 s > TTL 10 s
        conf.task_time_limit = 5
        assert celery_timeout_warnings(app) == []
        from django.core import checks

        assert "dsm_redis.W101" not in {m.id for m in checks.run_checks()}
    finally:
        conf.task_time_limit, conf.broker_transport_options = saved
