"""In-process lease backend with the Redis backend's semantics (TTL, owner-checked release,
fencing counters, re-anchoring), for development and single-process tests.

Safety contract: mutual exclusion between threads of ONE process only. Two processes (gunicorn
workers, Celery workers) each have their own table and do not exclude each other; the system
checks warn when this backend is configured with ``DEBUG = False``. Within the process the table
(leases and fencing counters) belongs to the module, one per ``KEY_PREFIX``, not to the backend
instance: a settings change builds a new instance, and leases held across it stay exclusive.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..exceptions import LockTimeout
from . import Grant, LeaseInfo, LockBackend

__all__ = ["LocalLockBackend"]


class _Table:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.leases: dict[str, tuple[str, float]] = {}  # key -> (owner, expires at, monotonic)
        self.counters: dict[str, int] = {}


_tables: dict[str, _Table] = {}
_tables_lock = threading.Lock()


def _table(prefix: str) -> _Table:
    with _tables_lock:
        table = _tables.get(prefix)
        if table is None:
            table = _tables[prefix] = _Table()
        return table


def _reset_after_fork() -> None:
    # A forked child is another process: a table of its own (as the contract says), and locks no
    # thread of the parent may have held at the moment of the fork.
    global _tables_lock
    _tables_lock = threading.Lock()
    _tables.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


class LocalLockBackend(LockBackend):
    """Leases in a table of this process (see the module's safety contract)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Shared with every other instance for this prefix: a settings change (which builds a new
        # instance) while leases are held must not let a second holder in.
        table = _table(self.config.key_prefix)
        self._cond = table.cond
        self._leases = table.leases
        self._counters = table.counters

    def _owner(self, key: str) -> str | None:
        entry = self._leases.get(key)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._leases[key]  # expired, as Redis would
            return None
        return entry[0]

    def acquire(self, key: str, *, ttl: float, timeout: float | None) -> Grant:
        owner = secrets.token_urlsafe(18)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._owner(key) is None:
                    self._leases[key] = (owner, now + ttl)
                    self._counters[key] = token = self._counters.get(key, 0) + 1
                    return Grant(owner=owner, fencing_token=token, valid_until=now + ttl)
                if deadline is not None and now >= deadline:
                    raise LockTimeout(f"lease on {key} not acquired within {timeout}s")
                wait = self._leases[key][1] - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
                self._cond.wait(max(wait, 0.001))

    def renew(self, key: str, owner: str, ttl: float) -> bool:
        with self._cond:
            if self._owner(key) != owner:
                return False
            self._leases[key] = (owner, time.monotonic() + ttl)
            return True

    def release(self, key: str, owner: str) -> bool:
        with self._cond:
            if self._owner(key) != owner:
                return False
            del self._leases[key]
            self._cond.notify_all()
            return True

    def reanchor(self, key: str, owner: str, floor: int) -> int | None:
        with self._cond:
            if self._owner(key) != owner:
                return None
            self._counters[key] = token = max(self._counters.get(key, 0), floor) + 1
            return token

    def describe(self, key: str) -> dict[str, Any]:
        with self._cond:
            owner = self._owner(key)
            ttl = self._leases[key][1] - time.monotonic() if owner else None
            return {"owner": owner, "ttl": ttl, "fencing_token": self._counters.get(key)}

    def iter_leases(self) -> Iterator[LeaseInfo]:
        """The leases held in *this* process (another process's table is not visible)."""
        with self._cond:
            now = time.monotonic()
            held = [(key, owner, until - now) for key, (owner, until) in self._leases.items() if until > now]
        for key, owner, ttl in sorted(held):
            yield LeaseInfo(key=key, owner=owner, ttl=ttl, fencing_token=self._counters.get(key))

    def forget_counters(self) -> None:
        """Lose every fencing counter, as a Redis restart without persistence would (tests)."""
        with self._cond:
            self._counters.clear()
