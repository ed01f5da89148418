"""The ``floor`` contender: dsm_redis's protocol with no library around it.

One transition is what dsm_redis sends, by hand: the acquire script (``dsm_redis/lua/acquire.lua``,
read from the installed package and loaded here) mints the lease and its fencing token in one
round trip, waiting on the signal list with ``BLPOP`` while another process holds it; then, on a
psycopg connection of its own (autocommit, so each statement below is one round trip): ``BEGIN``,
the row-lock ``SELECT ... FOR UPDATE`` with ``dsm_redis_fence(...)`` in its select list (the same
stored function dsm_redis calls on PostgreSQL: it bounds the row-lock wait and judges the token
before the row lock is waited for), the ``UPDATE``, ``COMMIT``; then python-redis-lock's UNLOCK
script (owner-checked delete and one wake-up, as dsm_redis releases). No Django ORM, no lease
bookkeeping, no renewer, no retries beyond waiting for the lease: the physical floor of this
protocol on this stack, and correct under contention (the lease serialises callers, the row lock
and the fence back it, the side effect reads the balance from the locked row).
"""

from __future__ import annotations

import time
from base64 import b64encode
from importlib import resources
from os import urandom

SIGNAL_EXPIRE_MS = 1000  # python-redis-lock's signal-list lifetime after a release, as dsm_redis uses
MAX_WAIT = 0.5  # longest BLPOP (dsm_redis: half its socket timeout)
MIN_WAIT = 0.005


class StaleToken(Exception):
    """The database refused the lease's fencing token (never expected in the bench)."""


def _lua(name: str) -> str:
    return (resources.files("dsm_redis") / "lua" / f"{name}.lua").read_text()


class Floor:
    """One process's floor client: a Redis client with the two scripts, and a psycopg connection."""

    def __init__(
        self, redis_url: str, prefix: str, table: str, label: str, ttl: float, row_lock_timeout: float
    ) -> None:
        import psycopg
        import redis
        import redis_lock
        from django.db import connection

        self.redis = redis.Redis.from_url(redis_url)
        self.acquire_script = self.redis.register_script(_lua("acquire"))
        self.release_script = self.redis.register_script(redis_lock.UNLOCK_SCRIPT)
        self.prefix, self.label = prefix, label
        self.ttl_ms = max(1, int(ttl * 1000))
        self.lock_timeout = f"{max(1, int(row_lock_timeout * 1000))}ms"
        # Django's own connection parameters for the bench database, on a dedicated connection.
        self.pg = psycopg.connect(**connection.get_connection_params(), autocommit=True)
        self.select = (
            f'SELECT "state", "balance", "deposits", dsm_redis_fence(%s, %s, %s, %s) '
            f'FROM "{table}" WHERE "id" = %s FOR UPDATE'
        )
        self.update = f'UPDATE "{table}" SET "state" = %s, "balance" = %s, "deposits" = %s WHERE "id" = %s'
        self.lease_waits: list[float] = []  # seconds from the call to the grant, per call

    def keys(self, pk: int) -> tuple[str, str, str, str]:
        """dsm_redis's layout: lock, signal list, fencing counter, and the key the mark table stores."""
        key = f"{self.label}:{pk}"
        name = f"{self.prefix}:{{{key}}}"
        return f"lock:{name}", f"lock-signal:{name}", f"{name}:fence", key

    def acquire(self, lock: str, signal: str, counter: str) -> tuple[str, int]:
        owner = b64encode(urandom(18)).decode("ascii")
        while True:
            ok, value = self.acquire_script(keys=[lock, counter], args=[owner, self.ttl_ms])
            if ok:
                return owner, int(value)
            pttl = int(value)
            wait = MAX_WAIT if pttl == -1 else (MIN_WAIT if pttl <= 0 else min(MAX_WAIT, pttl / 1000))
            self.redis.blpop([signal], timeout=max(wait, MIN_WAIT))

    def deposit(self, pk: int) -> None:
        lock, signal, counter, key = self.keys(pk)
        t0 = time.perf_counter()
        owner, token = self.acquire(lock, signal, counter)
        self.lease_waits.append(time.perf_counter() - t0)
        try:
            pg = self.pg
            pg.execute("BEGIN")
            try:
                state, balance, deposits, verdict = pg.execute(
                    self.select, (key, token, owner, self.lock_timeout, pk)
                ).fetchone()
                if verdict <= 0:
                    raise StaleToken(f"token {token} for {key} refused: mark {-verdict}")
                if state != "open":
                    raise RuntimeError(f"cannot deposit from {state}")
                pg.execute(self.update, ("open", balance + 1, deposits + 1, pk))
                pg.execute("COMMIT")
            except BaseException:
                pg.execute("ROLLBACK")
                raise
        finally:
            self.release_script(keys=[lock, signal], args=[owner, SIGNAL_EXPIRE_MS])


_floor: Floor | None = None


def client() -> Floor:
    """This process's floor client (built on first use, after Django is configured)."""
    global _floor
    if _floor is None:
        from django.conf import settings

        from bench.benchapp.models import FloorAccount

        options = settings.DSM_REDIS["OPTIONS"]
        _floor = Floor(
            settings.DSM_REDIS["LOCATION"],
            prefix=f"{options['KEY_PREFIX']}-floor",
            table=FloorAccount._meta.db_table,
            label=FloorAccount._meta.label_lower,
            ttl=30.0,  # dsm_redis's default lease TTL
            row_lock_timeout=float(options["ACQUIRE_TIMEOUT"]),  # dsm_redis's default: the acquire timeout
        )
    return _floor
