"""The lease lifecycle under interleavings: savepoints, the renewer during commit hooks,
interrupts anywhere in ``hold``, receivers that raise ``BaseException``, Django's TestCase capture,
fork. Each test states the interleaving it drives and the contract item (lease.py, signals.py) at
stake; they run against the real Redis and PostgreSQL the suite starts.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.db import connection, transaction

from dsm_redis import state_changed
from dsm_redis.backends import get_backend
from dsm_redis.keys import object_key
from dsm_redis.lease import held_lease
from tests.helpers import dsm_options, killing_when_alive
from tests.testapp.models import ALIVE, DEAD, Cat

pytestmark = pytest.mark.django_db(transaction=True)


def record_signals(seen: list[Any]) -> Any:
    def receiver(sender: Any, instance: Any, state: Any, **kwargs: Any) -> None:
        seen.append((instance.pk, state))

    state_changed.connect(receiver, weak=False)
    return receiver


def owner_of(obj: Any) -> Any:
    return get_backend().describe(object_key(obj))["owner"]


# -- 1. a re-entry inside a rolled-back savepoint forgets the hook that still guards the transaction


def test_parked_lease_survives_a_rolled_back_savepoint_that_re_entered_it(settings):
    """Commit, then release (contract 2).

    1. caller's transaction T; a service's nested ``atomic()`` (savepoint s1) transitions the cat:
       the lease parks, its release hook H1 registered with sids {s1}; s1 is released into T;
    2. a second nested ``atomic()`` (s2) transitions it again: re-enters the parked lease; at the
       block's end ``watches_this_level(H1)`` is False ({s1} is not within {s2}) so a new hook H2
       is registered and *replaces* H1 in ``lease.record.parked``;
    3. s2 rolls back: H2 is dropped; H1 is still pending (T is open, holding the survive write and
       the row lock), but ``parked`` only knows H2: ``_parked_transactions_ended()`` is True;
    4. the renewer releases the lease while T is still open.
    """
    dsm_options(settings, TTL=0.6)
    cat = Cat.objects.create()
    with transaction.atomic():  # ATOMIC_REQUESTS, say
        with transaction.atomic():  # a service function
            cat.state_machine.survive()
        with pytest.raises(ZeroDivisionError):
            with transaction.atomic():
                cat.state_machine.transition_to(DEAD)
                1 / 0
        lease = held_lease(object_key(cat))
        assert lease is not None
        time.sleep(1.0)  # three renewer rounds
        # T is still open, its survive() write uncommitted and the row locked: the lease must be ours.
        assert not lease.released
        assert owner_of(cat) == lease.owner
    assert owner_of(cat) is None


# -- 2. Django's captureOnCommitCallbacks counts positions; our hooks move in front of them


@pytest.mark.django_db  # Django's TestCase: its transaction never commits
def test_capture_on_commit_callbacks_in_a_test_case_runs_the_transitions_own_hooks(
    django_capture_on_commit_callbacks,
):
    """API (contract 3 vs Django's test helper): ``captureOnCommitCallbacks`` remembers
    ``len(run_on_commit)`` at entry and takes the slice after it at exit. Hooks moved ahead of
    ones registered earlier would shift that slice: the capture would run an unrelated earlier
    hook and miss the signal. Under TestCase our hooks keep their registration order."""
    cat = Cat.objects.create()
    seen: list[Any] = []
    earlier: list[str] = []
    receiver = record_signals(seen)
    try:
        transaction.on_commit(lambda: earlier.append("ran"))  # e.g. registered in setUp
        cat.state_machine.survive()  # an earlier transition of the object under test
        with django_capture_on_commit_callbacks(execute=True):
            cat.state_machine.transition_to(DEAD)
    finally:
        state_changed.disconnect(receiver)
    assert earlier == []  # the hook registered before the block is not the block's
    assert seen == [(cat.pk, DEAD)]  # the captured transition's signal, once its lease is released
    assert owner_of(cat) is None  # the captured block's own release hook released the lease


# -- 3. the renewer takes a commit's drained hook list for a rollback


def test_renewer_during_the_commit_hooks_does_not_reorder_an_objects_signals(settings):
    """Signals of one object in commit order (contract 4), with the renewer running (contract 2).

    Django's ``run_and_clear_commit_hooks`` first empties ``connection.run_on_commit``, then runs
    the hooks it took. From that moment ``_parked_transactions_ended()`` is True for every lease of
    the commit, so a renewer round landing between the COMMIT and the commit's signal hooks (a
    thread switch, a GC pause: simulated here by a first dsm hook that lets the renewer run)
    "releases a rolled-back lease":

    1. T transitions x then y (both parked); COMMIT; the drain starts;
    2. the renewer releases x (``Lease._release_if_rolled_back``): its hook is no longer in the list;
    3. x's signal hook: ``after_release`` finds x released and delivers *now*, inside the hook,
       before y's signal hook has queued y's ALIVE;
    4. x's receiver transitions y to DEAD: takes over y's parked lease (ended, valid), commits,
       its DEAD signal is delivered;
    5. y's signal hook then delivers y's ALIVE: y's receivers see DEAD, then ALIVE.
    """
    from dsm_redis.commit_hooks import commit_hook, on_commit_first

    dsm_options(settings, TTL=0.3)
    x, y = Cat.objects.create(), Cat.objects.create()
    seen: list[Any] = []
    receiver = record_signals(seen)

    kill_y = killing_when_alive(x, y)
    leases: dict[str, Any] = {}

    @commit_hook("signal")
    def preempted() -> None:  # the committing thread loses the CPU for one renewer round
        for _ in range(300):
            if leases["x"].released:
                return
            time.sleep(0.01)

    state_changed.connect(kill_y, sender=Cat, weak=False)
    try:
        with transaction.atomic():
            on_commit_first(preempted, "default")
            x.state_machine.survive()
            y.state_machine.survive()
            leases["x"] = held_lease(object_key(x))
    finally:
        state_changed.disconnect(kill_y, sender=Cat)
        state_changed.disconnect(receiver)
    assert Cat.objects.get(pk=y.pk).state == DEAD
    assert [state for pk, state in seen if pk == y.pk] == [ALIVE, DEAD]  # commit order


# -- 4. an asynchronous exception between the bookkeeping and the ``try`` that undoes it


class Abort(BaseException):
    """An asynchronous exception: KeyboardInterrupt, gevent's Timeout, a signal handler's raise."""


def _line_after(func: Any, statement: str, following: str) -> int:
    import inspect

    lines, first = inspect.getsourcelines(func)
    for i, line in enumerate(lines[:-1]):
        if line.strip() == statement and lines[i + 1].strip() == following:
            return first + i + 1
    raise AssertionError(f"{statement!r} then {following!r} not found")


def raising_at(func: Any, lineno: int) -> Any:
    """Raise ``Abort`` once when ``func``'s frame reaches ``lineno`` (what a signal handler does)."""
    import sys
    from contextlib import contextmanager

    code = getattr(func, "__wrapped__", func).__code__
    fired: list[bool] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == lineno and not fired:
            fired.append(True)
            raise Abort
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    @contextmanager
    def armed() -> Any:
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            yield fired
        finally:
            sys.settrace(previous)

    return armed()


def _lines_before_finally(func: Any) -> list[int]:
    """Line numbers of ``func``'s body outside its ``finally`` clauses (an exception raised inside a
    finally is beyond what any code can guard)."""
    import inspect

    lines, first = inspect.getsourcelines(func)
    out, skip_indent = [], None
    for i, line in enumerate(lines[1:], start=1):
        text = line.strip()
        if not text or text.startswith(("#", '"""')):
            continue
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None and indent > skip_indent:
            continue
        skip_indent = indent if text == "finally:" else None
        if skip_indent is None:
            out.append(first + i)
    return out


@pytest.mark.parametrize("reentered", [False, True], ids=["fresh", "re-entered"])
def test_an_interrupt_anywhere_in_hold_leaves_no_lease_behind(reentered):
    """Contract 1 and 5: an asynchronous exception (KeyboardInterrupt, a task's time limit) landing
    on any line of ``hold`` before its ``finally`` — between the acquire and the ``try``, between
    raising ``depth`` and the ``try`` — leaves neither a key in Redis nor an entry in the thread's
    dict nor a raised ``depth``: the object is free once the outermost block has ended."""
    from dsm_redis import lease as lease_module
    from dsm_redis import object_lock

    hold = lease_module.hold.__wrapped__
    fired_on = []
    for line in _lines_before_finally(hold):
        cat = Cat.objects.create()
        if reentered:
            with object_lock(cat) as outer:
                with raising_at(lease_module.hold, line) as fired:
                    try:
                        with object_lock(cat):
                            pass
                    except Abort:
                        pass
                assert outer.depth == 1, f"depth left raised by an interrupt at line {line}"
        else:
            with raising_at(lease_module.hold, line) as fired:
                try:
                    with object_lock(cat):
                        pass
                except Abort:
                    pass
        if fired:
            fired_on.append(line)
        assert owner_of(cat) is None, f"lease left in Redis after an interrupt at line {line}"
        assert lease_module.held_lease(object_key(cat)) is None, line
    assert len(fired_on) > 5  # the sweep did reach the lines in between


# -- 5. a receiver raising BaseException silently drops the rest of the lease's callbacks


def test_a_receiver_raising_base_exception_does_not_drop_the_next_signal():
    """after_release callbacks are never silently dropped (contract 4).

    Two transitions of x commit together: x's lease has two ``after_release`` callbacks (ALIVE,
    DEAD). ``_run_after_release`` swaps the list out, then calls them catching ``Exception`` only;
    the first receiver raises a BaseException (a worker's time limit, gevent's Timeout...): it
    propagates, and the DEAD callback — in the local list only — is gone for good, although the
    transition committed. Neither the next transition nor the next hold() of this thread delivers it.
    """
    x, other = Cat.objects.create(), Cat.objects.create()
    seen: list[Any] = []
    aborted: list[bool] = []

    def receiver(sender: Any, instance: Any, state: Any, **kwargs: Any) -> None:
        seen.append((instance.pk, state))
        if not aborted:
            aborted.append(True)
            raise Abort

    state_changed.connect(receiver, sender=Cat, weak=False)
    try:
        with pytest.raises(Abort):
            with transaction.atomic():
                x.state_machine.survive()
                x.state_machine.transition_to(DEAD)
        assert Cat.objects.get(pk=x.pk).state == DEAD  # both committed
        other.state_machine.survive()  # this thread's next lease, next delivery
    finally:
        state_changed.disconnect(receiver, sender=Cat)
    assert (x.pk, DEAD) in seen, seen


# -- claims that held (kept as regression tests)


def test_a_forked_child_neither_re_enters_nor_releases_a_parked_lease():
    """Contract 5: parent parked in an open transaction; the child forked there finds no lease,
    cannot take it, and unwinding the parent's block releases nothing."""
    import os

    from dsm_redis import LockTimeout
    from dsm_redis.lease import hold

    cat = Cat.objects.create()
    key = object_key(cat)
    with transaction.atomic():
        cat.state_machine.survive()
        lease = held_lease(key)
        assert lease is not None
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never touches the inherited database connection
            code = 0
            try:
                code |= 1 if held_lease(key) is not None else 0
                try:
                    with hold(key, timeout=0.2):
                        code |= 2
                except LockTimeout:
                    pass
            except BaseException:
                code |= 4
            os.write(write, bytes([code]))
            os._exit(0)
        os.close(write)
        code = os.read(read, 1)
        os.waitpid(pid, 0)
        assert code == bytes([0])  # no lease in the child, and the parent's could not be taken
        assert owner_of(cat) == lease.owner  # still the parent's, parked
    assert owner_of(cat) is None


def test_hooks_moved_to_the_front_keep_their_savepoint_ids(settings):
    """Contract 3: a transition in a rolled-back savepoint signals nothing though the outer
    transaction commits; the lease parked there is released once that savepoint is gone."""
    dsm_options(settings, TTL=0.6)
    x, y = Cat.objects.create(), Cat.objects.create()
    seen: list[Any] = []
    receiver = record_signals(seen)
    try:
        with transaction.atomic():
            transaction.on_commit(lambda: None)  # a caller hook our hooks are moved in front of
            y.state_machine.survive()
            with pytest.raises(ZeroDivisionError):
                with transaction.atomic():
                    x.state_machine.survive()
                    1 / 0
            lease = held_lease(object_key(x))
            assert all(entry[1] is not None for entry in connection.run_on_commit)
            for _ in range(300):
                if lease is None or lease.released:
                    break
                time.sleep(0.01)
            assert lease is None or lease.released  # its only transaction level rolled back
    finally:
        state_changed.disconnect(receiver)
    assert seen == [(y.pk, ALIVE)]
    assert owner_of(x) is None and owner_of(y) is None
