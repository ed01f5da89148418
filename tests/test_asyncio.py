"""The asyncio API (``aio.py``, ``alease.py``) against real Redis and PostgreSQL.

Coroutines on one loop race each other, other OS processes and an ASGI server's async view on one
object; nothing is lost, and the unprotected async code loses under the same load. While coroutines
wait for a hot object the loop keeps running; cancelled waiters and holders leave nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

import dsm_redis
from dsm_redis import (
    LockBackendUnavailable,
    LockLost,
    LockTimeout,
    State,
    StateMachine,
    TransitionException,
    aobject_lock,
    object_lock,
    state_changed,
)
from dsm_redis.keys import redis_name
from tests.helpers import WAIT, dsm_options, effects, fresh, key_prefix, run_async, wait_for
from tests.procs import run_workers
from tests.testapp.models import ALIVE, DEAD, Account, AuditLog, Cat, Invoice, Order, OrderStatus, Parcel

pytestmark = pytest.mark.django_db(transaction=True)

T = TypeVar("T")
COROUTINES = 200
PROCESSES = 3
ROUNDS = 10
WORK = 0.003  # seconds between read and write, as in test_races


def queue_keys(obj: Any) -> tuple[str, str, str]:
    from dsm_redis.keys import object_key

    name = redis_name(key_prefix(), object_key(obj))
    return f"lock:{name}", f"{name}:queue", f"{name}:waiters"


def nothing_left(redis: Any, obj: Any) -> bool:
    lock, queue, waiters = queue_keys(obj)
    grants = list(redis.scan_iter(match=f"{queue[: -len(':queue')]}:grant:*"))
    return not redis.exists(lock) and not redis.zcard(queue) and not redis.hlen(waiters) and not grants


async def gather_bounded(*aws: Awaitable[Any]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*aws), WAIT)


# -- races -----------------------------------------------------------------------------------------


def test_unprotected_async_code_loses_updates_under_this_load():
    account = Account.objects.create()

    async def cowboy() -> None:
        row = await Account.objects.aget(pk=account.pk)
        balance = row.balance
        await asyncio.sleep(WORK)  # an external call between the read and the write
        row.balance = balance + 1
        await row.asave()

    async def main() -> None:
        await gather_bounded(*(cowboy() for _ in range(COROUTINES)))

    run_async(main)
    assert fresh(account).balance < COROUTINES, "the unprotected code lost nothing: this load cannot show a race"


def test_coroutines_and_processes_racing_one_object_lose_nothing(redis):
    account = Account.objects.create()
    effect_key = f"effects:{key_prefix()}:{account.pk}"

    async def deposit() -> None:
        row = await Account.objects.aget(pk=account.pk)
        await row.machine.adeposit(amount=1, work=WORK, effect=lambda: redis.incr(effect_key))

    async def main() -> None:
        await gather_bounded(*(deposit() for _ in range(COROUTINES)))

    with ThreadPoolExecutor(1) as pool:  # the processes race the loop from the start
        workers = pool.submit(run_workers, "tests.workers:dsm_deposit", PROCESSES, [account.pk], ROUNDS, WORK)
        run_async(main)
        results = workers.result(timeout=300)
    committed = COROUTINES + sum(r["committed"] for r in results)
    account.refresh_from_db()
    assert account.balance == account.deposits == committed
    assert effects(redis, account.pk) == committed  # each side effect ran exactly once
    assert nothing_left(redis, account)


def test_the_loop_keeps_running_while_coroutines_wait_for_a_hot_object():
    account = Account.objects.create()
    released = 0
    ticks = 0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    async def deposit() -> None:
        nonlocal released
        await account.machine.adeposit(amount=1, work=0.02)  # 20 ms in the worker thread, per holder
        released += 1

    async def main() -> None:
        beat = asyncio.ensure_future(heartbeat())
        await gather_bounded(*(deposit() for _ in range(100)))
        done.set()
        await beat

    run_async(main)
    assert released == 100
    assert fresh(account).balance == 100
    # Each holder's 20 ms of work leaves the loop free for several 1 ms beats: a loop blocked by a
    # waiter (a blocking wait, a held connection) would beat about once per release, or not at all.
    assert ticks > 3 * released, (ticks, released)


# -- the API ------------------------------------------------------------------------------------


def test_edges_walks_and_object_lock_are_awaitable_with_the_same_results():
    order = Order.objects.create()
    received: list[tuple[Any, Any]] = []

    def receiver(sender: Any, instance: Any, state: Any, fencing_token: Any, **kwargs: Any) -> None:
        received.append((state, fencing_token))

    state_changed.connect(receiver, sender=Order, weak=False)
    try:

        async def main() -> Any:
            async with aobject_lock(order) as lease:
                assert await order.machine.apay(amount=5) == OrderStatus.PAID
                assert await order.machine.aship() == OrderStatus.SHIPPED
                assert received == []  # delivered after the release
            return lease.fencing_token

        token = run_async(main)
    finally:
        state_changed.disconnect(receiver, sender=Order)
    assert fresh(order).status == OrderStatus.SHIPPED and fresh(order).paid == 5
    # Both transitions re-entered the block's lease: one token, judged by the database.
    assert set(AuditLog.objects.filter(order_id=order.pk).values_list("token", flat=True)) == {token}
    assert received == [(OrderStatus.PAID, token), (OrderStatus.SHIPPED, token)]

    other = Order.objects.create()
    assert run_async(lambda: other.machine.atransition_to(OrderStatus.CANCELLED)) == OrderStatus.CANCELLED
    assert fresh(other).status == OrderStatus.CANCELLED
    cat = Cat.objects.create()
    assert run_async(lambda: cat.state_machine.atransition_through(DEAD)) == DEAD
    assert fresh(cat).state == DEAD
    unsaved = Cat(age=3)  # no row to lock: inserted by its transition, as the blocking call does
    assert run_async(lambda: unsaved.state_machine.atransition_to(ALIVE)) == ALIVE
    assert fresh(unsaved).state == ALIVE


def test_a_side_effect_driving_another_machine_of_the_object_reenters_the_lease():
    parcel = Parcel.objects.create()

    async def main() -> int:
        async with aobject_lock(parcel, timeout=5) as lease:
            await parcel.state_machine.aship()  # its side effect calls parcel.billing.charge(), blocking
            return lease.fencing_token

    token = run_async(main)
    row = fresh(parcel)
    assert (row.state, row.billing_state, row.charged_with) == ("shipped", "charged", token)


def test_history_records_the_actor_of_the_task_and_the_lease():
    invoice = Invoice.objects.create()

    async def main() -> int:
        with dsm_redis.actor("cron:nightly"):  # a context variable: it follows the step into its thread
            async with aobject_lock(invoice) as lease:
                await invoice.machine.apay(amount=3, card="4242")
                return lease.fencing_token

    token = run_async(main)
    paid = invoice.machine.history().first()
    assert (paid.edge, paid.actor, paid.fencing_token) == ("pay", "cron:nightly", token)


def test_the_same_errors_as_the_blocking_calls(settings):
    order = Order.objects.create()

    async def main() -> None:
        with pytest.raises(TransitionException):
            await order.machine.aship()  # not from NEW
        with pytest.raises(TransitionException):
            await order.machine.atransition_to("nowhere")
        with pytest.raises(TypeError):
            await order.machine.apay()  # amount missing
        with pytest.raises(RuntimeError):
            await order.machine.apay(amount=1)  # the object is in NEW...
            await order.machine.aexplode()  # ...and this crashes: rolled back
        with pytest.raises(AttributeError):
            order.machine.afly

    run_async(main)
    assert fresh(order).status == OrderStatus.PAID  # the crashed edge rolled back
    assert order.status == OrderStatus.PAID and order.paid == 1  # the instance restored too

    # A lease held elsewhere: LockTimeout, as the blocking call raises.
    with object_lock(order):
        dsm_options(settings, ACQUIRE_TIMEOUT=0)
        with pytest.raises(LockTimeout):
            run_async(lambda: order.machine.aship())


def test_a_lease_that_ran_out_refuses_the_commit(settings):
    dsm_options(settings, TTL=0.2, AUTO_RENEW=False)
    account = Account.objects.create()

    async def main() -> None:
        async with aobject_lock(account):
            await asyncio.sleep(0.3)  # past the TTL, not renewed
            await account.machine.adeposit(amount=1)

    with pytest.raises(LockLost):
        run_async(main)
    assert fresh(account).balance == 0


def test_the_lease_is_renewed_on_the_loop(settings):
    dsm_options(settings, TTL=0.3)
    account = Account.objects.create()

    async def main() -> None:
        async with aobject_lock(account) as lease:
            await asyncio.sleep(0.7)  # more than two TTLs: renewed every TTL/3 by its task
            assert lease.lost is None
            await account.machine.adeposit(amount=1)

    run_async(main)
    assert fresh(account).balance == 1


def test_a_lease_taken_away_is_found_lost_by_its_renewal_and_refuses_the_commit(settings, redis):
    dsm_options(settings, TTL=0.3)
    account = Account.objects.create()

    async def main() -> None:
        async with aobject_lock(account) as lease:
            redis.delete(f"lock:{redis_name(key_prefix(), lease.key)}")  # an operator's release, say
            for _ in range(200):  # bounded: the renewal comes every TTL/3
                if lease.lost is not None:
                    break
                await asyncio.sleep(0.05)
            assert lease.lost is not None and "another holder" in lease.lost
            await account.machine.adeposit(amount=1)

    with pytest.raises(LockLost):
        run_async(main)
    assert fresh(account).balance == 0


def test_a_task_started_inside_the_block_contends_for_the_lease(settings):
    account = Account.objects.create()

    async def main() -> None:
        async with aobject_lock(account):
            child = asyncio.ensure_future(account.machine.adeposit(amount=1))
            await asyncio.sleep(0.05)
            assert not child.done()  # queued behind us, not re-entering our lease
        await asyncio.wait_for(child, WAIT)

    run_async(main)
    assert fresh(account).balance == 1


def test_machines_that_cannot_be_awaited_are_refused_when_defined():
    async def pay(self: Any, instance: Any, transition: Any) -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match="async function"):

        class AsyncSideEffect(StateMachine):
            transitions = [State("a") | pay | State("b")]

    def ship(self: Any, instance: Any, transition: Any) -> None:
        pass

    def aship(self: Any, instance: Any, transition: Any) -> None:
        pass

    with pytest.raises(ImproperlyConfigured, match="collide"):

        class Colliding(StateMachine):
            transitions = [State("a") | ship | State("b"), State("b") | aship | State("c")]


def test_redis_unreachable_is_reported_as_by_the_blocking_calls(settings):
    account = Account.objects.create()
    dsm_options(settings, "redis://127.0.0.1:1/0")

    with pytest.raises(LockBackendUnavailable):
        run_async(lambda: account.machine.adeposit(amount=1))
    assert fresh(account).balance == 0


def test_a_backend_without_asyncio_calls_waits_in_threads(settings):
    settings.DSM_REDIS = {**settings.DSM_REDIS, "BACKEND": "dsm_redis.backends.local.LocalLockBackend"}
    account = Account.objects.create()

    async def main() -> None:
        await gather_bounded(*(account.machine.adeposit(amount=1) for _ in range(20)))
        async with aobject_lock(account):
            waiter = asyncio.ensure_future(account.machine.adeposit(amount=1))
            await asyncio.sleep(0.05)
            waiter.cancel()  # its thread goes on waiting; the lease it gets is given back
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with aobject_lock(account, timeout=5):
            pass

    run_async(main)
    assert fresh(account).balance == 20


# -- cancellation ----------------------------------------------------------------------------------


def test_cancelled_waiters_leave_nothing_behind(redis):
    account = Account.objects.create()
    _, queue, waiters = queue_keys(account)

    async def main() -> None:
        async with aobject_lock(account):
            tasks = [asyncio.ensure_future(account.machine.adeposit(amount=1)) for _ in range(20)]
            # One of them queues in Redis; the others wait for it at the loop's gate for the object.
            for _ in range(int(WAIT / 0.01)):
                if redis.zcard(queue) == 1:
                    break
                await asyncio.sleep(0.01)
            assert redis.zcard(queue) == 1 and redis.hlen(waiters) == 1
            assert not any(task.done() for task in tasks)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            assert not redis.zcard(queue) and not redis.hlen(waiters)

    run_async(main)
    assert nothing_left(redis, account)
    assert fresh(account).balance == 0


def test_a_cancelled_holder_releases(redis):
    account = Account.objects.create()
    held = asyncio.Event()

    async def holder() -> None:
        async with aobject_lock(account):
            held.set()
            await asyncio.sleep(WAIT)

    async def main() -> None:
        task = asyncio.ensure_future(holder())
        await asyncio.wait_for(held.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert nothing_left(redis, account)
        async with aobject_lock(account, timeout=0):  # free at once, not after a TTL
            pass

    run_async(main)


def test_a_holder_cancelled_in_its_transaction_releases_once_it_is_over(redis):
    account = Account.objects.create()
    in_side_effect = threading.Event()

    async def main() -> None:
        task = asyncio.ensure_future(account.machine.adeposit(amount=1, work=0.2, effect=in_side_effect.set))
        for _ in range(int(WAIT / 0.01)):
            if in_side_effect.is_set():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The transaction was not cut off in its thread: it committed, and only then was the lease released.
        assert nothing_left(redis, account)

    run_async(main)
    assert fresh(account).balance == 1


# -- under an ASGI server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_async_view_under_uvicorn_races_blocking_workers(redis, tmp_path: Path):
    account = Account.objects.create()
    port = _free_port()
    log = tmp_path / "uvicorn.log"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DSM_TEST_DB_NAME": connections["default"].settings_dict["NAME"],
    }
    connections.close_all()
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.asgi:application", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200
            except OSError:
                return False

        wait_for(up, "uvicorn to serve", [log])

        def hit(_: int) -> str:
            with urllib.request.urlopen(f"{url}/deposit/{account.pk}", timeout=WAIT) as response:
                return response.read().decode()

        requests = 60
        with ThreadPoolExecutor(12) as pool:
            workers = pool.submit(run_workers, "tests.workers:dsm_deposit", PROCESSES, [account.pk], ROUNDS, WORK)
            answers = list(pool.map(hit, range(requests)))
            results = workers.result(timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answers == ["open loop"] * requests, log.read_text()[-4000:]
    committed = requests + sum(r["committed"] for r in results)
    account.refresh_from_db()
    assert account.balance == account.deposits == committed
    assert nothing_left(redis, account)
