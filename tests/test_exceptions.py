"""The exceptions: one root, a retriable base, the bases callers already catch, and pickling."""

from __future__ import annotations

import pickle

import pytest

import dsm_redis
from dsm_redis import (
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

EVERY = [
    DsmRedisError("root"),
    TransitionException("x"),
    TransitionFailed(7, reason="r"),
    LockError("e"),
    LockTemporarilyUnavailable("busy"),
    LockTimeout("t"),
    LockLost("l"),
    StaleFencingToken("s", token=1, mark=2),
    StaleFencingToken("no numbers"),
    LockBackendUnavailable("u"),
    LockNotReplicated("r"),
]


@pytest.mark.parametrize("exc", EVERY, ids=lambda e: type(e).__name__)
def test_each_exception_round_trips_through_pickle(exc):
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is type(exc) and clone.args == exc.args and vars(clone) == vars(exc)
    assert str(clone) == str(exc)


def test_every_exception_has_the_one_root():
    exported = [getattr(dsm_redis, name) for name in dsm_redis.__all__]
    classes = [c for c in exported if isinstance(c, type) and issubclass(c, BaseException)]
    assert len(classes) == 10
    assert all(issubclass(c, DsmRedisError) for c in classes)


@pytest.mark.parametrize(
    ("exc", "bases"),
    [
        (TransitionException, {DsmRedisError}),
        (TransitionFailed, {DsmRedisError}),
        (LockTimeout, {LockTemporarilyUnavailable, LockError, DsmRedisError}),
        (LockBackendUnavailable, {LockTemporarilyUnavailable, LockError, DsmRedisError}),
        (LockNotReplicated, {LockTemporarilyUnavailable, LockError, DsmRedisError}),
        (LockLost, {LockError, DsmRedisError}),
        (StaleFencingToken, {LockError, DsmRedisError}),
    ],
)
def test_the_bases_callers_catch(exc, bases):
    assert {b for b in (DsmRedisError, LockError, LockTemporarilyUnavailable) if issubclass(exc, b)} == bases


def test_only_what_never_ran_is_retriable():
    # A lease lost or a stale token means the work ran and was refused: not "try again later".
    with pytest.raises(LockError):
        raise LockBackendUnavailable("down")
    for refused in (LockLost("l"), StaleFencingToken("s")):
        assert not isinstance(refused, LockTemporarilyUnavailable)
    assert not issubclass(TransitionException, LockError)
