"""Real OS processes for race and fault tests: one place, used by every multi-process test.

Workers are *spawned* (a fresh interpreter each, no inherited sockets), set up Django against the
same test database and Redis as the test run, wait on a barrier so they start together, then run a
function named by a dotted path (``tests.workers:deposit``) and send back its result.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from dataclasses import dataclass
from typing import Any

_ctx = mp.get_context("spawn")


def _setup(db_name: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ["DSM_TEST_DB_NAME"] = db_name
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django

    django.setup()


def _target(path: str) -> Any:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _child(path: str, index: int, args: tuple, db_name: str, env: dict, barrier: Any, results: Any) -> None:
    try:
        _setup(db_name, env)
        fn = _target(path)
        if barrier is not None:
            barrier.wait(timeout=120)
        results.put((index, "ok", fn(index, *args)))
    except BaseException:
        results.put((index, "error", traceback.format_exc()))


def _db_name() -> str:
    from django.db import connections

    return connections["default"].settings_dict["NAME"]


def run_workers(path: str, n: int, *args: Any, env: dict[str, str] | None = None, timeout: float = 300) -> list[Any]:
    """Run ``path(index, *args)`` in ``n`` processes started together; their results by index."""
    from django.db import connections

    connections.close_all()  # the test's own connection must not hold locks the workers need
    barrier = _ctx.Barrier(n)
    results = _ctx.Queue()
    procs = [
        _ctx.Process(target=_child, args=(path, i, args, _db_name(), env or {}, barrier, results), daemon=True)
        for i in range(n)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    try:
        for _ in procs:
            index, status, value = results.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"worker {index} failed:\n{value}")
            collected[index] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [collected[i] for i in range(n)]


@dataclass
class Worker:
    """One spawned process the test steers: events to and from it, signals to its pid."""

    process: Any
    inbox: Any  # test -> worker
    outbox: Any  # worker -> test

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def expect(self, timeout: float = 120) -> Any:
        status, value = self.outbox.get(timeout=timeout)
        if status == "error":
            raise AssertionError(f"worker failed:\n{value}")
        return value

    def send(self, message: Any) -> None:
        self.inbox.put(message)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)


def _steered(path: str, args: tuple, db_name: str, env: dict, inbox: Any, outbox: Any) -> None:
    try:
        _setup(db_name, env)
        outbox.put(("ok", _target(path)(inbox, outbox, *args)))
    except BaseException:
        outbox.put(("error", traceback.format_exc()))


def start_worker(path: str, *args: Any, env: dict[str, str] | None = None) -> Worker:
    """Start ``path(inbox, outbox, *args)`` in a process; it reports steps with ``outbox.put(("ok", x))``."""
    from django.db import connections

    connections.close_all()
    inbox, outbox = _ctx.Queue(), _ctx.Queue()
    process = _ctx.Process(target=_steered, args=(path, args, _db_name(), env or {}, inbox, outbox), daemon=True)
    process.start()
    return Worker(process, inbox, outbox)


def committed_per_account(results: list[dict[str, Any]], ids: list[int]) -> dict[int, int]:
    """How many deposits the ``dsm_deposit`` workers saw commit, per account."""
    counts = dict.fromkeys(ids, 0)
    for result in results:
        for pk in result["per_account"]:
            counts[pk] += 1
    return counts


def contend_from_another_thread(obj: Any, timeout: float = 0) -> str:
    """Try ``obj``'s lease from another thread (another holder, like another process would be):
    ``"acquired"`` or ``"timeout"``."""
    import threading

    from django.db import connections

    from dsm_redis import LockTimeout, object_lock

    outcome: list[str] = []

    def other() -> None:
        try:
            with object_lock(obj, timeout=timeout):
                outcome.append("acquired")
        except LockTimeout:
            outcome.append("timeout")
        finally:
            connections.close_all()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    return outcome[0]


def in_background(fn: Any) -> Any:
    """Start ``fn`` in another thread (its own lease holder, its own DB connection); returns a
    ``join()`` that waits for it (bounded) and re-raises what it raised."""
    import threading

    from django.db import connections

    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout: float = 120) -> None:
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(f"{fn!r} did not finish")
        if errors:
            raise errors[0]

    return join
