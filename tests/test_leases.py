"""Leases: re-entrancy for the holding thread, contention from others, renewal, loss, fork safety."""

from __future__ import annotations

import logging
import os
import time

import pytest

from dsm_redis import LockLost, LockTimeout, object_lock
from dsm_redis.backends import get_backend
from dsm_redis.keys import object_key
from tests.helpers import dsm_options
from tests.procs import contend_from_another_thread
from tests.testapp.models import Account

pytestmark = pytest.mark.django_db(transaction=True)


def test_another_thread_contends_for_a_held_lease():
    account = Account.objects.create()
    with object_lock(account):
        assert contend_from_another_thread(account) == "timeout"  # re-entrant per thread, not per process


def test_renewal_keeps_a_long_holder_alive(settings):
    dsm_options(settings, TTL=0.3)
    account = Account.objects.create()
    with object_lock(account) as lease:
        time.sleep(1.0)  # several TTLs of work; the renewer extends the lease meanwhile
        account.machine.deposit()
        assert lease.lost is None
    assert Account.objects.get(pk=account.pk).balance == 1


def test_without_renewal_a_long_holder_cannot_commit(settings, caplog):
    dsm_options(settings, TTL=0.3, AUTO_RENEW=False)
    account = Account.objects.create()
    with caplog.at_level(logging.ERROR, logger="dsm_redis"):
        with pytest.raises(LockLost, match="expired"):
            account.machine.deposit(work=0.6)  # the side effect outlives the lease
    assert "refusing to commit" in caplog.text
    assert Account.objects.get(pk=account.pk).balance == 0
    assert account.balance == 0


def test_a_lease_taken_by_someone_else_is_lost_not_renewed(settings, caplog):
    dsm_options(settings, TTL=0.6)
    account = Account.objects.create()
    backend = get_backend()
    with caplog.at_level(logging.ERROR, logger="dsm_redis"):
        with pytest.raises(LockLost, match="was lost"):
            with object_lock(account) as lease:
                # Someone releases and takes our lease behind our back (an operator, a bug).
                assert backend.release(lease.key, lease.owner)
                backend.acquire(lease.key, ttl=30, timeout=0)
                for _ in range(200):
                    if lease.lost:
                        break
                    time.sleep(0.01)  # the renewer notices at its next round (TTL/3)
                account.machine.deposit()
    assert "was lost" in caplog.text
    assert Account.objects.get(pk=account.pk).balance == 0


def test_a_forked_child_does_not_inherit_the_parents_lease():
    account = Account.objects.create()
    with object_lock(account):
        pid = os.fork()
        if pid == 0:  # the child: the lease is the parent's, so it must contend, not re-enter
            code = 3
            try:
                with object_lock(account, timeout=0):
                    code = 1
            except LockTimeout:
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert get_backend().describe(object_key(account))["owner"] is None  # released by the parent


def test_a_forked_child_unwinding_its_parents_block_does_not_release_the_lease():
    account = Account.objects.create()

    def body() -> str:
        with object_lock(account) as lease:
            pid = os.fork()
            if pid == 0:
                return "child"  # leaves the with block in the child
            os.waitpid(pid, 0)
            assert get_backend().describe(lease.key)["owner"] == lease.owner  # still ours
            return "parent"

    if body() == "child":
        os._exit(0)
    assert get_backend().describe(object_key(account))["owner"] is None


def test_fence_outside_a_transaction_is_refused():
    from django.db.transaction import TransactionManagementError

    account = Account.objects.create()
    with object_lock(account) as lease:
        with pytest.raises(TransactionManagementError, match="atomic"):
            lease.fence("default")


def test_proxy_and_inherited_models_share_the_parents_lease():
    from tests.testapp.models import Cat, Lion, ProxyCat

    lion = Lion.objects.create()
    assert object_key(lion) == object_key(Cat.objects.get(pk=lion.pk)) == object_key(ProxyCat.objects.get(pk=lion.pk))
    with object_lock(ProxyCat.objects.get(pk=lion.pk)):
        assert contend_from_another_thread(lion) == "timeout"
    assert lion.state_machine.survive() == 1  # a transition on the child locks parent, then child
    assert Cat.objects.get(pk=lion.pk).can_meow is True


def test_a_lease_whose_registration_failed_does_not_poison_the_thread(monkeypatch):
    from dsm_redis.renewer import Renewer

    account = Account.objects.create()
    real_add = Renewer.add
    failed: list[object] = []

    def add_fails_once(self: Renewer, lease: object) -> None:
        if not failed:
            failed.append(lease)
            raise RuntimeError("can't start new thread")  # what threading raises when refused
        real_add(self, lease)  # type: ignore[arg-type]

    monkeypatch.setattr(Renewer, "add", add_fails_once)
    with pytest.raises(RuntimeError, match="new thread"):
        account.machine.deposit()
    assert get_backend().describe(object_key(account))["owner"] is None  # given back at once
    assert account.machine.deposit() == "open"  # the next transition on this thread works
    assert get_backend().describe(object_key(account))["owner"] is None  # and releases its lease
    assert Account.objects.get(pk=account.pk).balance == 1
