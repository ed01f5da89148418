"""dsm_redis: deus-state-machina's API with per-object Redis leases, ``select_for_update`` and
fencing tokens judged by the database.

This module's ``__all__`` is the public API; a name of a submodule that is not in it is internal
(``dsm_redis.conf``, ``dsm_redis.backends`` and ``dsm_redis.celery`` document their own public names).
"""

from .aio import aobject_lock
from .exceptions import (
    DsmRedisError,
    LockBackendUnavailable,
    LockError,
    LockLost,
    LockNotReplicated,
    LockTemporarilyUnavailable,
    LockTimeout,
    StaleFencingToken,
    TransitionException,
    TransitionFailed,
)
from .fence import FencingTokenField
from .fields import BoundStateMachine, StateMachineField
from .history import actor
from .lease import Lease, object_lock
from .machine import State, StateMachine, StateValue, Transition, precondition
from .permissions import permission
from .signals import emit_signal_on_state, state_changed

__version__ = "0.1.0"

# deus-state-machina exported these from its package too: deprecated, see dsm_redis.compat.
_COMPAT = frozenset({"lock_object", "thread_lock_object", "TransitionTask"})


def __getattr__(name: str) -> object:
    if name in _COMPAT:
        from . import compat

        return getattr(compat, name)
    raise AttributeError(f"module 'dsm_redis' has no attribute {name!r}")


__all__ = [
    # declaring a machine
    "State",
    "StateValue",
    "StateMachine",
    "StateMachineField",
    "BoundStateMachine",
    "FencingTokenField",
    "Transition",
    "precondition",
    "permission",
    # exceptions
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
    # leases
    "Lease",
    "object_lock",
    "aobject_lock",
    # signals
    "state_changed",
    "emit_signal_on_state",
    # history
    "actor",
]
