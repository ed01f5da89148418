"""The ``floor`` contender: dsm_redis's protocol with no library around it.

One transition is what dsm_redis sends, by hand: the acquire script (``dsm_redis/lua/queue.lua``
prepended to ``acquire.lua``, read from the installed package and loaded here, as the Redis
backend does) mints the lease and its fencing token in one round trip, or queues the caller
(first come, first served) while another process holds it; the caller then blocks with ``BLPOP``
on its own wake-up list until a release hands the lease over to it (granted, token minted, inside
the release script) or the holder's TTL runs out, and calls the acquire script again, which finds
the lease its own and extends it. Then, on a psycopg connection of its own (autocommit, so each
statement below is one round trip): ``BEGIN``, the row-lock ``SELECT ... FOR UPDATE`` with
``dsm_redis_fence(...)`` in its select list (the same stored function dsm_redis calls on
PostgreSQL: it bounds the row-lock wait and judges the token before the row lock is waited for),
the ``UPDATE``, ``COMMIT``; then the release script (``queue.lua`` + ``release.lua``:
owner-checked, hands the lease to the oldest live waiter, or signals python-redis-lock's list).
No Django ORM, no lease bookkeeping, no renewer, no retries beyond waiting for the lease: the
physical floor of this protocol on this stack, and correct under contention (the lease serialises
callers, the row lock and the fence back it, the side effect reads the balance from the locked
row).
"""

from __future__ import annotations

import time
from base64 import b64encode
from importlib import resources
from os import urandom

SIGNAL_EXPIRE_MS = 1000  # python-redis-lock's signal-list lifetime after a release, as dsm_redis uses
MAX_WAIT = 2.5  # longest BLPOP (dsm_redis: half its default 5 s socket timeout)
MIN_WAIT = 0.005
GRACE_MS = 2000  # dsm_redis's default HANDOVER_GRACE
IDLE_MS = 7 * 24 * 3600 * 1000  # dsm_redis's default COUNTER_IDLE_TTL
# A waiter's queue entry lives until its next call is due plus the grace (it waits without a
# deadline here: the bench's ACQUIRE_TIMEOUT is far longer than any race).
STAY_MS = int((MAX_WAIT + GRACE_MS / 1000) * 1000)


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
        from django.db import connection

        self.redis = redis.Redis.from_url(redis_url)
        # The queue's functions run inside each script, as the backend registers them.
        self.acquire_script = self.redis.register_script(_lua("queue") + "\n" + _lua("acquire"))
        self.release_script = self.redis.register_script(_lua("queue") + "\n" + _lua("release"))
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

    def keys(self, pk: int) -> tuple[str, ...]:
        """dsm_redis's layout: lock, fencing counter, queue, deadlines, wake-up list prefix,
        python-redis-lock's signal list, and the key the mark table stores."""
        key = f"{self.label}:{pk}"
        name = f"{self.prefix}:{{{key}}}"
        return (
            f"lock:{name}",
            f"{name}:fence",
            f"{name}:queue",
            f"{name}:waiters",
            f"{name}:grant:",
            f"lock-signal:{name}",
            key,
        )

    def acquire(self, lock: str, counter: str, queue: str, waiters: str, grant_prefix: str) -> tuple[str, int]:
        owner = b64encode(urandom(18)).decode("ascii")
        wake = grant_prefix + owner
        keys = [lock, counter, queue, waiters, wake]
        args = [owner, self.ttl_ms, STAY_MS, GRACE_MS, IDLE_MS, grant_prefix]
        try:
            while True:
                ok, value = self.acquire_script(keys=keys, args=args)
                if ok:
                    return owner, int(value)
                pttl = int(value)
                wait = MAX_WAIT if pttl == -1 else (MIN_WAIT if pttl <= 0 else min(MAX_WAIT, pttl / 1000))
                # Woken by a hand-over (the lease is ours already) or at the holder's TTL; the next
                # call tells which.
                self.redis.blpop([wake], timeout=max(wait, MIN_WAIT))
        except BaseException:
            # Interrupted while queued, or after a hand-over we never read: leave the queue and
            # hand on a grant nobody else would release (owner-checked), as the backend does.
            self.release(owner, lock, counter, queue, waiters, grant_prefix, f"lock-signal:{lock[5:]}")
            raise

    def release(
        self, owner: str, lock: str, counter: str, queue: str, waiters: str, grant_prefix: str, signal: str
    ) -> None:
        self.release_script(
            keys=[lock, counter, queue, waiters, signal],
            args=[owner, GRACE_MS, IDLE_MS, grant_prefix, SIGNAL_EXPIRE_MS],
        )

    def deposit(self, pk: int) -> None:
        lock, counter, queue, waiters, grant_prefix, signal, key = self.keys(pk)
        t0 = time.perf_counter()
        owner, token = self.acquire(lock, counter, queue, waiters, grant_prefix)
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
            self.release(owner, lock, counter, queue, waiters, grant_prefix, signal)


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
