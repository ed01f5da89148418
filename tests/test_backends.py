"""The lease backends on their own: the Redis backend against a real Redis (its logic is Lua, so a
fake without a Lua interpreter would test nothing), the ways it gets a client, and the in-process
LocalLockBackend."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
import uuid
from typing import Any

import pytest
import redis as redis_py
from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured

from dsm_redis import LockBackendUnavailable, LockTimeout
from dsm_redis.backends import LeaseInfo, get_backend
from dsm_redis.backends.local import LocalLockBackend
from dsm_redis.backends.redis import RedisLockBackend
from dsm_redis.conf import parse
from dsm_redis.keys import counter_key, redis_name
from dsm_redis.tools.servers import RedisServer, _free_port
from tests.helpers import WAIT, dsm_options, redis_backend_for, wait_for
from tests.procs import in_background


@pytest.fixture
def redis_backend():
    b = redis_backend_for(django_settings.REDIS_URL)
    yield b
    b.close()


# -- the Redis backend's protocol ------------------------------------------------------------------


def test_tokens_increase_and_only_the_owner_renews_or_releases(redis_backend, redis):
    first = redis_backend.acquire("app.m:1", ttl=10, timeout=0)
    assert redis_backend.renew("app.m:1", first.owner, 10)
    assert not redis_backend.renew("app.m:1", "someone-else", 10)
    assert not redis_backend.release("app.m:1", "someone-else")
    with pytest.raises(LockTimeout):
        redis_backend.acquire("app.m:1", ttl=10, timeout=0)
    assert redis_backend.release("app.m:1", first.owner)
    assert not redis_backend.release("app.m:1", first.owner)  # already gone: False, never raises
    second = redis_backend.acquire("app.m:1", ttl=10, timeout=0)
    assert second.fencing_token == first.fencing_token + 1
    assert second.owner != first.owner
    redis_backend.release("app.m:1", second.owner)


def test_describe_reports_owner_ttl_and_counter(redis_backend):
    assert redis_backend.describe("app.m:2") == {"owner": None, "ttl": None, "fencing_token": None}
    grant = redis_backend.acquire("app.m:2", ttl=10, timeout=0)
    info = redis_backend.describe("app.m:2")
    assert info["owner"] == grant.owner and info["fencing_token"] == grant.fencing_token
    assert 0 < info["ttl"] <= 10
    redis_backend.release("app.m:2", grant.owner)
    assert redis_backend.describe("app.m:2")["owner"] is None


def test_reanchor_moves_a_lost_counter_above_the_floor_for_the_owner_only(redis_backend, redis):
    grant = redis_backend.acquire("app.m:3", ttl=10, timeout=0)
    redis.delete(counter_key(redis_backend.config.key_prefix, "app.m:3"))  # Redis lost the counter
    assert redis_backend.reanchor("app.m:3", "not-the-owner", 41) is None
    assert redis_backend.reanchor("app.m:3", grant.owner, 41) == 42
    redis_backend.release("app.m:3", grant.owner)
    assert redis_backend.acquire("app.m:3", ttl=10, timeout=0).fencing_token == 43


def test_release_wakes_a_waiter_through_the_signal_list(redis_backend):
    grant = redis_backend.acquire("app.m:4", ttl=30, timeout=0)
    signal = f"lock-signal:{redis_name(redis_backend.config.key_prefix, 'app.m:4')}"
    waiter = redis_py.Redis.from_url(django_settings.REDIS_URL)
    woken: list[Any] = []
    thread = threading.Thread(target=lambda: woken.append(waiter.blpop([signal], timeout=60)))
    thread.start()
    assert redis_backend.release("app.m:4", grant.owner)
    thread.join(90)
    waiter.close()
    assert woken and woken[0] is not None  # the UNLOCK script pushed the wake-up signal


def test_a_demoted_primarys_answer_drops_idle_connections_not_another_threads_blocked_wait(redis, monkeypatch):
    """After a failover a call that meets READONLY drops the pool's connections and retries (they
    point at the demoted primary). Only the idle ones: a connection another thread is blocked on
    (a waiter's BLPOP) is that thread's to drop when its own command fails; closed under it, the
    command is cut and sent again by redis-py, on a healthy server too."""
    # A BLPOP of 5 s (half the socket timeout): the waiter stays blocked on its connection meanwhile.
    backend = redis_backend_for(django_settings.REDIS_URL, HANDOVER_GRACE=60, SOCKET_TIMEOUT=10)
    try:
        held = backend.acquire("app.m:11", ttl=60, timeout=0)
        blocked_before = {c["id"] for c in redis.client_list() if c["cmd"] == "blpop"}
        grants: list[Any] = []
        joined = in_background(lambda: grants.append(backend.acquire("app.m:11", ttl=60, timeout=WAIT)))
        wait_for(
            lambda: {c["id"] for c in redis.client_list() if c["cmd"] == "blpop"} - blocked_before,
            "the waiter to block on its connection",
        )
        (waiter,) = {c["id"] for c in redis.client_list() if c["cmd"] == "blpop"} - blocked_before
        renew, answered = backend._scripts["renew"], []

        def demoted_once(**kwargs: Any) -> Any:
            if not answered:
                answered.append(True)
                raise redis_py.ResponseError("READONLY You can't write against a read only replica.")
            return renew(**kwargs)

        monkeypatch.setitem(backend._scripts, "renew", demoted_once)
        assert backend.renew("app.m:11", held.owner, 60)  # met READONLY, dropped, retried
        assert backend.release("app.m:11", held.owner)  # handed over to the waiter
        joined()
        assert grants and grants[0].fencing_token > held.fencing_token
        assert waiter in {c["id"] for c in redis.client_list()}  # its connection was never closed under it
    finally:
        backend.close()


def test_a_wait_for_a_lease_is_logged_at_debug(redis_backend, redis, caplog):
    caplog.set_level("DEBUG", logger="dsm_redis")
    first = redis_backend.acquire("app.m:6", ttl=60, timeout=0)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(redis_backend.acquire("app.m:6", ttl=10, timeout=60)))
    thread.start()
    for _ in range(6000):  # until the waiter blocks on the wake-up list (bounded, not timed)
        if any(c.get("cmd") == "blpop" for c in redis.client_list()) or not thread.is_alive():
            break
        time.sleep(0.01)
    redis_backend.release("app.m:6", first.owner)
    thread.join(90)
    waited = [r for r in caplog.records if r.name == "dsm_redis" and "acquired after waiting" in r.getMessage()]
    assert got and waited and {r.levelname for r in waited} == {"DEBUG"}
    assert "app.m:6" in waited[0].getMessage()
    redis_backend.release("app.m:6", got[0].owner)


def test_iter_leases_lists_this_prefix_only_with_glob_characters_taken_literally(redis):
    star = redis_backend_for(django_settings.REDIS_URL, prefix=f"g*{uuid.uuid4().hex[:6]}")
    other = redis_backend_for(django_settings.REDIS_URL, prefix=star.config.key_prefix.replace("*", "x"))
    nested = redis_backend_for(django_settings.REDIS_URL, prefix=star.config.key_prefix + ":deeper")
    try:
        mine = [star.acquire(f"app.m:{pk}", ttl=10, timeout=0) for pk in (1, 2)]
        other.acquire("app.m:1", ttl=10, timeout=0)
        nested.acquire("app.m:9", ttl=10, timeout=0)
        leases = list(star.iter_leases())
        assert [lease.key for lease in leases] == ["app.m:1", "app.m:2"]
        assert all(isinstance(lease, LeaseInfo) for lease in leases)
        assert [lease.owner for lease in leases] == [g.owner for g in mine]
        assert [lease.fencing_token for lease in leases] == [1, 1]
        assert all(0 < (lease.ttl or 0) <= 10 for lease in leases)
    finally:
        for b in (star, other, nested):
            for key in redis.scan_iter(match=f"*{b.config.key_prefix}*"):
                redis.delete(key)
            b.close()


def test_a_pk_with_braces_keeps_every_key_of_the_object_in_one_hash_slot(redis_backend, redis):
    from redis.cluster import key_slot

    key = "app.m:we{ird}pk"
    grant = redis_backend.acquire(key, ttl=10, timeout=0)
    lock, signal = (f"{kind}:{redis_name(redis_backend.config.key_prefix, key)}" for kind in ("lock", "lock-signal"))
    counter = counter_key(redis_backend.config.key_prefix, key)
    assert len({key_slot(k.encode()) for k in (lock, signal, counter)}) == 1
    assert [lease.key for lease in redis_backend.iter_leases()] == [key]
    redis_backend.release(key, grant.owner)


def test_release_uses_the_backends_own_client_and_leaves_python_redis_lock_usable(redis):
    """python-redis-lock registers its scripts once per process, on the first client it sees and on
    the class it is called through. The backend keeps Script objects of its own per client, so a
    second Redis gets its own release, and a plain ``redis_lock.Lock`` in the same process works."""
    import redis_lock

    first = redis_backend_for(django_settings.REDIS_URL)
    grant = first.acquire("app.m:1", ttl=30, timeout=0)
    assert first.release("app.m:1", grant.owner)
    with RedisServer() as server:
        second = redis_backend_for(server.url)
        grant = second.acquire("app.m:5", ttl=30, timeout=0)
        assert second.release("app.m:5", grant.owner)
        assert second.describe("app.m:5")["owner"] is None
        second.close()
    first.close()
    user_lock = redis_lock.Lock(redis, f"user-{uuid.uuid4().hex}", expire=30)
    assert user_lock.acquire(blocking=False)
    user_lock.release()  # raised TypeError when the scripts had been registered on a subclass


# -- where the client comes from --------------------------------------------------------------------


def test_location_is_read_lazily_and_a_factory_is_called_once_per_backend():
    calls: list[int] = []

    def factory():
        calls.append(1)
        return redis_py.Redis.from_url(django_settings.REDIS_URL)

    b = redis_backend_for(factory)
    assert calls == []  # nothing connects at construction
    grant = b.acquire("app.m:1", ttl=5, timeout=0)
    b.release("app.m:1", grant.owner)
    b.describe("app.m:1")
    assert calls == [1]
    b.close()


def test_a_django_redis_cache_alias_lends_its_client(settings):
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "locks": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": settings.REDIS_URL},
    }
    from django.core.cache import caches

    b = redis_backend_for("cache:locks")
    grant = b.acquire("app.m:1", ttl=5, timeout=0)
    assert b.client.connection_pool is caches["locks"]._cache._get_connection_pool(write=True)
    assert b.release("app.m:1", grant.owner)
    b.close()
    assert caches["locks"].set("still", "usable") is None  # close() left the cache's client alone


def test_a_django_redis_alias_lends_its_client(settings):
    pytest.importorskip("django_redis")
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "locks": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": settings.REDIS_URL},
    }
    from django.core.cache import caches

    b = redis_backend_for("cache:locks")
    grant = b.acquire("app.m:1", ttl=5, timeout=0)
    assert b.client is caches["locks"].client.get_client(write=True)
    assert b.release("app.m:1", grant.owner)
    b.close()


@pytest.mark.parametrize(
    ("caches", "match"),
    [
        ({"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}, "locks"),
        (
            {
                "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                "locks": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
            },
            "not a Redis cache",
        ),
    ],
)
def test_a_cache_alias_that_cannot_lend_a_client_is_improperly_configured(settings, caches, match):
    settings.CACHES = caches
    with pytest.raises(ImproperlyConfigured, match=match):
        redis_backend_for("cache:locks").acquire("app.m:1", ttl=5, timeout=0)


def _child_backend(queue: Any) -> None:
    try:
        backend = get_backend()
        assert isinstance(backend, RedisLockBackend)
        queue.put(("ok", id(backend), id(backend.client)))
    except BaseException:  # reported to the parent, which fails the test
        queue.put(("error", traceback.format_exc(), None))


def test_a_forked_child_builds_its_own_backend_and_client():
    parent = get_backend()
    parent.describe("app.m:1")  # the parent's client exists and is connected
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_backend, args=(queue,))
    child.start()
    status, backend_id, client_id = queue.get(timeout=60)
    child.join(30)
    assert status == "ok", backend_id
    assert backend_id != id(parent) and client_id != id(parent.client)


# -- Redis unreachable: "unavailable", and never a password in a message -----------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_unreachable_redis_is_unavailable_and_no_message_carries_the_password(scheme, caplog):
    caplog.set_level("DEBUG")
    b = redis_backend_for(f"{scheme}://user:s3cret-pw@127.0.0.1:{_free_port()}/0", SOCKET_CONNECT_TIMEOUT=0.5)
    with pytest.raises(LockBackendUnavailable) as info:
        b.acquire("app.m:1", ttl=5, timeout=0)
    everything = "".join(traceback.format_exception(info.value)) + caplog.text
    assert "s3cret-pw" not in everything
    b.close()


# -- LocalLockBackend --------------------------------------------------------------------------------


def local_options(**options: Any) -> dict[str, Any]:
    # The in-process table is shared per KEY_PREFIX (see below): each test gets a prefix of its own.
    return {
        "BACKEND": "dsm_redis.backends.local.LocalLockBackend",
        "OPTIONS": {"KEY_PREFIX": f"t-{uuid.uuid4().hex[:8]}", **options},
    }


@pytest.fixture
def local():
    return LocalLockBackend(parse(local_options()))


def test_local_backend_has_the_same_semantics(local):
    first = local.acquire("app.m:1", ttl=10, timeout=0)
    with pytest.raises(LockTimeout):
        local.acquire("app.m:1", ttl=10, timeout=0)
    assert local.renew("app.m:1", first.owner, 10) and not local.renew("app.m:1", "x", 10)
    assert not local.release("app.m:1", "x")
    assert local.describe("app.m:1")["owner"] == first.owner
    assert local.release("app.m:1", first.owner) and not local.release("app.m:1", first.owner)
    second = local.acquire("app.m:1", ttl=10, timeout=0)
    assert second.fencing_token == first.fencing_token + 1
    local.forget_counters()
    assert local.reanchor("app.m:1", "x", 7) is None
    assert local.reanchor("app.m:1", second.owner, 7) == 8


def test_local_backend_lease_expires_by_its_ttl(local):
    local.acquire("app.m:2", ttl=0.05, timeout=0)
    # Waits (bounded) until the first lease's TTL has run out; no one released it.
    grant = local.acquire("app.m:2", ttl=10, timeout=30)
    assert grant.fencing_token == 2


def test_local_backend_wakes_a_waiter_on_release(local):
    first = local.acquire("app.m:3", ttl=60, timeout=0)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(local.acquire("app.m:3", ttl=10, timeout=60)))
    thread.start()
    local.release("app.m:3", first.owner)
    thread.join(90)
    assert got and got[0].fencing_token == 2


def test_local_backend_lists_its_leases(local):
    grants = [local.acquire(f"app.m:{pk}", ttl=10, timeout=0) for pk in (2, 1)]
    leases = list(local.iter_leases())
    assert [lease.key for lease in leases] == ["app.m:1", "app.m:2"]
    assert [lease.owner for lease in leases] == [grants[1].owner, grants[0].owner]
    local.release("app.m:1", grants[1].owner)
    assert [lease.key for lease in local.iter_leases()] == ["app.m:2"]


def test_a_settings_change_keeps_leases_held_in_the_process_exclusive(settings):
    settings.DSM_REDIS = local_options()
    first = get_backend()
    grant = first.acquire("app.m:1", ttl=60, timeout=0)
    # Any change to DSM_REDIS (a test's override_settings, a reload) builds a new backend instance.
    dsm_options(settings, TTL=20)
    second = get_backend()
    assert second is not first
    with pytest.raises(LockTimeout):
        second.acquire("app.m:1", ttl=60, timeout=0)  # still held by the first holder
    assert second.release("app.m:1", grant.owner)
    assert second.acquire("app.m:1", ttl=60, timeout=0).fencing_token == grant.fencing_token + 1


# -- the backend's lifecycle -------------------------------------------------------------------------


def test_a_fork_while_another_thread_builds_the_backend_leaves_the_child_a_working_lock():
    from dsm_redis import backends

    inside, leave = threading.Event(), threading.Event()

    def builder() -> None:
        with backends._lock:  # another thread in the middle of get_backend() at the fork
            inside.set()
            leave.wait(120)

    thread = threading.Thread(target=builder)
    thread.start()
    try:
        assert inside.wait(120)
        pid = os.fork()
        if pid == 0:  # the child: its first transition needs get_backend()
            signal.alarm(60)  # a deadlocked child dies of SIGALRM instead of hanging the run
            code = 3
            try:
                code = 0 if isinstance(backends.get_backend(), RedisLockBackend) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        leave.set()
        thread.join()
    assert os.waitstatus_to_exitcode(status) == 0


# -- waiting for a lease -------------------------------------------------------------------------------


@pytest.mark.parametrize("pttl", [0, -2], ids=["expiring-now", "vanished"])
def test_a_waiter_told_the_lease_is_expiring_retries_at_once(redis_backend, pttl):
    """PTTL 0 (expiring this millisecond) or -2 (released between our SET and our PTTL): the lease
    is free now, so the waiter must not sleep on the signal list for half the socket timeout."""
    from dsm_redis.backends.redis import _MIN_WAIT

    real = redis_backend._scripts["acquire"]
    replies = iter([[0, pttl]])

    def acquire_script(**kwargs: Any) -> Any:
        return next(replies, None) or real(**kwargs)  # the first reply as if the lease were expiring

    redis_backend._scripts["acquire"] = acquire_script
    waits: list[float] = []
    real_blpop = redis_backend.client.blpop

    def blpop(keys: Any, timeout: float = 0) -> Any:
        waits.append(timeout)
        return real_blpop(keys, timeout=timeout)

    redis_backend.client.blpop = blpop
    grant = redis_backend.acquire("app.m:7", ttl=10, timeout=30)
    assert waits == [_MIN_WAIT]
    assert redis_backend._max_wait > _MIN_WAIT  # (what it slept before)
    redis_backend.release("app.m:7", grant.owner)


def test_the_wait_follows_the_holders_ttl_and_the_deadline():
    from dsm_redis.backends.redis import _MIN_WAIT, _wait_time

    assert _wait_time(0, max_wait=2.5, until_deadline=None) == _MIN_WAIT
    assert _wait_time(-2, max_wait=2.5, until_deadline=None) == _MIN_WAIT
    assert _wait_time(-1, max_wait=2.5, until_deadline=None) == 2.5  # no expiry: only a release wakes us
    assert _wait_time(800, max_wait=2.5, until_deadline=None) == 0.8
    assert _wait_time(8000, max_wait=2.5, until_deadline=None) == 2.5
    assert _wait_time(8000, max_wait=2.5, until_deadline=0.3) == 0.3
    assert _wait_time(8000, max_wait=2.5, until_deadline=0.0) == _MIN_WAIT


class Interrupted(BaseException):
    """Like Celery's SoftTimeLimitExceeded: raised into the worker wherever it happens to be."""


def test_an_interruption_while_reading_the_acquire_reply_gives_the_lease_back(redis_backend):
    real = redis_backend._scripts["acquire"]

    def acquire_then_interrupted(**kwargs: Any) -> Any:
        real(**kwargs)  # the script ran: the lease is set in Redis, with our owner id
        raise Interrupted()  # ... and the reply never reaches us

    redis_backend._scripts["acquire"] = acquire_then_interrupted
    with pytest.raises(Interrupted):
        redis_backend.acquire("app.m:8", ttl=60, timeout=0)
    assert redis_backend.describe("app.m:8")["owner"] is None  # not left to its 60 s TTL
    redis_backend._scripts["acquire"] = real
    redis_backend.release("app.m:8", redis_backend.acquire("app.m:8", ttl=60, timeout=0).owner)
