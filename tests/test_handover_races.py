"""Interleavings around the hand-over and the idle fencing counter, on the suite's real servers.

Each test drives one interleaving step by step (the scripts are atomic, so the steps between calls
are the only places another client can act) and asserts the safety contract of the Redis backend:
a fencing counter never expires while a lease minted from it can still be presented, the token a
waiter works under is the one minted for it, and ``valid_until`` never exceeds what Redis holds.
Elapsed time is simulated with PEXPIRE where the real wait would be long; nothing asserts a duration.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import transaction

from dsm_redis import LockTimeout, StaleFencingToken, object_lock
from dsm_redis.backends import get_backend
from dsm_redis.backends.redis import RedisLockBackend
from dsm_redis.fence import fence
from dsm_redis.keys import counter_key, object_key
from dsm_redis.token import Token
from tests.helpers import dsm_options, redis_backend_for, wait_for
from tests.test_handover import enqueue, queued, redis_ms


@pytest.fixture
def idle_backend() -> Iterator[RedisLockBackend]:
    """Counters that idle out after a second, leases much longer: the counter must follow the lease."""
    b = redis_backend_for(django_settings.REDIS_URL, COUNTER_IDLE_TTL=1, HANDOVER_GRACE=0.5)
    yield b
    b.close()


def counter_of(b: RedisLockBackend, key: str) -> str:
    return counter_key(b.config.key_prefix, key)


# -- the counter outlives every lease minted from it ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_holder_stalled_past_its_ttl_cannot_commit_over_a_lease_taken_after_the_counter_idled(settings):
    """The object sat idle for nearly COUNTER_IDLE_TTL; holder A takes it uncontended (token 3) and
    stalls before its first judgement, past its TTL. If A's acquire left the counter's old expiry in
    place, the counter expires a moment later: B's lease mints 1, is refused by the mark (1, the last
    commit) and re-anchored to 2 -- below A's 3 -- so A's late commit would be accepted over B's."""
    from tests.testapp.models import Account

    dsm_options(settings, COUNTER_IDLE_TTL=60)
    account = Account.objects.create()
    account.machine.deposit()  # token 1, committed: the mark is 1
    key, backend = object_key(account), get_backend()
    client = backend.client
    lock_key, _, counter = backend._keys(key)
    unused = backend.acquire(key, ttl=30, timeout=0)  # token 2, never written under
    backend.release(key, unused.owner)
    # As if that release were COUNTER_IDLE_TTL - 0.1s ago: the counter has a moment left.
    client.pexpire(counter, 100)
    expiry_before = redis_ms(client) + 100
    stale = backend.acquire(key, ttl=30, timeout=0)  # A: token 3, uncontended
    assert stale.fencing_token == 3
    client.pexpire(lock_key, 1)  # A stalls past its TTL before its first judgement
    wait_for(lambda: redis_ms(client) > expiry_before and not client.exists(lock_key), "A's lease and old expiry")
    account.machine.deposit()  # B: a newer lease commits
    with pytest.raises(StaleFencingToken), transaction.atomic():
        fence(Token(key, stale.fencing_token, stale.owner), "default", None)  # A wakes and writes
    account.refresh_from_db()
    assert account.balance == 2


@pytest.mark.parametrize("path", ["uncontended", "renewed", "retried"])
def test_the_counter_outlives_the_lease_it_minted_for(idle_backend, path):
    """COUNTER_IDLE_TTL shorter than the lease (AUTO_RENEW=False with a long TTL, or renewals
    every TTL/3 with TTL > COUNTER_IDLE_TTL): the counter must not expire under a live lease,
    whose holder may yet lose it and be overtaken by a re-anchored (lower) token."""
    key = f"app.r:outlive-{path}"
    client, counter = idle_backend.client, counter_of(idle_backend, key)
    lock_key = idle_backend._keys(key)[0]
    first = idle_backend.acquire(key, ttl=30, timeout=0)
    idle_backend.release(key, first.owner)
    grant = idle_backend.acquire(key, ttl=30, timeout=0)  # token 2: the uncontended path
    if path == "renewed":
        assert idle_backend.renew(key, grant.owner, 30)
    elif path == "retried":  # a lost reply, the acquire call made again for the same owner id
        assert enqueue(idle_backend, key, grant.owner)[0] == 1
    assert client.pttl(counter) >= client.pttl(lock_key) > 0
    idle_backend.release(key, grant.owner)


def test_a_grant_s_token_is_the_one_its_extension_returns_even_past_the_counter_s_idle_ttl():
    """The release mints the waiter's token; the waiter's next call extends the grant and returns
    the counter's value. With COUNTER_IDLE_TTL shorter than the grace, the counter may expire in
    between: the waiter would work under token 0 instead of the one minted for it."""
    b = redis_backend_for(django_settings.REDIS_URL, COUNTER_IDLE_TTL=0.05, HANDOVER_GRACE=5)
    try:
        key = "app.r:grant-token"
        client = b.client
        holder = b.acquire(key, ttl=30, timeout=0)
        enqueue(b, key, "waiter")
        assert b.release(key, holder.owner)  # granted to "waiter" for the grace, token minted there
        granted = int(client.lrange(b._queue_keys(key)[2] + "waiter", 0, -1)[0])
        granted_at = redis_ms(client)
        wait_for(lambda: redis_ms(client) > granted_at + 100, "the counter's idle TTL to pass")
        assert enqueue(b, key, "waiter") == [1, granted]  # the waiter's next call: extended
        assert b.release(key, "waiter")
    finally:
        b.close()


# -- valid_until -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0.0019, 30.0004, 1.1])
@pytest.mark.parametrize("call", ["acquire", "renew"])
def test_valid_until_never_exceeds_the_milliseconds_redis_holds(idle_backend, monkeypatch, ttl, call):
    """The TTL goes to Redis in whole milliseconds: ``valid_until`` (and a renewal's, which the
    lease measures as ``sent + ttl``) is ``sent + ttl``, so Redis must be sent at least ``ttl``."""
    import dsm_redis.backends.redis as backend_module

    key = f"app.r:valid-{ttl}-{call}"
    sent_ms: list[int] = []
    script = idle_backend._scripts[call]
    monkeypatch.setitem(
        idle_backend._scripts, call, lambda keys, args: sent_ms.append(int(args[1])) or script(keys=keys, args=args)
    )
    monkeypatch.setattr(backend_module.time, "monotonic", lambda: 1000.0)  # "sent", as the backend sees it
    grant = idle_backend.acquire(key, ttl=ttl if call == "acquire" else 30, timeout=0)
    if call == "renew":
        assert idle_backend.renew(key, grant.owner, ttl)
    monkeypatch.undo()
    assert sent_ms and sent_ms[-1] >= ttl * 1000  # what the holder counts on, Redis holds
    assert call == "renew" or grant.valid_until <= 1000.0 + sent_ms[-1] / 1000
    idle_backend.release(key, grant.owner)


# -- two threads of one process queued on one key -------------------------------------------------------


def test_two_threads_of_one_process_queue_apart_and_are_served_in_turn(idle_backend):
    key = "app.r:threads"
    holder = idle_backend.acquire(key, ttl=30, timeout=0)
    got: list[Any] = []
    threads = [
        threading.Thread(target=lambda: got.append(idle_backend.acquire(key, ttl=30, timeout=60))) for _ in range(2)
    ]
    for n, t in enumerate(threads, 1):
        t.start()
        wait_for(lambda n=n: len(queued(idle_backend, key)) == n, f"thread {n} to queue")
    first_owner, second_owner = queued(idle_backend, key)
    assert idle_backend.release(key, holder.owner)
    wait_for(lambda: len(got) == 1, "the first thread's grant")
    assert (got[0].owner, got[0].fencing_token) == (first_owner, holder.fencing_token + 1)
    assert idle_backend.release(key, got[0].owner)
    for t in threads:
        t.join(60)
    assert (got[1].owner, got[1].fencing_token) == (second_owner, holder.fencing_token + 2)
    assert idle_backend.release(key, got[1].owner)


# -- a counter gone under a live lease: later judgements of that lease, and the next lease -------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("model_name", ["Account", "FencedAccount"])
def test_a_counter_gone_under_a_live_lease_neither_refuses_its_later_judgements_nor_admits_it_later(model_name):
    """The counter vanished while a lease is held (eviction, or an older version's acquire that set
    no expiry rule): the holder's later judgements -- a transition inside ``object_lock``, then
    ``fence()`` by hand -- carry the token its door accepted and are accepted; the next lease mints
    low, is re-anchored above the mark, and the old token is refused from then on."""
    from tests.testapp import models

    model = getattr(models, model_name)
    obj = model.objects.create()
    obj.machine.deposit()
    key, client = object_key(obj), get_backend().client
    with object_lock(obj) as lease:  # the door judges (and re-anchors at most) here
        client.delete(counter_key(get_backend().config.key_prefix, key))
        model.objects.get(pk=obj.pk).machine.deposit()  # a later judgement: the same token, accepted
        with transaction.atomic():
            lease.fence()
            model.objects.filter(pk=obj.pk).update(balance=10)
        held = Token(key, lease.fencing_token, lease.owner)
    obj.machine.deposit()  # the next lease: minted 1, refused by the mark, re-anchored above it
    with pytest.raises(StaleFencingToken), transaction.atomic():
        fence(held, "default", None)
    assert model.objects.get(pk=obj.pk).balance == 11


def test_a_grant_is_never_handed_to_a_waiter_whose_owner_id_a_later_acquire_reuses(idle_backend):
    """A waiter given a grant that it never collected (it gave up, its process died) and a new
    acquire of the same process: every acquire draws a fresh owner id, so the old grant's wake-up
    list and lock value can never be taken for the new waiter's (which would skip the queue)."""
    key = "app.r:owner-reuse"
    holder = idle_backend.acquire(key, ttl=30, timeout=0)
    enqueue(idle_backend, key, "gone")
    enqueue(idle_backend, key, "next")
    assert idle_backend.release(key, holder.owner)  # granted to "gone" for the grace
    with pytest.raises(LockTimeout):
        idle_backend.acquire(key, ttl=30, timeout=0.05)  # a new acquire: not "gone", so it waits
    assert idle_backend.describe(key)["owner"] == "gone"
    assert queued(idle_backend, key) == ["next"]
    assert idle_backend.release(key, "gone")  # its give-up: handed on, in order
    assert idle_backend.describe(key)["owner"] == "next"
    assert idle_backend.release(key, "next")


# -- the waiter's own calls failing or coming late --------------------------------------------------------


def test_a_lost_reply_on_the_extension_gives_the_grant_back_to_the_next_waiter(idle_backend, monkeypatch):
    """The release granted the lease to W; W's next call extended it to W's TTL, and its reply was
    lost. W raises, and gives the lease back on its way out (owner-checked): the next waiter gets it
    at once, with the next token, instead of waiting a TTL for a lease nobody holds."""
    import redis as redis_py

    key = "app.r:lost-extension"
    holder = idle_backend.acquire(key, ttl=30, timeout=0)
    script = idle_backend._scripts["acquire"]

    def extension_reply_lost(keys: list[str], args: list[Any]) -> Any:
        reply = script(keys=keys, args=args)
        if args[0] == "next":
            return reply  # the other waiter's calls, made by this test
        if reply[0] == 1:  # W's extension ran in Redis; its reply never arrives
            raise redis_py.ConnectionError("reply lost")
        enqueue(idle_backend, key, "next")  # queued behind W
        idle_backend.release(key, holder.owner)  # grants W while it waits
        return reply

    monkeypatch.setitem(idle_backend._scripts, "acquire", extension_reply_lost)
    from dsm_redis import LockBackendUnavailable

    with pytest.raises(LockBackendUnavailable):
        idle_backend.acquire(key, ttl=30, timeout=60)
    monkeypatch.undo()
    assert idle_backend.describe(key)["owner"] == "next"  # handed on by W's give-back
    assert enqueue(idle_backend, key, "next") == [1, holder.fencing_token + 2]
    assert idle_backend.release(key, "next")


def test_an_interrupt_as_the_grant_arrives_hands_it_on_in_order(idle_backend, monkeypatch):
    """W is woken by its grant, and an interrupt (a task's soft time limit, Ctrl-C) lands before
    its next call: W raises, and its way out finds the lease W's and hands it to the next waiter,
    with the next token; nothing is held by nobody."""
    key = "app.r:interrupted-grant"
    holder = idle_backend.acquire(key, ttl=30, timeout=0)
    client = idle_backend.client
    blpop = client.blpop

    def woken_then_interrupted(keys: list[str], timeout: float) -> Any:
        enqueue(idle_backend, key, "next")  # queued behind W
        assert idle_backend.release(key, holder.owner)  # the grant lands on W
        assert blpop(keys, timeout=timeout)  # W is woken by it ...
        raise KeyboardInterrupt  # ... and interrupted before its next call

    monkeypatch.setattr(client, "blpop", woken_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        idle_backend.acquire(key, ttl=30, timeout=60)
    monkeypatch.undo()
    assert idle_backend.describe(key)["owner"] == "next"
    assert queued(idle_backend, key) == []
    assert enqueue(idle_backend, key, "next") == [1, holder.fencing_token + 2]
    assert idle_backend.release(key, "next")


def test_a_lost_wake_up_costs_one_wait_never_the_grant():
    """The wake-up list is only a doorbell. W1 is granted the lease and its wake-up is lost
    (evicted, a failover): W1 sleeps out its wait, which is at most half the grace, so its next
    call still finds the grant its own (this is that call, made with the wait's bound), and W2 is
    not served before it."""
    b = redis_backend_for(django_settings.REDIS_URL, HANDOVER_GRACE=0.4, SOCKET_TIMEOUT=5)
    try:
        key = "app.r:lost-doorbell"
        assert b._max_wait <= b.config.handover_grace / 2  # a waiter calls again before its grant lapses
        holder = b.acquire(key, ttl=30, timeout=0)
        enqueue(b, key, "w1")
        enqueue(b, key, "w2")
        assert b.release(key, holder.owner)  # granted to w1
        b.client.delete(b._queue_keys(key)[2] + "w1")  # the doorbell is lost
        # What w1 does meanwhile: it blocks on its list for one wait, and nothing wakes it.
        assert b.client.blpop([b._queue_keys(key)[2] + "w1"], timeout=b._max_wait) is None
        assert enqueue(b, key, "w1")[0] == 1  # w1's next call: still its turn
    finally:
        b.close()


def test_a_refused_holder_cannot_re_anchor_once_its_lease_was_granted_to_a_waiter(idle_backend):
    """A's counter is gone (a Redis restart kept the lock but not the counter, or an eviction) and
    A's lease ran out; a newcomer's call granted the free lease to the queued waiter W. A, refused
    at its first judgement, asks to re-anchor: Redis says the lock is W's, so A stays refused; W's
    extension carries the restarted token, and W re-anchors above the mark."""
    key = "app.r:reanchor-grant"
    client = idle_backend.client
    lock_key, _, counter = idle_backend._keys(key)
    a = idle_backend.acquire(key, ttl=30, timeout=0)
    enqueue(idle_backend, key, "w")
    client.delete(counter)
    client.delete(lock_key)  # A's lease ran out
    with pytest.raises(LockTimeout):
        idle_backend.acquire(key, ttl=30, timeout=0)  # a newcomer: grants the free lease to W
    assert idle_backend.describe(key)["owner"] == "w"
    assert idle_backend.reanchor(key, a.owner, 50) is None  # A: genuinely stale
    assert enqueue(idle_backend, key, "w") == [1, 1]  # W's extension: the token minted for it
    assert idle_backend.reanchor(key, "w", 50) == 51
    assert client.pttl(counter) >= client.pttl(lock_key) > 0
    assert idle_backend.release(key, "w")
