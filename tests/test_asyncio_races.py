"""Interleavings of the asyncio path that the happy-path tests do not reach, forced deterministically.

Each test pins one window — a cancellation landing between a grant's delivery and the waiter's
resumption, a transition cancelled while its database step waits for Django's worker thread, a
release queued behind the threads it would free — and asserts the contract of ``alease.py`` /
``aio.py`` there: nothing is left held, nothing commits for a caller that was told it was
cancelled, nothing waits on what it is blocking.
"""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from dsm_redis import LockTimeout, aobject_lock
from dsm_redis.backends import Grant
from dsm_redis.backends.local import LocalLockBackend
from dsm_redis.keys import object_key, redis_name
from tests.helpers import WAIT, dsm_options, fresh, key_prefix, run_async
from tests.testapp.models import Account

pytestmark = pytest.mark.django_db(transaction=True)

LOCAL = "dsm_redis.backends.local.LocalLockBackend"


async def until(check: Any, what: str) -> None:
    """Poll ``check()`` on the loop (bounded); the bound only guards against a hung test."""
    for _ in range(int(WAIT / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class CancelledOnDelivery(LocalLockBackend):
    """A backend without asyncio calls whose acquire, when armed, has the waiting task cancelled in
    the loop iteration right after its grant is delivered, before the task resumes: where a
    ``timeout`` or a client's disconnect lands when it expires as the lease arrives."""

    armed: tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = None

    def acquire(self, key: str, *, ttl: float, timeout: float | None) -> Grant:
        grant = super().acquire(key, ttl=ttl, timeout=timeout)
        armed, type(self).armed = type(self).armed, None
        if armed is not None:
            loop, task = armed
            # Runs before the grant's delivery (queued next) and queues the cancel after it.
            loop.call_soon_threadsafe(loop.call_soon, task.cancel)
        return grant


def test_a_waiter_cancelled_as_its_grant_arrives_from_a_waiting_thread_gives_it_back(settings):
    settings.DSM_REDIS = {**settings.DSM_REDIS, "BACKEND": f"{__name__}.CancelledOnDelivery"}
    # A grant left held by nobody would expire at its TTL, ten times past the poll's bound below.
    dsm_options(settings, TTL=10 * WAIT)
    account = Account.objects.create()

    async def free() -> bool:
        try:
            async with aobject_lock(account, timeout=0):
                return True
        except LockTimeout:
            return False

    async def main() -> None:
        async with aobject_lock(account):
            waiter = asyncio.ensure_future(account.machine.adeposit(amount=1))
            await asyncio.sleep(0.05)  # waiting in its thread
            CancelledOnDelivery.armed = (asyncio.get_running_loop(), waiter)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, WAIT)
        # The grant reached the cancelled waiter: it must be handed back (by a thread of its own,
        # so not necessarily yet), not left held by nobody until its TTL.
        for _ in range(int(WAIT / 0.01)):
            if await free():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the cancelled waiter's grant was not handed back")

    run_async(main)
    assert fresh(account).balance == 0


def test_a_transition_cancelled_before_its_database_step_began_does_not_commit(redis):
    account = Account.objects.create()
    lock = f"lock:{redis_name(key_prefix(), object_key(account))}"
    release_thread = threading.Event()

    async def main() -> None:
        # Django's thread-sensitive worker thread is busy with another call: the step waits for it.
        busy = asyncio.ensure_future(sync_to_async(release_thread.wait)(WAIT))
        task = asyncio.ensure_future(account.machine.adeposit(amount=1))
        await until(lambda: redis.exists(lock), "the transition to hold its lease")
        await asyncio.sleep(0.05)  # its step is queued for the thread
        task.cancel()  # the caller gives up (asyncio.timeout, a client gone) before the step ran
        await asyncio.sleep(0.05)  # the cancellation reaches the task while the thread is still busy
        release_thread.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        await busy
        assert not redis.exists(lock)  # released

    run_async(main)
    # Told "cancelled", the caller retries or reports failure: the deposit must not have been made.
    assert fresh(account).balance == 0


def test_a_backend_without_asyncio_calls_releases_past_threads_busy_waiting_for_the_lease(settings):
    settings.DSM_REDIS = {**settings.DSM_REDIS, "BACKEND": LOCAL}
    dsm_options(settings, ACQUIRE_TIMEOUT=2)
    account = Account.objects.create()
    blocking = 2

    def blocking_deposit() -> None:
        try:
            account.machine.deposit(amount=1)  # waits in this thread for the async holder's lease
        finally:
            connections.close_all()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        # The loop's default executor, as small as its threads are busy: an application's
        # asyncio.to_thread() calls of blocking transitions on the object.
        with ThreadPoolExecutor(blocking) as executor:
            loop.set_default_executor(executor)
            async with aobject_lock(account):
                waiting = [loop.run_in_executor(None, blocking_deposit) for _ in range(blocking)]
                await asyncio.sleep(0.1)
            # The release must not queue behind those threads (they wait for it): they get the lease.
            results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), WAIT)
        assert not any(isinstance(r, LockTimeout) for r in results), results

    run_async(main)
    assert fresh(account).balance == blocking


def test_a_caller_with_a_timeout_never_waits_unbounded_at_the_gate_a_released_waiter_is_about_to_pass(
    redis, monkeypatch
):
    from dsm_redis.backends.redis import _AsyncRedisLeases

    account = Account.objects.create()
    queue = f"{redis_name(key_prefix(), object_key(account))}:queue"
    held, go = asyncio.Event(), asyncio.Event()
    late: list[asyncio.Task[Any]] = []
    arm: list[Any] = []
    original = _AsyncRedisLeases._acquire

    async def acquire_then_hook(self: Any, key: str, **kwargs: Any) -> Grant:
        grant = await original(self, key, **kwargs)
        while arm:
            arm.pop()()  # runs before this call passes the gate on (``acquire``'s finally)
        return grant

    monkeypatch.setattr(_AsyncRedisLeases, "_acquire", acquire_then_hook)

    async def no_wait() -> None:
        async with aobject_lock(account, timeout=0):
            pass

    async def no_wait_at_all() -> None:
        async with aobject_lock(account, timeout=WAIT):
            pass

    async def holder() -> None:
        async with aobject_lock(account):
            held.set()
            await go.wait()

    async def middle() -> Any:
        async with aobject_lock(account):
            # A caller that must not wait arrived as the gate was handed to the next coroutine.
            done, _ = await asyncio.wait(late, timeout=3)  # a bound against a hung test only
            return done and late[0].exception()

    async def main() -> Any:
        first = asyncio.ensure_future(holder())
        await asyncio.wait_for(held.wait(), WAIT)
        arm.append(lambda: late.append(asyncio.ensure_future(no_wait())))
        second = asyncio.ensure_future(middle())
        await until(lambda: redis.zcard(queue) == 1, "the second holder to queue in Redis")
        third = asyncio.ensure_future(no_wait_at_all())  # waits at the loop's gate
        await asyncio.sleep(0.05)
        go.set()
        outcome = await asyncio.wait_for(second, WAIT)
        await asyncio.wait_for(asyncio.gather(first, third), WAIT)
        await asyncio.wait(late, timeout=WAIT)
        return outcome

    outcome = run_async(main)
    assert isinstance(outcome, LockTimeout), outcome


def test_an_async_generator_left_inside_its_block_releases_when_the_loop_closes_it(redis):
    account = Account.objects.create()
    lock = f"lock:{redis_name(key_prefix(), object_key(account))}"

    async def rows() -> Any:
        async with aobject_lock(account):
            yield 1
            yield 2

    async def main() -> None:
        async for _ in rows():
            break  # the generator is dropped inside its block: the loop closes it in a task of its own
        for _ in range(300):  # bounded: 3 s, against a lease kept (and renewed) while this task lives
            if not redis.exists(lock):
                break
            await asyncio.sleep(0.01)
        assert not redis.exists(lock), "the lease outlived its block"
        async with aobject_lock(account, timeout=0):
            pass

    run_async(main)


def test_cancellations_landing_at_every_await_leave_no_lease_and_no_queue_entry(redis):
    """Holders and transitions on a few objects, cancelled (some twice) after random short delays:
    in the gate, the acquire script, the wait for a wake-up, the barrier, the step, the release."""
    accounts = [Account.objects.create() for _ in range(4)]
    committed = 0

    async def deposit(account: Account) -> None:
        nonlocal committed
        await account.machine.adeposit(amount=1)
        committed += 1

    async def hold(account: Account, pause: float) -> None:
        async with aobject_lock(account):
            await asyncio.sleep(pause)

    async def main() -> None:
        rnd = random.Random(7)
        for _ in range(8):
            tasks = []
            for _ in range(30):
                account = rnd.choice(accounts)
                work = deposit(account) if rnd.random() < 0.3 else hold(account, rnd.random() * 0.004)
                tasks.append(asyncio.ensure_future(work))
            for task in tasks:
                await asyncio.sleep(rnd.random() * 0.002)
                if rnd.random() < 0.6:
                    task.cancel()
                    if rnd.random() < 0.3:
                        await asyncio.sleep(0)
                        task.cancel()  # cancelled again while it cleans up
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)
            failed = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
            assert not failed, failed

    run_async(main)
    for account in accounts:
        name = redis_name(key_prefix(), object_key(account))
        # Wake-up lists expire with the hand-over grace by design; the lease and the queue must be gone.
        assert not redis.exists(f"lock:{name}", f"{name}:queue", f"{name}:waiters")
    # Every call that returned committed; a call cancelled during its step may have committed too.
    assert sum(fresh(a).balance for a in accounts) >= committed
