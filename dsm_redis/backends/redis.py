"""Redis lease backend: leases, their FIFO hand-over, and fencing counters, in Lua.

Key layout (every key of one object carries its ``{key}`` hash tag: one Redis Cluster slot, so one
script may touch them all): ``lock:<prefix>:{key}`` holds the owner id (python-redis-lock's
layout), ``<prefix>:{key}:fence`` the fencing counter, ``<prefix>:{key}:queue`` (a sorted set by
arrival) and ``<prefix>:{key}:waiters`` (each waiter's deadline) the waiters,
``<prefix>:{key}:grant:<owner>`` one waiter's wake-up list, and ``lock-signal:<prefix>:{key}``
python-redis-lock's wake-up list. The scripts read Redis ``TIME`` before writing: Redis 5 or later.

Clients: a ``redis://``/``rediss://``/``unix://`` URL, ``redis+cluster://`` (redis-py's
``RedisCluster``, which follows a failover by re-reading the slot map), ``redis+sentinel://``
(redis-py's ``Sentinel(...).master_for(service)``: each new connection asks the sentinels for the
primary; a connection still on a demoted primary is dropped when a script answers ``READONLY``,
which redis-py's Sentinel pool only notices for plain commands, or a wait answers ``UNBLOCKED``;
the asyncio calls alike), ``cache:<alias>`` or a callable.
With ``REPLICA_ACKS``, a granted lease is returned only once ``WAIT`` counts that many replicas
holding it; otherwise it is given back and ``LockNotReplicated`` raised. ``WAIT`` counts the
replicas holding the writes of *its own connection*, so it is pipelined behind the acquire script,
on one connection, and never sent alone: a reconnect between the two (a failover; another
coroutine's drop of the pool) would let it count another server's replicas, or another
connection's writes, for a lease they never saw. A failover that cuts it (``UNBLOCKED``) sends
both again. The asyncio calls do the same, except on Redis Cluster, where they refuse
``REPLICA_ACKS`` (``ImproperlyConfigured``).

Safety contract: at most one owner per key at any instant *according to Redis*. Redis can lose a
key (restart without persistence, failover, eviction, an idle counter's expiry), so the lease
alone is not a safety guarantee; the fencing token, judged by the database, is (see ``fence.py``).

Acquire and hand-over (``lua/acquire.lua``, ``lua/release.lua``, ``lua/queue.lua``):

- A free lease with nobody queued is taken, and its token minted, in one round trip. A newcomer
  that finds the lease held, *or free with a live waiter queued*, joins the queue: it never
  overtakes an older waiter (first come, first served). Free with a waiter queued means a grant
  lapsed or a holder died; the caller's script grants it to the oldest waiter then.
- Release hands the lease to the oldest waiter whose deadline has not passed, inside the release
  script: the lock is set to that waiter's owner id, its token minted there, and the waiter woken
  on its own list. Its grant lasts ``HANDOVER_GRACE`` only: the waiter's first act is its next
  acquire call, which finds the lock already its own and extends it to its TTL. So a waiter that
  died after its last call holds the object for the grace, never for a TTL; and its local
  ``valid_until`` is measured from before *that* call, which set the TTL Redis holds.
- Each waiter's entry carries a deadline in the Redis server's clock (never compared with a
  client's), renewed by each of its calls: until its next call is due (it blocks at most
  ``_max_wait``) plus the grace, and never past its own ``ACQUIRE_TIMEOUT``. Entries past their
  deadline are skipped and dropped by whoever looks at the queue: a waiter SIGKILLed while queued
  delays nobody past its deadline. ``ACQUIRE_TIMEOUT=None`` renews forever; ``0`` never queues.
- A waiter that gives up (its timeout, an exception, an interrupt landing anywhere in the wait)
  calls the release script for its owner id: it leaves the queue and, if a grant reached it too
  late, hands the lease on at once. If that call cannot reach Redis, its entry lapses at its
  deadline and a late grant after the grace: never a key held for a TTL by nobody.
- A lost reply or a retried call: acquire is idempotent per owner id (a call that finds the lock
  its own returns the current token and extends; a queued waiter keeps its place); release of a
  lease already handed over finds the lock someone else's and does nothing. The wake-up lists are
  only a doorbell: the lock's value is the truth, read by the waiter's next call, so a wake-up
  lost or missed (evicted, a failover) costs at most one wait (``_max_wait``), never the grant:
  a wait is at most half ``HANDOVER_GRACE``, so the waiter's next call comes before its grant
  lapses (short of a process stalled longer than that: then the grant lapses, the lease goes to
  the next waiter, and the late one queues again at the back; never safety).
- Redis restarted with waiters queued: lost queue keys mean a waiter's next call (at most
  ``_max_wait`` later) finds the lease free and takes it or queues again; stale ones (restored
  from disk) carry deadlines in the past, or a bounded one on a failover target whose clock is
  behind. The queue and deadline keys expire after the latest deadline in them.

Fencing counters: minted by INCR, so strictly increasing per object while the counter lives. With
``COUNTER_IDLE_TTL`` every acquire, extension, renewal, hand-over, re-anchor and release pushes
the counter's expiry back, and never to before the expiry of the lease it sets: a counter must not
run out under a live lease (the next lease would be re-anchored just above the database's mark,
possibly *below* the token of a holder that lost its lease before writing, whose late commit would
then be accepted). An object unused that long loses its counter, so Redis memory stays bounded by
the objects in use; a holder stalled for longer than ``COUNTER_IDLE_TTL`` past its lease, before
its first write, is the one case the mark cannot refuse. The next lease then mints a
low token, which the database's mark refuses at the lease's first judgement; Redis confirms the
owner and re-anchors the counter above the mark (``fence.py``): the same path as a Redis restart,
one extra round trip to each of Redis and the database, once per idle period. Tokens are not
seeded from Redis's clock (which would skip that re-anchor): a token would no longer count the
leases of an object, and a failover to a host whose clock is behind would re-anchor anyway.

During a rolling upgrade, a process of the previous version neither queues nor hands over: it can
overtake waiters, and a waiter may wait up to ``_max_wait`` for a release that did not wake it.
At most one owner per key still holds: every version sets the lock only where it is free.

asyncio (``for_asyncio()``, ``_AsyncRedisLeases``): the same scripts through ``redis.asyncio``, one
client per event loop. A waiter awaits its wake-up list and holds no thread; the coroutines of one
loop that want the same object pass a gate on the loop first, so one of them at a time is queued
in Redis (one blocked connection per object and loop). Cancellation leaves the queue as giving up
does.

Kept from python-redis-lock: its lock key layout, and the signal on release when no waiter of ours
takes the lease (a ``redis_lock.Lock`` client on the same name is woken as its UNLOCK would).
Not inherited (its traps): timeouts are milliseconds end to end (it truncates ``0.5`` to ``0`` and
so to "no expiry"/"forever"); acquire and fencing-token minting are one Lua call (it first spends a
round trip on a GET); renewal is done by ``renewer.py``, which marks a lease lost when it
cannot renew (its thread dies silently); release returns False instead of raising ``NotAcquired``
(which would mask the body's exception).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from base64 import b64encode
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from functools import cached_property, partial
from importlib import resources
from os import urandom
from typing import Any, TypeVar

import redis
from django.core.exceptions import ImproperlyConfigured
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, NoScriptError, RedisClusterException
from redis.retry import Retry

from ..conf import Config, parse_sentinel_location
from ..exceptions import LockBackendUnavailable, LockNotReplicated, LockTimeout
from ..keys import counter_key, redis_name
from . import AsyncLeases, Grant, LeaseInfo, LockBackend, shielded

logger = logging.getLogger("dsm_redis")
T = TypeVar("T")

# A BLPOP never outlasts the socket timeout (redis-py would call it a dead connection).
_MIN_WAIT = 0.005


def _lua(name: str) -> str:
    return (resources.files("dsm_redis") / "lua" / f"{name}.lua").read_text()


def _script_texts() -> dict[str, str]:
    """Each script's text, for the blocking and the asyncio client alike (one copy of the Lua)."""
    texts = {name: _lua(name) for name in ("renew", "reanchor", "holders")}
    # The queue's functions run inside each script that uses them: one atomic call each.
    for name in ("acquire", "release"):
        texts[name] = _lua("queue") + "\n" + _lua(name)
    return texts


def _new_owner() -> str:
    # python-redis-lock's owner id: 18 random bytes, base64 (no braces: a waiter's wake-up list,
    # named after it, keeps the object's hash tag).
    return b64encode(urandom(18)).decode("ascii")


# Redis connections of one event loop's asyncio leases: calls in flight, and one waiter per busy object.
_ASYNC_CONNECTIONS = 256

# python-redis-lock's signal-list lifetime after a release (ms): long enough for a waiter that was
# between its failed SET and its BLPOP to still find the wake-up.
_SIGNAL_EXPIRE_MS = 1000


def _ttl_ms(ttl: float) -> int:
    """A lease TTL in whole milliseconds, rounded up: the caller's ``valid_until`` (``sent + ttl``)
    must never exceed what Redis holds, and truncating ``30.0004`` to 30000 ms would let it."""
    return max(1, math.ceil(ttl * 1000))


def _wait_time(pttl_ms: int, max_wait: float, until_deadline: float | None) -> float:
    """How long a waiter blocks on the signal list, given the holder's PTTL from the acquire script.

    It sleeps until a release pushes a signal, the holder's TTL runs out (a crashed holder pushes
    nothing), or its deadline: whichever is first. PTTL 0 (expiring this millisecond) and -2 (the
    key vanished between the script's SET and its PTTL) mean the lease is free now: retry at once
    rather than sleep up to ``max_wait`` for a signal that will never come. -1 (a key without
    expiry, e.g. set by hand) only a release can end.
    """
    if pttl_ms == -1:
        wait = max_wait
    elif pttl_ms <= 0:
        wait = _MIN_WAIT
    else:
        wait = min(max_wait, pttl_ms / 1000)
    if until_deadline is not None:
        wait = min(wait, until_deadline)
    return max(wait, _MIN_WAIT)


class RedisLockBackend(LockBackend):
    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._location = config.location
        self._sentinel: Any = None  # the redis.sentinel.Sentinel behind a redis+sentinel:// client
        self._loops: dict[asyncio.AbstractEventLoop, _AsyncRedisLeases] = {}  # for_asyncio()
        self._loops_lock = threading.Lock()

    # -- client ----------------------------------------------------------------------------------

    @cached_property
    def client(self) -> Any:
        location = self._location
        if callable(location):
            return location()
        if location.startswith("cache:"):
            return _client_from_cache(location[len("cache:") :])
        options: dict[str, Any] = {
            "socket_timeout": self.config.socket_timeout,
            "socket_connect_timeout": self.config.socket_connect_timeout,
            # One retry on a broken pooled connection (e.g. Redis restarted); not on timeouts.
            "retry": Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        }
        scheme, sep, rest = location.partition("://")
        if scheme.lower().endswith("+sentinel"):
            return self._sentinel_client(location, options)
        if scheme.lower().endswith("+cluster"):
            from redis.cluster import RedisCluster

            # One node's URL; the client discovers the others (CLUSTER SLOTS) and routes by slot. It
            # connects at once: an unreachable cluster is "unavailable", as for any other command.
            return self._call(
                "connect to the Redis Cluster",
                lambda: RedisCluster.from_url(f"{scheme[: -len('+cluster')]}{sep}{rest}", **options),
            )
        return redis.Redis.from_url(location, **options)

    def _sentinel_client(self, location: str, options: dict[str, Any]) -> Any:
        """A client bound to the Sentinel service's primary: its pool asks the sentinels where the
        primary is at each new connection, and drops a connection that finds its server demoted
        (READONLY), so it follows a failover."""
        from redis.sentinel import Sentinel

        where = parse_sentinel_location(location)
        self._sentinel = Sentinel(
            list(where.sentinels), sentinel_kwargs=self._sentinel_kwargs(where, options, Retry(NoBackoff(), 0))
        )
        return self._sentinel.master_for(
            where.service, db=where.db, username=where.username, password=where.password, **options
        )

    @cached_property
    def _scripts(self) -> dict[str, Any]:
        return {name: self.client.register_script(text) for name, text in _script_texts().items()}

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            try:
                return fn()
            except redis.ResponseError as exc:
                if not _demoted(exc):
                    raise
                # Our connections reach a demoted primary (a failover). A write inside a script
                # comes back as a script error, which redis-py's Sentinel pool does not take for
                # READONLY: drop them, so the next one asks the sentinels where the primary is.
                # Once: the script stopped at its first write, so it changed nothing; a BLPOP
                # unblocked by the demotion popped nothing, and waits on in the new primary; an
                # acquire script and its WAIT are sent again together.
                self._drop_connections()
                return fn()
        except (redis.ConnectionError, redis.TimeoutError, ClusterDownError, RedisClusterException) as exc:
            # Never echo the URL: it may carry a password.
            raise LockBackendUnavailable(f"Redis unreachable while trying to {what}: {type(exc).__name__}") from exc
        except redis.RedisError as exc:
            # A replica after failover (READONLY), OOM, LOADING...: Redis answered but cannot serve
            # leases. Its message names no host or password.
            raise LockBackendUnavailable(f"Redis refused to {what}: {type(exc).__name__}: {exc}") from exc

    def _drop_connections(self) -> None:
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            logger.warning("Redis answered as a demoted primary (a failover): reconnecting to the primary")
            # Where the primary is now, first: a Sentinel pool then refuses a connection to another
            # server when it comes back. Else one in use on the demoted primary during the drop
            # (another thread's command in flight) would return to the pool after it, and the
            # caller's one retry could draw it and meet READONLY again.
            locate = getattr(pool, "get_master_address", None)
            if locate is not None:
                locate()
            # The idle ones only: a connection another thread is blocked on (a waiter's BLPOP) is
            # that thread's to drop when its own command meets the demotion (READONLY, UNBLOCKED);
            # closed under it, its wait is cut and reconnected, on a healthy server too.
            pool.disconnect(inuse_connections=False)

    @cached_property
    def _max_wait(self) -> float:
        """Longest BLPOP: under the client's real socket timeout, or redis-py calls it dead; and at
        most half the hand-over grace, so a waiter whose wake-up was lost (evicted, a failover) calls
        again, and collects its grant, before the grant lapses."""
        kwargs = getattr(getattr(self.client, "connection_pool", None), "connection_kwargs", {})
        timeout = kwargs.get("socket_timeout") or self.config.socket_timeout
        return max(_MIN_WAIT, min(float(timeout), self.config.handover_grace) / 2)

    def _keys(self, key: str) -> tuple[str, str, str]:
        name = redis_name(self.config.key_prefix, key)
        return f"lock:{name}", f"lock-signal:{name}", counter_key(self.config.key_prefix, key)

    def _queue_keys(self, key: str) -> tuple[str, str, str]:
        """The waiters (by arrival), their deadlines, and the prefix of a waiter's wake-up list."""
        name = redis_name(self.config.key_prefix, key)
        return f"{name}:queue", f"{name}:waiters", f"{name}:grant:"

    @cached_property
    def _grace_ms(self) -> int:
        return max(1, int(self.config.handover_grace * 1000))

    @cached_property
    def _idle_ms(self) -> int:
        idle = self.config.counter_idle_ttl
        return 0 if idle is None else max(1, int(idle * 1000))

    # -- LockBackend -----------------------------------------------------------------------------

    def acquire(self, key: str, *, ttl: float, timeout: float | None) -> Grant:
        lock_key, _, counter = self._keys(key)
        queue, waiters, grant_prefix = self._queue_keys(key)
        owner = _new_owner()
        wake = grant_prefix + owner
        ttl_ms = _ttl_ms(ttl)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        waited = queued = False
        try:
            while True:
                sent = time.monotonic()
                stay_ms = self._stay_ms(None if deadline is None else deadline - sent)
                queued = queued or stay_ms > 0
                ok, value = self._acquire_once(
                    key,
                    keys=[lock_key, counter, queue, waiters, wake],
                    args=[owner, ttl_ms, stay_ms, self._grace_ms, self._idle_ms, grant_prefix],
                    polling=waited,
                )
                if ok:
                    if waited:
                        logger.debug("lease on %s acquired after waiting %.3fs (token %s)", key, sent - started, value)
                    # Measured from before this call: it set (or extended a hand-over to) the TTL.
                    return Grant(owner=owner, fencing_token=int(value), valid_until=sent + ttl)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                waited = True
                wait = _wait_time(int(value), self._max_wait, None if deadline is None else deadline - now)
                # Woken by a hand-over (the lease is ours already), or at the holder's TTL or our
                # deadline; the next call tells which.
                self._call("wait for a lease", partial(self.client.blpop, [wake], timeout=wait))
        except BaseException:
            # The reply was lost (Redis unreachable) or never read (Celery's
            # SoftTimeLimitExceeded, KeyboardInterrupt... landing while we waited for it or for a
            # wake-up), but the script may have run or a release may have handed us the lease:
            # leave the queue and give back a lease nobody would otherwise release (owner-checked,
            # so never someone else's), then let the exception go on.
            self._leave(key, owner)
            raise
        # Timed out: leave the queue, and hand on a grant that reached us after our last call (a
        # zero timeout never queued, so nothing can have been granted to it).
        if queued:
            self._leave(key, owner)
        raise LockTimeout(f"lease on {key} not acquired within {timeout}s")

    def _acquire_once(self, key: str, *, keys: list[str], args: list[Any], polling: bool) -> tuple[int, Any]:
        """One call of the acquire script; with ``REPLICA_ACKS``, a lease it grants is only returned
        once that many replicas acknowledged it (``WAIT``), else ``LockNotReplicated`` (the
        caller's ``acquire`` gives the lease back on the way out).

        The first call sends the script and its ``WAIT`` together (most leases are uncontended: one
        round trip; a contended first call waits for the replicas too). A waiter's poll
        (``polling``) sends the script alone, so its polls of a lease still held never wait for the
        replicas; a poll that finds the lease its own sends both again (the
        script then extends it: a write behind the grant in the replication stream, on the WAIT's
        connection)."""
        script = self._scripts["acquire"]
        needed = self.config.replica_acks
        if not needed or polling:
            ok, value = self._call("acquire a lease", partial(script, keys=keys, args=args))
            if not needed or not ok:
                return ok, value
        wait = ("WAIT", needed, max(1, int(self.config.replica_ack_timeout * 1000)))
        primary = self._primary_client(keys[0])

        def acquire_and_wait() -> tuple[tuple[int, Any], int]:
            for _ in range(2):  # once more after loading the script into a server that lacks it
                pipe = primary.pipeline(transaction=False)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command(*wait)
                replies = pipe.execute(raise_on_error=False)
                if not isinstance(replies[0], NoScriptError):
                    break
                primary.script_load(script.script)
            return _granted_and_acked(replies)

        try:
            (ok, value), acked = self._call("acquire a lease", acquire_and_wait)
        except LockBackendUnavailable:
            self._refresh_cluster_slots()
            raise
        if ok and acked < needed:
            raise self._not_replicated(key, acked)
        return ok, value

    def _not_replicated(self, key: str, acked: int) -> LockNotReplicated:
        needed, timeout = self.config.replica_acks, self.config.replica_ack_timeout
        logger.warning(
            "lease on %s reached %d of the %d replicas REPLICA_ACKS asks for within %.3fs; given back",
            key, acked, needed, timeout,
        )  # fmt: skip
        return LockNotReplicated(
            f"lease on {key} acknowledged by {acked} of {needed} replicas within {timeout}s (REPLICA_ACKS); "
            "given back, nothing ran"
        )

    def _primary_client(self, lock_key: str) -> Any:
        """The client of the primary that serves ``lock_key``: on Redis Cluster the node that owns
        the key's slot (a WAIT, which names no key, must go there), else the backend's own."""
        client = self.client
        get_node = getattr(client, "get_node_from_key", None)
        if get_node is not None:
            client = get_node(lock_key).redis_connection
        return client

    def _refresh_cluster_slots(self) -> None:
        # A call on a node's own client bypasses the cluster client's MOVED and dead-node handling:
        # after a failover it must learn the new slot owners before the next call is routed.
        manager = getattr(self.client, "nodes_manager", None)
        if manager is not None:
            try:
                manager.initialize()
            except Exception:  # the next call reports the cluster unreachable itself
                logger.debug("refreshing the cluster's slot map failed", exc_info=True)

    def _stay_ms(self, remaining: float | None) -> int:
        """How long the waiter's queue entry lives without another call: 0 (never queued) for a
        zero timeout; else until its next call is due plus the grace, never past its own deadline."""
        if remaining is not None and remaining <= 0:
            return 0
        stay = self._max_wait + self.config.handover_grace
        if remaining is not None and remaining < stay:
            stay = remaining
        return max(1, int(stay * 1000))

    def _leave(self, key: str, owner: str) -> None:
        try:
            self.release(key, owner)
        except LockBackendUnavailable:
            pass  # the entry lapses at its deadline, a late grant after the grace

    def renew(self, key: str, owner: str, ttl: float) -> bool:
        lock_key, _, counter = self._keys(key)
        ttl_ms = _ttl_ms(ttl)
        return bool(
            self._call(
                "renew a lease",
                lambda: self._scripts["renew"](keys=[lock_key, counter], args=[owner, ttl_ms, self._idle_ms]),
            )
        )

    def release(self, key: str, owner: str) -> bool:
        lock_key, signal_key, counter = self._keys(key)
        queue, waiters, grant_prefix = self._queue_keys(key)
        # Owner-checked; hands the lease to the oldest live waiter, and takes the caller out of the
        # queue either way (a waiter giving up).
        released = self._call(
            "release a lease",
            lambda: self._scripts["release"](
                keys=[lock_key, counter, queue, waiters, signal_key],
                args=[owner, self._grace_ms, self._idle_ms, grant_prefix, _SIGNAL_EXPIRE_MS],
            ),
        )
        return bool(released)

    def reanchor(self, key: str, owner: str, floor: int) -> int | None:
        lock_key, _, counter = self._keys(key)
        token = self._call(
            "re-anchor a fencing counter",
            lambda: self._scripts["reanchor"](keys=[lock_key, counter], args=[owner, floor, self._idle_ms]),
        )
        return None if int(token) < 0 else int(token)

    def describe(self, key: str) -> dict[str, Any]:
        lock_key, _, counter = self._keys(key)
        return self._describe(lock_key, counter)

    def iter_leases(self) -> Iterator[LeaseInfo]:
        # SCAN every primary (redis-py's RedisCluster.scan_iter visits each one) for this prefix's
        # lock keys; the prefix is matched literally (glob characters escaped).
        prefix = self.config.key_prefix
        head = f"lock:{redis_name(prefix, '')[:-1]}"  # lock:<prefix>:{
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in head) + "*"
        names = self._call("list leases", lambda: list(self.client.scan_iter(match=pattern, count=1000)))
        for raw in sorted(n.decode() if isinstance(n, bytes) else str(n) for n in names):
            if not raw.endswith("}"):
                continue
            key = raw[len(head) : -1]
            info = self._describe(raw, counter_key(prefix, key))
            if info["owner"] is not None:  # not released since the scan saw it
                yield LeaseInfo(key=key, **info)

    def _describe(self, lock_key: str, counter: str) -> dict[str, Any]:
        owner, pttl, token = self._call("describe a lease", lambda: self._scripts["holders"](keys=[lock_key, counter]))
        return {
            "owner": owner.decode() if isinstance(owner, bytes) else owner or None,
            "ttl": pttl / 1000 if pttl and pttl > 0 else None,
            "fencing_token": int(token) if token else None,
        }

    def for_asyncio(self) -> AsyncLeases:
        """The lease calls on the running loop: ``redis.asyncio``, one client per event loop (its
        connections belong to the loop that opened them)."""
        loop = asyncio.get_running_loop()
        with self._loops_lock:
            leases = self._loops.get(loop)
            if leases is None:
                # Clients of loops closed since are dropped (their connections reference their loop:
                # kept, a process that runs one loop per call, as async_to_sync does, would pile them up).
                for closed in [other for other in self._loops if other.is_closed()]:
                    del self._loops[closed]
                leases = self._loops[loop] = _AsyncRedisLeases(self, self._async_client())
        return leases

    def _async_client(self) -> Any:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry as AsyncRetry

        options: dict[str, Any] = {
            "socket_timeout": self.config.socket_timeout,
            "socket_connect_timeout": self.config.socket_connect_timeout,
            "retry": AsyncRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        }
        location = self._location
        if not callable(location) and not location.startswith("cache:"):
            scheme, sep, rest = location.partition("://")
            if scheme.lower().endswith("+cluster"):
                if self.config.replica_acks:
                    # WAIT must follow the acquire script on its connection, and redis.asyncio's
                    # cluster client cannot send a keyless WAIT to the node that ran the script.
                    # Refused rather than granting leases no replica was asked to acknowledge.
                    raise ImproperlyConfigured(
                        "DSM_REDIS['OPTIONS']['REPLICA_ACKS'] is not supported by asyncio leases on Redis "
                        "Cluster yet (atransition_to, aobject_lock): use the blocking calls, or REPLICA_ACKS 0"
                    )
                return aioredis.RedisCluster.from_url(f"{scheme[: -len('+cluster')]}{sep}{rest}", **options)
            if scheme.lower().endswith("+sentinel"):
                return self._async_sentinel_client(location, options)
        # A waiter blocks one connection on its wake-up (one per object per loop: _AsyncRedisLeases'
        # gate). Past the pool's size, a call waits for a connection (bounded) instead of failing.
        pool_options: dict[str, Any] = {
            "max_connections": _ASYNC_CONNECTIONS,
            "timeout": self.config.socket_timeout + self._max_wait,
        }
        if callable(location) or location.startswith("cache:"):
            # A client built elsewhere: the same server, reached with the same credentials.
            kwargs = getattr(getattr(self.client, "connection_pool", None), "connection_kwargs", None)
            if kwargs is None or "host" not in kwargs:
                raise ImproperlyConfigured(
                    "DSM_REDIS['LOCATION']: asyncio leases need a redis:// URL, or a client on a host and port"
                )
            portable = {k: kwargs[k] for k in ("host", "port", "db", "username", "password") if k in kwargs}
            pool = aioredis.BlockingConnectionPool(**pool_options, **portable, **options)
        else:
            pool = aioredis.BlockingConnectionPool.from_url(location, **pool_options, **options)
        return aioredis.Redis(connection_pool=pool)

    def _sentinel_kwargs(self, where: Any, options: dict[str, Any], retry: Any) -> dict[str, Any]:
        """How the sentinels themselves are reached (``options``, for the primary, gains TLS too).
        No retries of their own (redis-py's default backs off for seconds): a sentinel that does not
        answer is skipped for the next one, and all of them down is "unavailable" at once."""
        kwargs: dict[str, Any] = {
            "socket_timeout": self.config.socket_timeout,
            "socket_connect_timeout": self.config.socket_connect_timeout,
            "username": where.sentinel_username,
            "password": where.sentinel_password,
            "retry": retry,
        }
        if where.ssl:
            kwargs["ssl"] = True
            options["ssl"] = True
        return kwargs

    def _async_sentinel_client(self, location: str, options: dict[str, Any]) -> Any:
        """``_sentinel_client`` on the running loop (``redis.asyncio.sentinel``): a pool that asks
        the sentinels where the primary is at each new connection."""
        from redis.asyncio.retry import Retry as AsyncRetry
        from redis.asyncio.sentinel import Sentinel as AsyncSentinel

        where = parse_sentinel_location(location)
        kwargs = self._sentinel_kwargs(where, options, AsyncRetry(NoBackoff(), 0))
        sentinel = AsyncSentinel(list(where.sentinels), sentinel_kwargs=kwargs)
        return sentinel.master_for(
            where.service,
            db=where.db,
            username=where.username,
            password=where.password,
            max_connections=_ASYNC_CONNECTIONS,
            **options,
        )

    def close(self) -> None:
        if "client" in self.__dict__ and not callable(self._location) and not str(self._location).startswith("cache:"):
            self.client.close()
        for sentinel in getattr(getattr(self, "_sentinel", None), "sentinels", ()):
            sentinel.close()
        self._sentinel = None
        self.__dict__.pop("client", None)
        self.__dict__.pop("_scripts", None)
        with self._loops_lock:
            self._loops.clear()  # their clients are dropped with their loops


class _AsyncRedisLeases:
    """A ``RedisLockBackend``'s acquire, renew and release on one event loop (``redis.asyncio``).

    The same scripts, keys and queue as the blocking calls above, so asyncio and blocking holders
    of one object queue in one FIFO. A waiter awaits its wake-up list (``BLPOP`` on a connection of
    its own) and holds no thread. Cancelled anywhere in ``acquire``, it leaves the queue and gives
    back a grant that reached it (the release script, owner-checked), shielded from a second
    cancellation; if Redis cannot be reached then, the entry lapses at its deadline.
    """

    def __init__(self, backend: RedisLockBackend, client: Any) -> None:
        self._backend = backend
        self.client = client
        self._scripts = {name: client.register_script(text) for name, text in _script_texts().items()}
        # key -> its gate (``_Gate``). Only the coroutine through an object's gate is in
        # Redis's queue: the others wait on the loop (FIFO, no connection, no Redis call), so a
        # hot object costs one waiting connection per loop, not one per coroutine.
        self._gates: dict[str, _Gate] = {}

    async def acquire(self, key: str, *, ttl: float, timeout: float | None) -> Grant:
        deadline = None if timeout is None else time.monotonic() + timeout
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate()
        gate.users += 1
        try:
            await gate.enter(key, timeout, deadline)
            try:
                return await self._acquire(key, ttl=ttl, deadline=deadline, timeout=timeout)
            finally:
                gate.leave()
        finally:
            gate.users -= 1
            if gate.users == 0 and self._gates.get(key) is gate:
                del self._gates[key]

    async def _call(self, what: str, work: Callable[[], Awaitable[T]]) -> T:
        try:
            try:
                return await work()
            except redis.ResponseError as exc:
                if not _demoted(exc):
                    raise
                # A pooled connection still on a demoted primary (a failover): kept, it would
                # answer READONLY to every call that draws it, for as long as the loop runs. As
                # RedisLockBackend._call: drop the pool's connections, so the next one asks the
                # sentinels where the primary is; once, since the script stopped at its first write.
                logger.warning("Redis answered as a demoted primary (a failover): reconnecting to the primary")
                pool = getattr(self.client, "connection_pool", None)
                if pool is not None:
                    await _drop_async_connections(pool)
                return await work()
        except (redis.ConnectionError, redis.TimeoutError, ClusterDownError, RedisClusterException) as exc:
            raise LockBackendUnavailable(f"Redis unreachable while trying to {what}: {type(exc).__name__}") from exc
        except redis.RedisError as exc:
            raise LockBackendUnavailable(f"Redis refused to {what}: {type(exc).__name__}: {exc}") from exc

    async def _acquire(self, key: str, *, ttl: float, deadline: float | None, timeout: float | None) -> Grant:
        backend = self._backend
        lock_key, _, counter = backend._keys(key)
        queue, waiters, grant_prefix = backend._queue_keys(key)
        owner = _new_owner()
        wake = grant_prefix + owner
        ttl_ms = _ttl_ms(ttl)
        queued = polling = False
        try:
            while True:
                sent = time.monotonic()
                stay_ms = backend._stay_ms(None if deadline is None else deadline - sent)
                queued = queued or stay_ms > 0
                ok, value = await self._acquire_once(
                    key,
                    keys=[lock_key, counter, queue, waiters, wake],
                    args=[owner, ttl_ms, stay_ms, backend._grace_ms, backend._idle_ms, grant_prefix],
                    polling=polling,
                )
                if ok:
                    return Grant(owner=owner, fencing_token=int(value), valid_until=sent + ttl)
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                polling = True
                wait = _wait_time(int(value), backend._max_wait, None if deadline is None else deadline - now)
                # Woken by a hand-over, the holder's TTL or our deadline; the next call tells which.
                await self._call("wait for a lease", partial(self.client.blpop, [wake], timeout=wait))
        except BaseException:
            # Cancelled (or the reply lost) while queued or just granted: leave nothing behind.
            await shielded(self._leave(key, owner))
            raise
        if queued:
            await self._leave(key, owner)
        raise LockTimeout(f"lease on {key} not acquired within {timeout}s")

    async def _acquire_once(self, key: str, *, keys: list[str], args: list[Any], polling: bool) -> tuple[int, Any]:
        """``RedisLockBackend._acquire_once`` on the loop. A cancellation while its script and WAIT
        are out lands in ``_acquire``'s give-back; redis.asyncio disconnects a connection whose
        replies were not read, so none goes back to the pool with a reply pending."""
        script = self._scripts["acquire"]
        config = self._backend.config
        needed = config.replica_acks
        if not needed or polling:
            ok, value = await self._call("acquire a lease", partial(script, keys=keys, args=args))
            if not needed or not ok:
                return ok, value
        wait = ("WAIT", needed, max(1, int(config.replica_ack_timeout * 1000)))

        async def acquire_and_wait() -> tuple[tuple[int, Any], int]:
            for _ in range(2):  # once more after loading the script into a server that lacks it
                pipe = self.client.pipeline(transaction=False)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.execute_command(*wait)
                replies = await pipe.execute(raise_on_error=False)
                if not isinstance(replies[0], NoScriptError):
                    break
                await self.client.script_load(script.script)
            return _granted_and_acked(replies)

        (ok, value), acked = await self._call("acquire a lease", acquire_and_wait)
        if ok and acked < needed:
            raise self._backend._not_replicated(key, acked)
        return ok, value

    async def _leave(self, key: str, owner: str) -> None:
        try:
            await self.release(key, owner)
        except LockBackendUnavailable:
            pass  # the entry lapses at its deadline, a late grant after the grace

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        lock_key, _, counter = self._backend._keys(key)
        return bool(
            await self._call(
                "renew a lease",
                partial(
                    self._scripts["renew"], keys=[lock_key, counter], args=[owner, _ttl_ms(ttl), self._backend._idle_ms]
                ),
            )
        )

    async def release(self, key: str, owner: str) -> bool:
        backend = self._backend
        lock_key, signal_key, counter = backend._keys(key)
        queue, waiters, grant_prefix = backend._queue_keys(key)
        return bool(
            await self._call(
                "release a lease",
                partial(
                    self._scripts["release"],
                    keys=[lock_key, counter, queue, waiters, signal_key],
                    args=[owner, backend._grace_ms, backend._idle_ms, grant_prefix, _SIGNAL_EXPIRE_MS],
                ),
            )
        )


async def _drop_async_connections(pool: Any) -> None:
    """``RedisLockBackend._drop_connections`` for a ``redis.asyncio`` pool, whose ``release()``
    keeps a connection to any server: one in use on the demoted primary during the drop (another
    coroutine's command in flight) would come back to the pool after it, and the retry would draw
    it and meet READONLY again. Marked, it is dropped when it comes back, its command not cut."""
    locate = getattr(pool, "get_master_address", None)
    if locate is not None:
        primary = await locate()
        # Other coroutines add to and take from the set only while this one awaits.
        for connection in list(getattr(pool, "_in_use_connections", ())):
            mark = getattr(connection, "mark_for_reconnect", None)  # absent from older redis-py
            if mark is not None and (connection.host, connection.port) != primary:
                mark()
    await pool.disconnect(inuse_connections=False)


def _demoted(exc: redis.ResponseError) -> bool:
    """Whether Redis answered as a primary a failover demoted: a write refused (READONLY, inside a
    script's error on Redis 6), a blocked BLPOP or WAIT released when it turned replica
    (UNBLOCKED), or a WAIT it refuses as a replica."""
    message = str(exc)
    return "READONLY" in message or message.startswith("UNBLOCKED") or "used with replica instances" in message


def _granted_and_acked(replies: list[Any]) -> tuple[tuple[int, Any], int]:
    """The replies of an acquire script and its WAIT, sent together on one connection (``WAIT``
    counts the replicas holding the writes of *its own connection*; sent alone after a reconnect,
    it would count another server's replicas, or another connection's writes: never).

    The script's reply, raised if it is an error (a demoted primary's is retried by ``_call``,
    script and WAIT together, on the promoted one), and how many replicas acknowledged it. A WAIT
    answered as by a demoted primary is raised too, for the same retry, when the script granted
    the lease (whose copy there the demotion throws away); any other error of the WAIT counts as no
    acknowledgement."""
    granted, acked = replies
    if isinstance(granted, Exception):
        raise granted
    if isinstance(acked, Exception):
        if granted[0] and isinstance(acked, redis.ResponseError) and _demoted(acked):
            raise acked
        return granted, 0
    return granted, int(acked)


class _Gate:
    """One object's gate on one loop (``_AsyncRedisLeases``): passed by one coroutine at a time, in
    arrival order, handed from one to the next directly.

    Not an ``asyncio.Lock``: released, a Lock stays unlocked until the waiter it woke runs, and a
    caller arriving in between queues behind that waiter inside ``Lock.acquire``, which takes no
    timeout: a ``timeout=0`` (or any bounded) caller would wait as long as that waiter's Redis wait.
    """

    __slots__ = ("passing", "turns", "users")

    def __init__(self) -> None:
        self.passing = False  # one coroutine is through; while False, nobody waits in ``turns``
        self.turns: deque[asyncio.Future[None]] = deque()  # the waiting coroutines, oldest first
        self.users = 0  # coroutines at or through the gate: the entry is dropped at 0

    async def enter(self, key: str, timeout: float | None, deadline: float | None) -> None:
        """Pass before ``deadline`` (``LockTimeout``); cancelled, never left holding the gate."""
        if not self.passing:
            self.passing = True  # free: taken without a switch
            return
        if timeout == 0:
            raise LockTimeout(f"lease on {key} not acquired within {timeout}s")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.turns.append(turn)
        try:
            done, _ = await asyncio.wait([turn], timeout=None if deadline is None else deadline - time.monotonic())
        except BaseException:
            self._withdraw(turn)
            raise
        if not done:
            self._withdraw(turn)
            raise LockTimeout(f"lease on {key} not acquired within {timeout}s")

    def _withdraw(self, turn: asyncio.Future[None]) -> None:
        if turn.done():
            self.leave()  # handed to us as we gave up: hand it on
        else:
            turn.cancel()
            self.turns.remove(turn)

    def leave(self) -> None:
        """The coroutine through the gate is done with Redis: hand the gate to the oldest waiter."""
        while self.turns:
            turn = self.turns.popleft()
            if not turn.done():
                turn.set_result(None)  # ``passing`` stays True: handed over, never free in between
                return
        self.passing = False


def _client_from_cache(alias: str) -> Any:
    """The redis-py client behind a ``CACHES`` alias (django-redis or Django's ``RedisCache``)."""
    from django.core.cache import caches

    cache = caches[alias]
    inner = getattr(cache, "_cache", None)
    if inner is not None and hasattr(inner, "get_client"):  # django.core.cache.backends.redis
        return inner.get_client(write=True)
    client = getattr(cache, "client", None)
    if client is not None and hasattr(client, "get_client"):  # django-redis
        return client.get_client(write=True)
    raise ImproperlyConfigured(
        f"DSM_REDIS['LOCATION']: CACHES[{alias!r}] is not a Redis cache (django-redis or Django's RedisCache)"
    )
