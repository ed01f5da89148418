"""Hand-over on release (first come, first served) and idle fencing counters, on real Redis.

The scripts are checked one call at a time against the suite's Redis; the queue's promises (FIFO
order, a waiter SIGKILLed or timing out while queued, Redis restarted with a queue in it) with
real processes against a Redis of each test's own. Nothing here asserts a duration: waits are
bounded only so that a hang fails instead of blocking the run.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_py
from django.conf import settings as django_settings

from dsm_redis import LockTimeout
from dsm_redis.backends import get_backend
from dsm_redis.backends.redis import RedisLockBackend
from dsm_redis.conf import parse, validate
from dsm_redis.keys import counter_key
from dsm_redis.tools.servers import RedisServer
from tests.helpers import redis_backend_for, wait_for
from tests.procs import Worker, run_workers, start_worker

# -- helpers -----------------------------------------------------------------------------------------


@pytest.fixture
def queue_backend() -> Iterator[RedisLockBackend]:
    b = redis_backend_for(django_settings.REDIS_URL, HANDOVER_GRACE=0.5)
    yield b
    b.close()


def queued(queue_backend: RedisLockBackend, key: str) -> list[str]:
    """The owner ids queued for ``key``, oldest first."""
    return [o.decode() for o in queue_backend.client.zrange(queue_backend._queue_keys(key)[0], 0, -1)]


def enqueue(queue_backend: RedisLockBackend, key: str, owner: str, stay_ms: int = 60_000) -> list[Any]:
    """One acquire call for ``owner`` as a waiter makes it (the waiter then never calls again)."""
    lock_key, _, counter = queue_backend._keys(key)
    queue, waiters, grant_prefix = queue_backend._queue_keys(key)
    return list(
        queue_backend._scripts["acquire"](
            keys=[lock_key, counter, queue, waiters, grant_prefix + owner],
            args=[owner, 30_000, stay_ms, queue_backend._grace_ms, queue_backend._idle_ms, grant_prefix],
        )
    )


def redis_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


# -- the scripts, one call at a time ---------------------------------------------------------------


def test_release_hands_the_lease_to_the_oldest_waiter_with_its_token_minted_there(queue_backend):
    key = "app.m:1"
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    assert enqueue(queue_backend, key, "first")[0] == enqueue(queue_backend, key, "second")[0] == 0
    assert queued(queue_backend, key) == ["first", "second"]
    assert queue_backend.release(key, holder.owner)
    info = queue_backend.describe(key)
    # Inside the release: the oldest waiter holds it, for the grace only, with the next token.
    assert info["owner"] == "first" and info["fencing_token"] == holder.fencing_token + 1
    assert 0 < info["ttl"] <= 0.5
    assert queued(queue_backend, key) == ["second"]
    _, _, grant_prefix = queue_backend._queue_keys(key)
    assert queue_backend.client.lrange(grant_prefix + "first", 0, -1) == [str(holder.fencing_token + 1).encode()]
    # Its next call finds the lease its own: extended to its TTL, the same token, the doorbell gone.
    assert enqueue(queue_backend, key, "first") == [1, holder.fencing_token + 1]
    assert queue_backend.describe(key)["ttl"] > 0.5
    assert not queue_backend.client.exists(grant_prefix + "first")


def test_a_newcomer_never_overtakes_a_queued_waiter_even_when_the_lease_is_free(queue_backend):
    key = "app.m:2"
    enqueue(queue_backend, key, "waiter")  # the lease is free (its holder died), a waiter is queued
    with pytest.raises(LockTimeout):
        queue_backend.acquire(key, ttl=30, timeout=0)
    # The newcomer's call granted the lease to the waiter, and did not queue itself (timeout 0).
    assert queue_backend.describe(key)["owner"] == "waiter"
    assert queued(queue_backend, key) == []


def test_a_free_lease_with_nobody_queued_is_taken_at_once(queue_backend):
    grant = queue_backend.acquire("app.m:3", ttl=30, timeout=0)
    assert queue_backend.describe("app.m:3")["owner"] == grant.owner
    assert queued(queue_backend, "app.m:3") == []
    assert queue_backend.release("app.m:3", grant.owner)


def test_a_retried_call_keeps_the_waiters_place_and_a_retried_release_does_nothing(queue_backend):
    key = "app.m:4"
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    enqueue(queue_backend, key, "a")
    enqueue(queue_backend, key, "b")
    enqueue(queue_backend, key, "a")  # a's reply was lost; it calls again
    assert queued(queue_backend, key) == ["a", "b"]
    assert queue_backend.release(key, holder.owner)
    assert not queue_backend.release(key, holder.owner)  # the retry: handed over already, nothing happens
    assert queue_backend.describe(key)["owner"] == "a"


def test_waiters_past_their_deadline_are_skipped(queue_backend):
    key = "app.m:5"
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    enqueue(queue_backend, key, "gone", stay_ms=1)
    enqueue(queue_backend, key, "alive")
    _, waiters, _ = queue_backend._queue_keys(key)
    wait_for(lambda: redis_ms(queue_backend.client) > int(queue_backend.client.hget(waiters, "gone")), "the deadline")
    assert queue_backend.release(key, holder.owner)
    assert queue_backend.describe(key)["owner"] == "alive"
    assert queued(queue_backend, key) == []


def test_a_grant_that_reaches_a_waiter_after_it_gave_up_is_handed_on(queue_backend):
    key = "app.m:6"
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    enqueue(queue_backend, key, "late")
    enqueue(queue_backend, key, "next")
    assert queue_backend.release(key, holder.owner)  # granted to "late", which has just timed out
    assert queue_backend.release(key, "late")  # its give-up call finds the grant: handed on at once
    assert queue_backend.describe(key)["owner"] == "next"
    assert queue_backend.release(key, "next")
    assert queue_backend.describe(key)["owner"] is None


def test_a_waiter_that_times_out_leaves_the_queue_and_holds_nothing(queue_backend):
    key = "app.m:7"
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    with pytest.raises(LockTimeout):
        queue_backend.acquire(key, ttl=30, timeout=0.05)
    assert queued(queue_backend, key) == []
    assert queue_backend.release(key, holder.owner)
    assert queue_backend.describe(key)["owner"] is None  # nobody was left to hand it to


def test_the_queue_keys_expire_with_their_last_waiter(queue_backend):
    key = "app.m:8"
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    enqueue(queue_backend, key, "w", stay_ms=5_000)
    queue, waiters, _ = queue_backend._queue_keys(key)
    assert 0 < queue_backend.client.pttl(queue) <= 5_000 and 0 < queue_backend.client.pttl(waiters) <= 5_000
    queue_backend.release(key, holder.owner)
    queue_backend.release(key, "w")
    assert not queue_backend.client.exists(queue, waiters)  # emptied: Redis drops empty collections


@pytest.mark.parametrize("deadline", ["past", "live"])
def test_a_stale_queue_restored_into_redis_delays_a_waiter_at_most_its_deadline_or_the_grace(queue_backend, deadline):
    """Redis restored from disk, or a failover target whose clock is behind: queue entries of
    waiters that no longer exist. The waiter waits at most their deadline or a grace, then takes it."""
    key = f"app.m:9-{deadline}"
    queue, waiters, _ = queue_backend._queue_keys(key)
    ghost_deadline = redis_ms(queue_backend.client) + (-1_000 if deadline == "past" else 1_000)
    queue_backend.client.zadd(queue, {"ghost": 1})
    queue_backend.client.hset(waiters, "ghost", ghost_deadline)
    grant = queue_backend.acquire(key, ttl=30, timeout=30)
    assert queue_backend.describe(key)["owner"] == grant.owner
    assert queued(queue_backend, key) == []
    queue_backend.release(key, grant.owner)


def test_a_zero_timeout_never_queues(queue_backend):
    key = "app.m:10"
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    with pytest.raises(LockTimeout):
        queue_backend.acquire(key, ttl=30, timeout=0)
    assert queued(queue_backend, key) == []
    queue_backend.release(key, holder.owner)


def test_no_timeout_waits_through_a_hand_over(queue_backend):
    import threading

    key = "app.m:11"
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(queue_backend.acquire(key, ttl=30, timeout=None)))
    thread.start()
    wait_for(lambda: len(queued(queue_backend, key)) == 1, "the waiter to queue")
    queue_backend.release(key, holder.owner)
    thread.join(60)
    assert got and got[0].fencing_token == holder.fencing_token + 1
    assert queue_backend.describe(key)["owner"] == got[0].owner
    queue_backend.release(key, got[0].owner)


# -- idle fencing counters -------------------------------------------------------------------------


def test_the_counter_expires_when_idle_and_every_use_pushes_its_expiry_back():
    queue_backend = redis_backend_for(django_settings.REDIS_URL, COUNTER_IDLE_TTL=60)
    key, client = "app.c:1", None
    try:
        client = queue_backend.client
        counter = counter_key(queue_backend.config.key_prefix, key)
        grant = queue_backend.acquire(key, ttl=30, timeout=0)
        assert 0 < client.pttl(counter) <= 60_000
        client.pexpire(counter, 10_000)
        assert queue_backend.renew(key, grant.owner, 30)
        assert client.pttl(counter) > 10_000  # a renewal keeps a counter in use alive
        client.pexpire(counter, 10_000)
        assert queue_backend.reanchor(key, grant.owner, 100) == 101
        assert client.pttl(counter) > 10_000  # the re-anchor's SET did not make it immortal
        queue_backend.release(key, grant.owner)
    finally:
        queue_backend.close()


def test_a_counter_without_idle_ttl_never_expires():
    queue_backend = redis_backend_for(django_settings.REDIS_URL, COUNTER_IDLE_TTL=None)
    try:
        grant = queue_backend.acquire("app.c:2", ttl=30, timeout=0)
        assert queue_backend.client.pttl(counter_key(queue_backend.config.key_prefix, "app.c:2")) == -1
        queue_backend.release("app.c:2", grant.owner)
    finally:
        queue_backend.close()


@pytest.mark.django_db(transaction=True)
def test_a_transition_after_the_counter_expired_is_judged_by_the_mark_and_re_anchored(settings):
    from dsm_redis.keys import object_key
    from dsm_redis.models import FencingMark
    from tests.testapp.models import Account

    settings.DSM_REDIS = dict(settings.DSM_REDIS, OPTIONS=dict(settings.DSM_REDIS["OPTIONS"], COUNTER_IDLE_TTL=0.2))
    account = Account.objects.create()
    account.machine.deposit()
    account.machine.deposit()
    first_mark = FencingMark.objects.get(pk=object_key(account)).token
    counter = counter_key(settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"], object_key(account))
    client = get_backend().client
    wait_for(lambda: not client.exists(counter), "the idle counter to expire")
    account.machine.deposit()  # a low token, refused by the mark, re-anchored above it
    account.refresh_from_db()
    assert (account.balance, account.deposits) == (3, 3)
    assert FencingMark.objects.get(pk=object_key(account)).token > first_mark


def test_the_new_options_are_validated():
    config = parse({"OPTIONS": {"HANDOVER_GRACE": 0.25, "COUNTER_IDLE_TTL": None}})
    assert (config.handover_grace, config.counter_idle_ttl) == (0.25, None)
    defaults = parse({})
    assert defaults.handover_grace == 2.0 and defaults.counter_idle_ttl == 7 * 24 * 3600
    assert validate({"OPTIONS": {"HANDOVER_GRACE": 0}}) and validate({"OPTIONS": {"HANDOVER_GRACE": None}})
    assert validate({"OPTIONS": {"COUNTER_IDLE_TTL": 0}}) and validate({"OPTIONS": {"COUNTER_IDLE_TTL": "1d"}})


# -- real processes ----------------------------------------------------------------------------------


def _configure(options: dict[str, Any]) -> None:
    """In a worker: the suite's DSM_REDIS with these OPTIONS on top (before any lease is taken)."""
    from django.conf import settings

    settings.DSM_REDIS = dict(settings.DSM_REDIS, OPTIONS=dict(settings.DSM_REDIS["OPTIONS"], **options))


def order_key(key: str) -> str:
    return f"test-order:{key}"


def waiter(inbox: Any, outbox: Any, key: str, index: int, rounds: int, timeout: float, options: dict) -> list[str]:
    """Worker: when told to go, take ``key``'s lease ``rounds`` times in a row (asking again as soon
    as it released it, as a hot loop does), logging each acquisition while holding it."""
    from django.conf import settings

    from dsm_redis import LockBackendUnavailable
    from dsm_redis.lease import hold

    _configure(options)
    log = redis_py.Redis.from_url(settings.DSM_REDIS["LOCATION"])
    outbox.put(("ok", "ready"))
    inbox.get(timeout=120)
    outcomes: list[str] = []
    for _ in range(rounds):
        while True:
            try:
                with hold(key, timeout=timeout):
                    log.rpush(order_key(key), index)
                outcomes.append("acquired")
            except LockTimeout:
                outcomes.append("timeout")
            except LockBackendUnavailable:
                time.sleep(0.05)  # Redis restarting under us: nothing is held, ask again
                continue
            break
    return outcomes


def hot(index: int, key: str, rounds: int, options: dict) -> int:
    """Worker: ``rounds`` acquisitions in a hot loop; before each release, log who we are and which
    waiter heads the queue (the one the release must hand the lease to)."""
    from django.conf import settings

    from dsm_redis.lease import hold

    _configure(options)
    log = redis_py.Redis.from_url(settings.DSM_REDIS["LOCATION"])
    queue = get_backend()._queue_keys(key)[0]
    for _ in range(rounds):
        with hold(key, timeout=120) as lease:
            time.sleep(0.002)  # the work
            head = log.zrange(queue, 0, 0)
            log.rpush(order_key(key), json.dumps([index, lease.owner, head[0].decode() if head else None]))
    return rounds


@pytest.fixture
def lock_redis(settings: Any) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    """A Redis of this test's own for the leases (no other client blocks on it); env for workers."""
    server = RedisServer().start()
    settings.DSM_REDIS = {"LOCATION": server.url, "OPTIONS": dict(settings.DSM_REDIS["OPTIONS"], ACQUIRE_TIMEOUT=60)}
    try:
        yield server, {"DSM_TEST_LOCK_REDIS_URL": server.url}
    finally:
        server.stop()


def blocked(client: Any) -> int:
    """Clients blocked waiting for a wake-up (any version of the protocol waits with BLPOP)."""
    return sum(1 for c in client.client_list() if c.get("cmd") == "blpop")


def start_waiters(env: dict[str, str], key: str, n: int, rounds: int, timeout: float, options: dict) -> list[Worker]:
    workers = [start_worker("tests.test_handover:waiter", key, i, rounds, timeout, options, env=env) for i in range(n)]
    for w in workers:
        assert w.expect() == "ready"
    return workers


def queue_one_by_one(client: Any, workers: list[Worker]) -> None:
    """Let the waiters ask in a known order: each is waiting before the next one asks."""
    for n, w in enumerate(workers, 1):
        w.send("go")
        wait_for(lambda n=n: blocked(client) == n, f"waiter {n} to wait")


def stop_all(workers: list[Worker]) -> None:
    for w in workers:
        w.stop()


@pytest.mark.django_db(transaction=True)
def test_waiters_are_served_in_arrival_order_and_newcomers_do_not_overtake(lock_redis):
    """Four processes queue one after the other; then the holder releases and at once asks again,
    and each waiter, once served, asks again too (a hot object). The first four acquisitions must
    be the four waiters in the order they asked: without the hand-over the releaser re-takes the
    free lease before the woken waiter's next call arrives, and a waiter that loses that race
    waits again behind the others (this test fails on the protocol without the queue)."""
    server, env = lock_redis
    key, n = "testapp.account:fifo", 4
    client = redis_py.Redis.from_url(server.url)
    queue_backend = get_backend()
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    workers = start_waiters(env, key, n, rounds=2, timeout=60, options={})
    try:
        queue_one_by_one(client, workers)
        queue_backend.release(key, holder.owner)
        again = queue_backend.acquire(key, ttl=30, timeout=60)  # the releaser, asking again at once
        client.rpush(order_key(key), "releaser")
        queue_backend.release(key, again.owner)
        assert [w.expect() for w in workers] == [["acquired", "acquired"]] * n
    finally:
        stop_all(workers)
    order = [x.decode() for x in client.lrange(order_key(key), 0, -1)]
    assert order[:n] == [str(i) for i in range(n)], order
    assert sorted(order) == sorted([str(i) for i in range(n)] * 2 + ["releaser"])
    client.close()


@pytest.mark.django_db(transaction=True)
def test_a_hot_object_is_handed_to_the_head_of_the_queue_at_every_release(lock_redis):
    """Five processes take one lease 20 times each as fast as they can. Whenever a release finds
    waiters queued, the next holder is the one at the head of the queue: no overtaking, ever."""
    server, env = lock_redis
    key, n, rounds = "testapp.account:hot", 5, 20
    assert run_workers("tests.test_handover:hot", n, key, rounds, {}, env=env) == [rounds] * n
    client = redis_py.Redis.from_url(server.url)
    log = [json.loads(x) for x in client.lrange(order_key(key), 0, -1)]
    client.close()
    assert len(log) == n * rounds
    handed = 0
    for (_, _, head), (_, owner, _) in itertools.pairwise(log):
        if head is not None:
            handed += 1
            assert owner == head
    assert handed > 0  # the queue was in use: the property was exercised


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("when", ["before-its-deadline", "after-its-deadline"])
def test_a_waiter_killed_while_queued_is_skipped_and_costs_at_most_the_grace(lock_redis, settings, when):
    server, env = lock_redis
    key = f"testapp.account:killed-{when}"
    client = redis_py.Redis.from_url(server.url)
    options = {"HANDOVER_GRACE": 0.5}  # the releaser's setting grants; every process has the same
    settings.DSM_REDIS = dict(settings.DSM_REDIS, OPTIONS=dict(settings.DSM_REDIS["OPTIONS"], **options))
    queue_backend = get_backend()
    holder = queue_backend.acquire(key, ttl=30, timeout=0)
    doomed, survivor = workers = start_waiters(env, key, 2, rounds=1, timeout=60, options=options)
    try:
        queue_one_by_one(client, workers)
        doomed_owner, survivor_owner = queued(queue_backend, key)
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.stop()
        if when == "after-its-deadline":
            _, waiters, _ = queue_backend._queue_keys(key)
            wait_for(lambda: redis_ms(client) > int(client.hget(waiters, doomed_owner)), "its deadline to pass")
        queue_backend.release(key, holder.owner)
        info = queue_backend.describe(key)
        if when == "before-its-deadline":
            # Granted to the dead waiter (unless its deadline had passed), for the grace only ...
            assert info["owner"] != doomed_owner or info["ttl"] <= 0.5
        else:
            assert info["owner"] == survivor_owner  # skipped: the next waiter got it in the release
        assert survivor.expect() == ["acquired"]  # ... and the next waiter proceeds
    finally:
        stop_all(workers)
    assert [x.decode() for x in client.lrange(order_key(key), 0, -1)] == ["1"]
    client.close()


@pytest.mark.django_db(transaction=True)
def test_a_waiter_whose_timeout_passes_while_queued_gets_lock_timeout_and_holds_nothing(lock_redis):
    server, env = lock_redis
    key = "testapp.account:impatient"
    client = redis_py.Redis.from_url(server.url)
    queue_backend = get_backend()
    holder = queue_backend.acquire(key, ttl=60, timeout=0)
    impatient = start_worker("tests.test_handover:waiter", key, 0, 1, 5.0, {}, env=env)
    patient = start_worker("tests.test_handover:waiter", key, 1, 1, 60, {}, env=env)
    try:
        for w in (impatient, patient):
            assert w.expect() == "ready"
        queue_one_by_one(client, [impatient, patient])
        patient_owner = queued(queue_backend, key)[1]
        assert impatient.expect() == ["timeout"]
        # It left the queue; it holds nothing; the lease is still the holder's.
        assert queued(queue_backend, key) == [patient_owner]
        assert queue_backend.describe(key)["owner"] == holder.owner
        assert queue_backend.release(key, holder.owner)
        assert queue_backend.describe(key)["owner"] == patient_owner  # skipped, in the release itself
        assert patient.expect() == ["acquired"]
    finally:
        stop_all([impatient, patient])
    assert [x.decode() for x in client.lrange(order_key(key), 0, -1)] == ["1"]
    client.close()


@pytest.mark.django_db(transaction=True)
def test_redis_restarted_with_a_queue_in_it_leaves_no_waiter_hanging(lock_redis):
    server, env = lock_redis
    key, n = "testapp.account:restarted", 3
    client = redis_py.Redis.from_url(server.url)
    queue_backend = get_backend()
    queue_backend.acquire(key, ttl=60, timeout=0)
    workers = start_waiters(env, key, n, rounds=1, timeout=60, options={})
    try:
        queue_one_by_one(client, workers)
        assert len(queued(queue_backend, key)) == n
        server.restart()  # the lease, the queue, the deadlines and the wake-up lists are gone
        # Every waiter notices within its wait, takes the free lease or queues again, and is served.
        assert [w.expect() for w in workers] == [["acquired"]] * n
    finally:
        stop_all(workers)
    client = redis_py.Redis.from_url(server.url)
    assert sorted(x.decode() for x in client.lrange(order_key(key), 0, -1)) == [str(i) for i in range(n)]
    client.close()


# -- Redis Cluster -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cl.hand:1", "cl.hand:we{ird}pk"])
def test_the_hand_over_on_redis_cluster(key):
    """Every key the scripts touch (the waiter's wake-up list too, named inside the release script)
    carries the object's hash tag: one slot, one node, even for a primary key with braces."""
    import threading

    from redis.cluster import key_slot

    from tests.cluster import RedisCluster

    with RedisCluster() as cluster:
        queue_backend = RedisLockBackend(parse({"LOCATION": cluster.url, "OPTIONS": {"KEY_PREFIX": "hand"}}))
        lock_key, signal_key, counter = queue_backend._keys(key)
        queue, waiters, grant_prefix = queue_backend._queue_keys(key)
        slots = {key_slot(k.encode()) for k in (lock_key, signal_key, counter, queue, waiters, grant_prefix + "x")}
        assert len(slots) == 1
        holder = queue_backend.acquire(key, ttl=30, timeout=0)
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(queue_backend.acquire(key, ttl=30, timeout=60)))
        thread.start()
        wait_for(lambda: len(queued(queue_backend, key)) == 1, "the waiter to queue")
        (waiter_owner,) = queued(queue_backend, key)
        assert queue_backend.release(key, holder.owner)
        assert queue_backend.describe(key)["owner"] == waiter_owner  # handed over inside the release
        thread.join(60)
        assert got and (got[0].owner, got[0].fencing_token) == (waiter_owner, holder.fencing_token + 1)
        assert queue_backend.release(key, waiter_owner)
        queue_backend.close()
