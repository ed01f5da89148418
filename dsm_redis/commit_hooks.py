"""The order of dsm_redis's on-commit hooks, and what a connection's pending hooks tell.

Django runs a transaction's on-commit hooks in registration order and stops at the first
non-robust one that raises. Ours (release the lease, send state_changed) used to be appended after
the hooks the caller had registered earlier: a failing caller hook then kept the lease in Redis
after the COMMIT and dropped the signal, and a caller hook that transitioned the object again
committed (and signalled) before our earlier transition had signalled. So every dsm_redis hook is
robust and runs before any hook that is not ours, whenever that one was registered
(``on_commit_first``). Inside Django's ``TestCase`` (which never commits) they keep their
registration order instead, so that ``captureOnCommitCallbacks`` — which takes hooks by position —
runs them.

Django has no rollback hook; but a rollback drops the transaction's on-commit hooks (and a commit
runs them), so whether one of ours is still ``pending`` tells whether its transaction is open.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from django.db import connections, transaction

__all__: list[str] = []

F = TypeVar("F", bound=Callable[..., Any])

_HOOK_ATTR = "dsm_redis_hook"


def commit_hook(kind: str) -> Callable[[F], F]:
    """Mark a callable as one of dsm_redis's on-commit hooks: ``"signal"``, ``"release"``..."""

    def mark(func: F) -> F:
        setattr(func, _HOOK_ATTR, kind)
        return func

    return mark


def _hook_kind(func: Any) -> str | None:
    kind = getattr(func, _HOOK_ATTR, None)
    if kind is None and isinstance(func, partial):
        kind = getattr(func.func, _HOOK_ATTR, None)
    return kind


# dsm_redis's hooks at the front of the list, by rank: every transition's signal hook before every
# release hook of the same commit (ranks equal keep registration order). A signal hook queues its
# delivery on the lease, which the release then runs: with all of one commit's signals queued
# before any release, a receiver that transitions another object of that commit finds that
# object's earlier signal already queued, and its own new one lands after it (signals.deliver).
_RANK = {"signal": 0, "release": 1}


def on_commit_first(func: Callable[[], None], using: str) -> None:
    """``transaction.on_commit(func, robust=True)`` for a hook marked with ``commit_hook``, moved
    ahead of every hook that is not dsm_redis's, whenever that one was registered.

    Closes the race above. Registered through ``transaction.on_commit`` so that Django's savepoint
    bookkeeping applies (a rolled-back savepoint drops it), then the entry it appended is moved
    into the front group of dsm_redis hooks, after those of its rank or lower.
    """
    connection = connections[using]
    transaction.on_commit(func, using=using, robust=True)
    if not connection.in_atomic_block:
        return  # autocommit: it has already run
    if in_test_case(connection):
        # Django's TestCase never commits: hooks run only through captureOnCommitCallbacks, which
        # takes them by position (those appended after its start). Moving ours would hand it
        # someone else's hook instead; in registration order the capture runs ours, in order.
        return
    hooks = connection.run_on_commit
    entry = hooks.pop()
    rank = _RANK[_hook_kind(func) or "release"]
    index = 0
    while index < len(hooks) and (kind := _hook_kind(hooks[index][1])) is not None and _RANK[kind] <= rank:
        index += 1
    hooks.insert(index, entry)


def in_test_case(connection: Any) -> bool:
    """Inside Django's ``TestCase`` transaction (which never commits)."""
    return any(getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def pending(connection: Any, hook: Callable[[], None]) -> bool:
    """``hook`` waits for the commit of ``connection``'s transaction (not run, not rolled back)."""
    return any(entry[1] is hook for entry in list(connection.run_on_commit))


def watches_this_level(connection: Any, hook: Callable[[], None]) -> bool:
    """``hook`` is pending, and registered at this savepoint level or outside it: nothing that could
    drop it (a savepoint rollback) leaves the work registered now in place."""
    current = set(connection.savepoint_ids)
    return any(entry[1] is hook and entry[0] <= current for entry in list(connection.run_on_commit))
