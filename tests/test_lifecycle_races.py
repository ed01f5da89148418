"""Interleavings of the lease's lifecycle (``lifecycle.py``), its renewer (``renewer.py``) and the
fence's judgement (``fence.py``) that the split of the safety core must keep safe: the renewer's
weak hold on a lease, fork while another thread is inside a lease's lock, re-anchoring. Each test
states the interleaving it drives and the contract item at stake; they run against the real Redis
and PostgreSQL the suite starts.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest
from django.db import transaction

from dsm_redis.backends import get_backend
from dsm_redis.keys import object_key
from dsm_redis.lease import held_lease
from tests.helpers import dsm_options, wait_for
from tests.testapp.models import Cat

pytestmark = pytest.mark.django_db(transaction=True)


def owner_of(obj: Any) -> Any:
    return get_backend().describe(object_key(obj))["owner"]


# -- 1. the renewer's weak hold: a lease nothing else holds is no longer renewed


def test_a_lease_parked_by_a_thread_that_died_in_its_transaction_expires_by_its_ttl(settings):
    """renewer.py: the renewer holds a lease only weakly, so an abandoned lease expires by its TTL.

    1. a thread transitions a cat inside a transaction it never ends (it dies inside it): the lease
       is parked, held by that thread's registry and by the hook in that thread's connection;
    2. the thread is gone: its registry and its connection (with the open transaction) are garbage;
    3. the renewer, sleeping until the next tick, must not hold the lease it ticked last: if it
       does, it renews the lease forever and the object can never be taken again.
    """
    dsm_options(settings, TTL=0.6)
    cat = Cat.objects.create()
    leases: list[weakref.ref[Any]] = []

    def die_inside_a_transaction() -> None:
        transaction.atomic().__enter__()  # never exited: the thread ends inside its transaction
        Cat.objects.get(pk=cat.pk).state_machine.survive()
        lease = held_lease(object_key(cat))
        assert lease is not None
        leases.append(weakref.ref(lease))
        granted = lease.valid_until
        wait_for(lambda: lease.valid_until > granted, "a renewal")  # the renewer has ticked it

    worker = threading.Thread(target=die_inside_a_transaction)
    worker.start()
    worker.join()
    assert leases, "the worker did not park its lease"
    try:

        def collected() -> bool:
            gc.collect()
            return leases[0]() is None

        wait_for(collected, "the abandoned lease to be collected", timeout=10)
        wait_for(lambda: owner_of(cat) is None, "the abandoned lease to expire by its TTL", timeout=10)
    finally:
        lease = leases[0]()
        if lease is not None:  # the bug: close the dead thread's transaction, or the flush waits on its row lock
            for connection, _hooks in list(lease.record.parked.values()):
                connection.connection.close()
            del lease


# -- 2. fork while another thread is inside a lease's lock


def test_a_child_forked_while_the_renewer_is_inside_a_lease_lock_can_still_check_it(settings):
    """lease.py contract 5 (fork) with lifecycle.py's per-lease lock.

    1. the parent holds a lease (``object_lock``); the renewer thread is inside that lease's lock
       (a tick: simulated by a thread that holds it) at the moment another thread forks;
    2. the child inherits the lock *held*, by a thread that does not exist in the child;
    3. in the child, the lease runs out (no renewer there) and the child's ``lease.check()`` must
       raise ``LockLost`` — not wait forever on the lock (the module lock it replaced was reset
       after a fork).
    """
    import os
    import select
    import signal
    import time

    from dsm_redis import LockLost, object_lock

    dsm_options(settings, TTL=0.6)
    cat = Cat.objects.create()
    with object_lock(cat) as lease:
        inside, leave = threading.Event(), threading.Event()

        def renewer_inside_the_lock() -> None:
            with lease._lock:
                inside.set()
                leave.wait()

        renewer_like = threading.Thread(target=renewer_inside_the_lock)
        renewer_like.start()
        inside.wait()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never touches the inherited database connection
            code = 0
            try:
                while lease.remaining > 0:  # nothing renews it in the child
                    time.sleep(0.05)
                try:
                    lease.check()
                except LockLost:
                    code = 1
            except BaseException:
                code = 2
            os.write(write, bytes([code]))
            os._exit(0)
        leave.set()
        renewer_like.join()
        os.close(write)
        answered = select.select([read], [], [], 10)[0]  # bounds a hung child only
        if not answered:
            os.kill(pid, signal.SIGKILL)
        code = os.read(read, 1) if answered else b""
        os.waitpid(pid, 0)
        os.close(read)
        assert code == bytes([1]), "the child hung on the lease's lock" if not code else code


# -- 3. an interrupt while the holder's thread releases: a lease marked released is never renewed


def test_a_lease_marked_released_is_not_renewed_when_an_interrupt_skips_its_give_back(settings):
    """lifecycle.py: release is given back once; renewer.py: ``tick`` returns ``None`` when no more
    ticks are needed.

    1. the outermost block ends; ``Lease.finish`` marks the lease released (and finished);
    2. an asynchronous exception (KeyboardInterrupt, a task's time limit) lands on the next line,
       before the Redis side is given back; the caller still holds the lease object
       (``with object_lock(x) as lease``), and no block of this thread will ever release it again;
    3. the renewer must not keep renewing a lease marked released: it must expire by its TTL, not
       stay taken for as long as the caller's object lives.
    """
    from dsm_redis import object_lock
    from dsm_redis.lifecycle import Lease
    from tests.test_lease_lifecycle import Abort, _line_after, raising_at

    dsm_options(settings, TTL=0.6)
    cat = Cat.objects.create()
    line = _line_after(Lease.finish, "self.record.parked.clear()", "if first:")
    with raising_at(Lease.finish, line) as fired:
        try:
            with object_lock(cat) as lease:
                pass
        except Abort:
            pass
    assert fired and lease.released
    wait_for(lambda: owner_of(cat) is None, "the released lease to expire by its TTL", timeout=10)
