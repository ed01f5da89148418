"""Fault injection with real processes, a real Redis of the test's own, and real PostgreSQL.

Each test points the leases (``DSM_REDIS['LOCATION']``) at a Redis server that only it uses, so
it can pause holders past their TTL, kill them, restart Redis empty, or stop it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from dsm_redis import LockBackendUnavailable, LockTimeout, object_lock
from dsm_redis.backends import get_backend
from dsm_redis.keys import object_key
from dsm_redis.models import FencingMark
from dsm_redis.tools.servers import RedisServer
from tests.helpers import dsm_options, effects, pg_connect, wait_for
from tests.procs import committed_per_account, run_workers, start_worker
from tests.testapp.models import Account, FencedAccount, Order

pytestmark = pytest.mark.django_db(transaction=True)

TTL = 1.0


@pytest.fixture
def lock_redis(settings: Any) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    """A Redis for leases only, with a short TTL; the env carries both to worker processes."""
    server = RedisServer().start()
    dsm_options(settings, server.url, TTL=TTL, ACQUIRE_TIMEOUT=30)
    try:
        yield server, {"DSM_TEST_LOCK_REDIS_URL": server.url, "DSM_TEST_TTL": str(TTL)}
    finally:
        server.stop()


def holder(obj: Any) -> Any:
    return get_backend().describe(object_key(obj))["owner"]


@pytest.mark.parametrize("model", [Account, FencedAccount], ids=["mark-table", "own-column"])
def test_paused_holder_cannot_commit_after_its_lease_ran_out(lock_redis, model):
    _, env = lock_redis
    account = model.objects.create()
    worker = start_worker("tests.workers:hold_across_two_transitions", account.pk, model._meta.label, env=env)
    try:
        first_token = worker.expect()
        os.kill(worker.pid, signal.SIGSTOP)  # a GC pause, a stopped VM: the renewer stops too
        wait_for(lambda: holder(account) is None, "the paused holder's lease to expire")
        account.machine.deposit(amount=10)  # a new holder, a newer token, committed
        worker.send("go")
        os.kill(worker.pid, signal.SIGCONT)
        # The database refuses the resumed holder's write: it has seen a newer token.
        assert worker.expect() == "StaleFencingToken"
    finally:
        worker.stop()
    account.refresh_from_db()
    assert (account.balance, account.deposits) == (11, 2)  # nothing of the stale write landed
    if model is Account:
        assert FencingMark.objects.get(pk=object_key(account)).token > first_token
    else:
        assert int(account.fencing_token.split(":")[0]) > first_token


def test_expired_lease_is_refused_before_commit_even_without_a_rival(lock_redis):
    _, env = lock_redis
    account = Account.objects.create()
    worker = start_worker("tests.workers:hold_across_two_transitions", account.pk, env=env)
    try:
        worker.expect()
        os.kill(worker.pid, signal.SIGSTOP)
        wait_for(lambda: holder(account) is None, "the paused holder's lease to expire")
        worker.send("go")
        os.kill(worker.pid, signal.SIGCONT)
        assert worker.expect() == "LockLost"  # nobody else wrote, but the lease is gone
    finally:
        worker.stop()
    account.refresh_from_db()
    assert (account.balance, account.deposits) == (1, 1)


def test_killed_holder_frees_the_object_within_its_ttl(lock_redis, settings):
    _, env = lock_redis
    account = Account.objects.create()
    worker = start_worker("tests.workers:hold_forever", account.pk, env=env)
    worker.expect()
    os.kill(worker.pid, signal.SIGKILL)
    worker.stop()
    # Nobody releases a killed holder's lease; its TTL does. Waiting up to TTL + margin must do.
    dsm_options(settings, ACQUIRE_TIMEOUT=TTL + 5)
    account.machine.deposit()
    account.refresh_from_db()
    assert account.balance == 1


def test_redis_restarted_empty_mid_race_loses_and_duplicates_nothing(lock_redis, redis):
    server, env = lock_redis
    accounts = [Account.objects.create() for _ in range(2)]
    ids = [a.pk for a in accounts]
    done: dict[str, Any] = {}

    def race() -> None:
        try:
            done["results"] = run_workers("tests.workers:dsm_deposit", 6, ids, 40, 0.002, env=env)
        except BaseException as exc:  # surfaced below
            done["error"] = exc

    racer = threading.Thread(target=race)
    racer.start()
    marks = FencingMark.objects.filter(pk__in=[object_key(a) for a in accounts])
    wait_for(lambda: sum(m.token for m in marks.all()) >= 40, "the race to get going")
    server.restart()  # every lease and fencing counter is gone
    racer.join(timeout=300)
    assert "error" not in done, done.get("error")
    results = done["results"]
    per_account = committed_per_account(results, ids)
    for account in Account.objects.filter(pk__in=ids):
        # Every deposit that reported success committed exactly once; none was lost.
        assert account.balance == account.deposits == per_account[account.pk]
        assert effects(redis, account.pk) == per_account[account.pk]  # side effects ran once each
    assert sum(per_account.values()) == 6 * 40  # progress resumed after the restart
    # New leases minted low tokens that the database refused; Redis confirmed the owners and the
    # counters were re-anchored above the database's marks.
    assert sum(r["reanchored"] for r in results) >= 1


def test_redis_down_is_a_clear_error_and_transitions_resume_when_it_is_back(lock_redis):
    server, _ = lock_redis
    account = Account.objects.create()
    account.machine.deposit()
    server.stop()
    with pytest.raises(LockBackendUnavailable, match="Redis unreachable") as caught:
        account.machine.deposit(amount=5)
    assert "redis://" not in str(caught.value)  # no URL, so no password, in the message
    account.refresh_from_db()
    assert (account.balance, account.deposits) == (1, 1)  # nothing written
    server.start()  # same port, empty
    account.machine.deposit(amount=5)  # no restart of the app, no new client needed
    account.refresh_from_db()
    assert account.balance == 6


def test_database_connection_killed_during_side_effect(lock_redis):
    account = Account.objects.create()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()

    def kill_our_connection() -> None:
        with pg_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])

    from django.db import Error

    with pytest.raises(Error):
        account.machine.deposit(amount=7, effect=kill_our_connection)
    assert (account.balance, account.deposits) == (0, 0)  # in-memory instance restored
    assert holder(account) is None  # lease released
    connection.close()
    account.refresh_from_db()
    assert (account.balance, account.deposits) == (0, 0)  # rolled back
    account.machine.deposit()
    assert Account.objects.get(pk=account.pk).balance == 1


def test_crashing_side_effect_releases_the_lease_at_once(lock_redis):
    order = Order.objects.create(status="paid", paid=3)
    with pytest.raises(RuntimeError):
        order.machine.explode()
    assert holder(order) is None
    assert order.machine.ship() == "shipped"


@pytest.mark.parametrize("model", [Account, FencedAccount], ids=["mark-table", "own-column"])
def test_row_lock_wait_is_bounded(lock_redis, settings, model):
    dsm_options(settings, ROW_LOCK_TIMEOUT=0.2)
    account = model.objects.create()
    with connection.cursor() as cursor:
        # Without dsm_redis's bound the wait would never end: make that a failure, not a hang.
        cursor.execute("SET statement_timeout = '30s'")
    with pg_connect() as other:
        with other.transaction():
            # Someone outside dsm_redis holds the row lock (a plain ORM select_for_update).
            other.execute(f"SELECT * FROM {model._meta.db_table} WHERE id = %s FOR UPDATE", [account.pk])
            with pytest.raises(LockTimeout, match="row lock"):
                account.machine.deposit()
    assert holder(account) is None
    account.refresh_from_db()
    assert account.balance == 0
    account.machine.deposit()


def test_lease_wait_is_bounded(lock_redis, settings):
    _, env = lock_redis
    dsm_options(settings, ACQUIRE_TIMEOUT=0.2)
    account = Account.objects.create()
    worker = start_worker("tests.workers:hold_forever", account.pk, env=dict(env, DSM_TEST_TTL="60"))
    try:
        worker.expect()
        with pytest.raises(LockTimeout, match=r"not acquired within 0\.2s"):
            account.machine.deposit()
        with pytest.raises(LockTimeout):
            with object_lock(account, timeout=0):
                pass
    finally:
        worker.stop()
    assert Account.objects.get(pk=account.pk).balance == 0


def test_a_replica_after_failover_is_unavailable_not_a_crash(settings):
    import redis as redis_py

    with RedisServer() as primary, RedisServer() as replica:
        # After a failover the app may still point at a node that is now a replica: it refuses writes.
        redis_py.Redis.from_url(replica.url).replicaof("127.0.0.1", primary.port)
        dsm_options(settings, replica.url)
        account = Account.objects.create()
        with pytest.raises(LockBackendUnavailable, match="READONLY"):
            account.machine.deposit()
        assert Account.objects.get(pk=account.pk).balance == 0
