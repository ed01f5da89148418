"""Redis lease backend, built on python-redis-lock.

Kept from python-redis-lock: its key layout (``lock:<name>`` holds the owner id,
``lock-signal:<name>`` is the wake-up list), its owner-checked UNLOCK script that pushes a signal on
release, and waiting with BLPOP on that list instead of polling.

Not inherited (its traps): timeouts are milliseconds end to end (it truncates ``0.5`` to ``0`` and
so to "no expiry"/"forever"); acquire and fencing-token minting are one Lua call (it first spends a
round trip on a GET); renewal is done by ``renewer.py``, which marks a lease lost when it
cannot renew (its thread dies silently); release returns False instead of raising ``NotAcquired``
(which would mask the body's exception).

Safety contract: at most one owner per key at any instant *according to Redis*. Redis can lose a
key (restart without persistence, failover, eviction), so the lease alone is not a safety
guarantee; the fencing token, judged by the database, is (see ``fence.py``).
"""

from __future__ import annotations

import logging
import time
from base64 import b64encode
from collections.abc import Callable, Iterator
from functools import cached_property, partial
from importlib import resources
from os import urandom
from typing import Any, TypeVar

import redis
import redis_lock
from django.core.exceptions import ImproperlyConfigured
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.retry import Retry

from ..conf import Config
from ..exceptions import LockBackendUnavailable, LockTimeout
from ..keys import counter_key, redis_name
from . import Grant, LeaseInfo, LockBackend

logger = logging.getLogger("dsm_redis")
T = TypeVar("T")

# A BLPOP never outlasts the socket timeout (redis-py would call it a dead connection).
_MIN_WAIT = 0.005


def _lua(name: str) -> str:
    return (resources.files("dsm_redis") / "lua" / f"{name}.lua").read_text()


def _new_owner() -> str:
    # python-redis-lock's owner id: 18 random bytes, base64.
    return b64encode(urandom(18)).decode("ascii")


# python-redis-lock's signal-list lifetime after a release (ms): long enough for a waiter that was
# between its failed SET and its BLPOP to still find the wake-up.
_SIGNAL_EXPIRE_MS = 1000


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
        if scheme.lower().endswith("+cluster"):
            from redis.cluster import RedisCluster

            # One node's URL; the client discovers the others (CLUSTER SLOTS) and routes by slot. It
            # connects at once: an unreachable cluster is "unavailable", as for any other command.
            return self._call(
                "connect to the Redis Cluster",
                lambda: RedisCluster.from_url(f"{scheme[: -len('+cluster')]}{sep}{rest}", **options),
            )
        return redis.Redis.from_url(location, **options)

    @cached_property
    def _scripts(self) -> dict[str, Any]:
        scripts = {
            name: self.client.register_script(_lua(name)) for name in ("acquire", "renew", "reanchor", "holders")
        }
        scripts["unlock"] = self.client.register_script(redis_lock.UNLOCK_SCRIPT)
        return scripts

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, ClusterDownError, RedisClusterException) as exc:
            # Never echo the URL: it may carry a password.
            raise LockBackendUnavailable(f"Redis unreachable while trying to {what}: {type(exc).__name__}") from exc
        except redis.RedisError as exc:
            # A replica after failover (READONLY), OOM, LOADING...: Redis answered but cannot serve
            # leases. Its message names no host or password.
            raise LockBackendUnavailable(f"Redis refused to {what}: {type(exc).__name__}: {exc}") from exc

    @cached_property
    def _max_wait(self) -> float:
        """Longest BLPOP: under the client's real socket timeout, or redis-py calls it dead."""
        kwargs = getattr(getattr(self.client, "connection_pool", None), "connection_kwargs", {})
        timeout = kwargs.get("socket_timeout") or self.config.socket_timeout
        return max(_MIN_WAIT, float(timeout) / 2)

    def _keys(self, key: str) -> tuple[str, str, str]:
        name = redis_name(self.config.key_prefix, key)
        return f"lock:{name}", f"lock-signal:{name}", counter_key(self.config.key_prefix, key)

    # -- LockBackend -----------------------------------------------------------------------------

    def acquire(self, key: str, *, ttl: float, timeout: float | None) -> Grant:
        lock_key, signal_key, counter = self._keys(key)
        owner = _new_owner()
        ttl_ms = max(1, int(ttl * 1000))
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        waited = False
        while True:
            sent = time.monotonic()
            try:
                ok, value = self._call(
                    "acquire a lease",
                    lambda: self._scripts["acquire"](keys=[lock_key, counter], args=[owner, ttl_ms]),
                )
            except BaseException:
                # The reply was lost (Redis unreachable) or never read (Celery's
                # SoftTimeLimitExceeded, KeyboardInterrupt... landing while we waited for it), but
                # the script may have run: give back a lease nobody would otherwise release before
                # its TTL (owner-checked, so never someone else's), then let the exception go on.
                try:
                    self.release(key, owner)
                except LockBackendUnavailable:
                    pass
                raise
            if ok:
                if waited:
                    logger.debug("lease on %s acquired after waiting %.3fs (token %s)", key, sent - started, value)
                return Grant(owner=owner, fencing_token=int(value), valid_until=sent + ttl)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise LockTimeout(f"lease on {key} not acquired within {timeout}s")
            waited = True
            wait = _wait_time(int(value), self._max_wait, None if deadline is None else deadline - now)
            self._call("wait for a lease", partial(self.client.blpop, [signal_key], timeout=wait))

    def renew(self, key: str, owner: str, ttl: float) -> bool:
        lock_key, _, _ = self._keys(key)
        ttl_ms = max(1, int(ttl * 1000))
        return bool(self._call("renew a lease", lambda: self._scripts["renew"](keys=[lock_key], args=[owner, ttl_ms])))

    def release(self, key: str, owner: str) -> bool:
        lock_key, signal_key, _ = self._keys(key)
        # python-redis-lock's UNLOCK: deletes only if we own it, and wakes one waiter.
        error = self._call(
            "release a lease",
            lambda: self._scripts["unlock"](keys=(lock_key, signal_key), args=(owner, _SIGNAL_EXPIRE_MS)),
        )
        return error == 0

    def reanchor(self, key: str, owner: str, floor: int) -> int | None:
        lock_key, _, counter = self._keys(key)
        token = self._call(
            "re-anchor a fencing counter",
            lambda: self._scripts["reanchor"](keys=[lock_key, counter], args=[owner, floor]),
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

    def close(self) -> None:
        if "client" in self.__dict__ and not callable(self._location) and not str(self._location).startswith("cache:"):
            self.client.close()
        self.__dict__.pop("client", None)
        self.__dict__.pop("_scripts", None)


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
