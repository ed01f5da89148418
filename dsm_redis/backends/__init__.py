"""Lock backends: where leases and fencing counters live.

A backend implements :class:`LockBackend`. ``get_backend()`` returns this process's instance of the
one ``DSM_REDIS['BACKEND']`` names, created lazily and re-created after a fork or a settings change.
"""

from __future__ import annotations

import asyncio
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from ..conf import Config, get_config

# What a custom backend implements and returns; get_backend() and load_backend_class() serve the core.
__all__ = ["AsyncLeases", "Grant", "LeaseInfo", "LockBackend"]

T = TypeVar("T")


@dataclass(frozen=True)
class Grant:
    """What a successful acquire returns."""

    owner: str
    fencing_token: int
    # time.monotonic() before the request was sent + TTL: a conservative local bound on the lease.
    valid_until: float


@dataclass(frozen=True)
class LeaseInfo:
    """One held lease, as operators see it (``manage.py dsm_locks``)."""

    key: str  # the object key, app_label.model:pk
    owner: str | None
    ttl: float | None  # seconds left; None when the lease has no expiry
    fencing_token: int | None  # the object's counter: the token of the latest lease granted


class LockBackend(ABC):
    """The interface a backend implements. Every method raises ``LockBackendUnavailable`` when the
    store cannot be reached; none of them may block longer than its timeout."""

    def __init__(self, config: Config) -> None:
        self.config = config

    @abstractmethod
    def acquire(self, key: str, *, ttl: float, timeout: float | None) -> Grant:
        """Wait up to ``timeout`` seconds (None: forever) for the lease; ``LockTimeout`` otherwise."""

    @abstractmethod
    def renew(self, key: str, owner: str, ttl: float) -> bool:
        """Extend the lease if ``owner`` still holds it; False when it does not."""

    @abstractmethod
    def release(self, key: str, owner: str) -> bool:
        """Release if ``owner`` still holds it (never someone else's); False when it did not."""

    @abstractmethod
    def reanchor(self, key: str, owner: str, floor: int) -> int | None:
        """If ``owner`` holds the lease, move the counter above ``floor`` and mint a token from it."""

    @abstractmethod
    def describe(self, key: str) -> dict[str, Any]:
        """``{"owner": str | None, "ttl": float | None, "fencing_token": int | None}`` for operators."""

    def iter_leases(self) -> Iterator[LeaseInfo]:
        """Every lease held now under this backend's ``KEY_PREFIX`` (for operators, not atomic)."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its leases")

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Drop connections (tests, settings changes)."""

    def for_asyncio(self) -> AsyncLeases:
        """This backend's lease calls for the running event loop (``alease.py``).

        The default runs the blocking calls in a worker thread each (``asyncio.to_thread``): correct
        for any backend, but a waiter holds a thread. The Redis backend overrides it with
        ``redis.asyncio`` (no thread at all).
        """
        return _ThreadedLeases(self)


class AsyncLeases(Protocol):
    """The calls an asyncio lease makes, with the semantics of ``LockBackend``'s namesakes.

    ``acquire`` cancelled while it waits leaves nothing behind: not its place in a queue, and not a
    lease granted to it meanwhile.
    """

    async def acquire(self, key: str, *, ttl: float, timeout: float | None) -> Grant: ...

    async def renew(self, key: str, owner: str, ttl: float) -> bool: ...

    async def release(self, key: str, owner: str) -> bool: ...


class _ThreadedLeases:
    """``AsyncLeases`` for a backend with blocking calls only: each call runs in a thread of its
    own, never in the loop's shared executor. Its threads may all be taken by blocking calls
    waiting for this very lease (an application's ``asyncio.to_thread`` of a blocking transition,
    or waiters): a release or renewal queued behind them would free them only once they time out."""

    def __init__(self, backend: LockBackend) -> None:
        self._backend = backend

    async def acquire(self, key: str, *, ttl: float, timeout: float | None) -> Grant:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Grant] = loop.create_future()
        state = threading.Lock()
        abandoned = False

        def deliver(grant: Grant | None, error: BaseException | None) -> None:
            if future.cancelled():
                if grant is not None:  # the waiter was cancelled as the lease arrived
                    threading.Thread(target=_give_back, args=(self._backend, key, grant.owner), daemon=True).start()
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(grant)  # type: ignore[arg-type]

        def wait() -> None:
            grant, error = None, None
            try:
                grant = self._backend.acquire(key, ttl=ttl, timeout=timeout)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
                error = exc
            with state:
                if abandoned:
                    if grant is not None:  # nobody will hold it: give it back now, not after a TTL
                        _give_back(self._backend, key, grant.owner)
                    return
            try:
                loop.call_soon_threadsafe(deliver, grant, error)
            except RuntimeError:  # the loop was closed while we waited: nobody will take the grant
                if grant is not None:
                    _give_back(self._backend, key, grant.owner)

        threading.Thread(target=wait, name=f"dsm_redis acquire {key}", daemon=True).start()
        try:
            return await future
        except asyncio.CancelledError:
            with state:
                abandoned = True
            if future.done() and not future.cancelled() and future.exception() is None:
                # The grant was delivered, and the cancel landed before this task resumed to take
                # it: nobody holds it (``deliver`` saw a live future). Give it back now, not at its TTL.
                grant = future.result()
                threading.Thread(target=_give_back, args=(self._backend, key, grant.owner), daemon=True).start()
            raise

    async def renew(self, key: str, owner: str, ttl: float) -> bool:
        return await _in_own_thread(self._backend.renew, key, owner, ttl)

    async def release(self, key: str, owner: str) -> bool:
        return await _in_own_thread(self._backend.release, key, owner)


async def _in_own_thread(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` in a new thread, awaited on the loop (``_ThreadedLeases``)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = call(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop was closed meanwhile: nobody awaits the answer
            pass

    threading.Thread(target=run, name=f"dsm_redis {call.__name__}", daemon=True).start()
    return await future


def _give_back(backend: LockBackend, key: str, owner: str) -> None:
    try:
        backend.release(key, owner)
    except Exception:  # noqa: BLE001 - the lease then expires by its TTL
        pass


async def shielded(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile (it then goes on as a task).

    For what must happen once started: a release, leaving a queue. A caller cancelled again while
    it waits gets ``CancelledError``; the work is not cut short.
    """
    return await asyncio.shield(asyncio.ensure_future(work))


_lock = threading.Lock()
_instance: tuple[int, LockBackend] | None = None


def get_backend() -> LockBackend:
    global _instance
    current = _instance
    # A backend holds sockets and a renewal thread: a forked child must build its own.
    if current is not None and current[0] == os.getpid():
        return current[1]
    with _lock:
        if _instance is None or _instance[0] != os.getpid():
            config = get_config()
            _instance = (os.getpid(), load_backend_class(config.backend)(config))
        return _instance[1]


def load_backend_class(path: str) -> type[LockBackend]:
    """Import the class ``DSM_REDIS['BACKEND']`` names; ``ImproperlyConfigured`` naming the setting."""
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(f"DSM_REDIS['BACKEND']: cannot import {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, LockBackend)):
        raise ImproperlyConfigured(f"DSM_REDIS['BACKEND']: {path!r} is not a dsm_redis.backends.LockBackend subclass")
    return cls


def reset_backend(**kwargs: Any) -> None:
    global _instance
    if kwargs.get("setting") not in (None, "DSM_REDIS", "CACHES"):
        return
    with _lock:
        if _instance is not None and _instance[0] == os.getpid():
            _instance[1].close()
        _instance = None


def _reset_lock_after_fork() -> None:
    # Another thread may have held the lock at the moment of the fork; it does not exist in the
    # child, which would then deadlock in its first get_backend() (its first transition).
    global _lock
    _lock = threading.Lock()


setting_changed.connect(reset_backend, dispatch_uid="dsm_redis.reset_backend")
os.register_at_fork(after_in_child=_reset_lock_after_fork)
