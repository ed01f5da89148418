"""Every exception dsm_redis raises on purpose, under one root: ``DsmRedisError``.

::

    DsmRedisError
    ├── TransitionException           the machine refused; nothing was written
    ├── TransitionFailed              raised by a side effect: roll back, move to error_state
    └── LockError                     the protection could not be guaranteed; nothing was committed
        ├── LockTemporarilyUnavailable    retriable: nothing was tried, try again later
        │   ├── LockTimeout                   the lease or row lock was not obtained in time
        │   ├── LockBackendUnavailable        Redis could not be reached
        │   └── LockNotReplicated             too few replicas acknowledged the lease (REPLICA_ACKS)
        ├── LockLost                      the lease expired or was taken before the commit
        └── StaleFencingToken             the database has seen a newer holder

All of them pickle and unpickle to an equal exception (Celery carries them between processes), so
each keeps the constructor arguments it needs in ``self.args`` and rebuilds from them in
``__reduce__``. Misuse of the API is not among them: a wrong argument is a ``TypeError``, a broken
setting or machine ``ImproperlyConfigured``, as Django raises them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "DsmRedisError",
    "TransitionException",
    "TransitionFailed",
    "LockError",
    "LockTemporarilyUnavailable",
    "LockTimeout",
    "LockLost",
    "StaleFencingToken",
    "LockBackendUnavailable",
    "LockNotReplicated",
]


class DsmRedisError(Exception):
    """The root of every exception dsm_redis raises on purpose."""


class TransitionException(DsmRedisError):
    """An illegal transition: wrong source state, failed precondition, unknown or ambiguous target."""


class TransitionFailed(DsmRedisError):
    """Raised by a side effect to roll its transition back and move to ``error_state`` instead.

    ``kwargs`` reach the side effect of the edge that leads to ``error_state``.
    """

    def __init__(self, error_state: Any, **kwargs: Any) -> None:
        super().__init__(error_state)
        self.error_state = error_state
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_transition_failed, (self.error_state, self.kwargs))


def _rebuild_transition_failed(error_state: Any, kwargs: dict[str, Any]) -> TransitionFailed:
    return TransitionFailed(error_state, **kwargs)


class LockError(DsmRedisError):
    """Base class: the object's protection could not be guaranteed, so nothing was committed."""


class LockTemporarilyUnavailable(LockError):
    """The lease could not be had right now; nothing ran, and the same call may succeed later.

    Catch this one to retry (Celery's ``autoretry_for``, a queue's backoff) without also retrying
    ``LockLost`` or ``StaleFencingToken``, whose work ran and was refused.
    """


class LockTimeout(LockTemporarilyUnavailable):
    """The lease (or the database row lock) was not obtained within the acquire timeout."""


class LockLost(LockError):
    """The lease expired or was taken by another holder before the work committed."""


class StaleFencingToken(LockError):
    """The database has already seen a newer fencing token for this object: this holder is stale."""

    def __init__(self, message: str, *, token: int | None = None, mark: int | None = None) -> None:
        super().__init__(message)
        self.token = token
        self.mark = mark

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_stale, (self.args[0], self.token, self.mark))


def _rebuild_stale(message: str, token: int | None, mark: int | None) -> StaleFencingToken:
    return StaleFencingToken(message, token=token, mark=mark)


class LockBackendUnavailable(LockTemporarilyUnavailable):
    """The lock backend (Redis) could not be reached; nothing was written."""


class LockNotReplicated(LockTemporarilyUnavailable):
    """Fewer replicas than ``REPLICA_ACKS`` acknowledged the lease within ``REPLICA_ACK_TIMEOUT``:
    it was given back and nothing ran (a failover then could have lost it)."""
