"""dsm_redis: deus-state-machina's API with per-object Redis leases, ``select_for_update`` and
fencing tokens judged by the database."""

from .exceptions import (
    LockBackendUnavailable,
    LockError,
    LockLost,
    LockTimeout,
    StaleFencingToken,
    TransitionException,
    TransitionFailed,
)
from .fence import FencingTokenField
from .fields import StateMachineField
from .lease import Lease, object_lock
from .machine import State, StateMachine, Transition, precondition
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
    "State",
    "StateMachine",
    "StateMachineField",
    "FencingTokenField",
    "Transition",
    "precondition",
    "TransitionException",
    "TransitionFailed",
    "LockError",
    "LockTimeout",
    "LockLost",
    "StaleFencingToken",
    "LockBackendUnavailable",
    "Lease",
    "object_lock",
    "state_changed",
    "emit_signal_on_state",
]
