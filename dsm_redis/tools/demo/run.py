"""Runs the demo end to end: servers, a fresh database, worker processes, both races, the report.

1. Use the Redis and PostgreSQL the caller names, or start embedded ones (``dsm_redis.tools.servers``).
2. Configure Django programmatically against a database created for this run, migrate, create the
   shared subscriptions.
3. Spawn the worker processes once (``workers.main``); for each contender, reset the subscriptions, meet
   the workers at a barrier, and count what they report while drawing the progress bar.
4. Compare what the workers committed with what the database holds (``models.tally``).

Everything started here is undone on the way out, on errors and on Ctrl-C too: worker processes
are killed, the run's database is dropped and its Redis keys deleted, and servers started here are
stopped (their data directories removed).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, TextIO

from ..servers.process import ignoring_signals
from . import workers
from .environment import DemoError, check_redis, demo_settings, forget_redis_keys, prepare_database
from .report import Progress, Result, status

__all__ = ["CONTENDERS", "DemoError", "Options", "run"]

CONTENDERS = ("cowboy", "dsm_redis")
_POLL = 0.1  # seconds between progress redraws while waiting for results


@dataclass(frozen=True)
class Options:
    processes: int
    objects: int
    rounds: int
    redis_url: str | None = None
    database_url: str | None = None


def run(options: Options, err: TextIO) -> list[Result]:
    """Run both contenders; returns one ``Result`` each. Cleans up whatever happens."""
    resources = contextlib.ExitStack()
    try:
        return _run(options, resources, err)
    finally:
        # A second Ctrl-C (or a SIGTERM) must not cut the cleanup short.
        with ignoring_signals(signal.SIGINT, signal.SIGTERM):
            resources.close()


def _run(options: Options, resources: contextlib.ExitStack, err: TextIO) -> list[Result]:
    redis_url, database_url = _servers(options, resources, err)
    run_id = uuid.uuid4().hex[:12]
    settings_dict = demo_settings(database_url, redis_url, run_id)
    resources.callback(forget_redis_keys, redis_url, settings_dict["DSM_REDIS"]["OPTIONS"]["KEY_PREFIX"])
    subscription_pks = prepare_database(settings_dict, options.objects, resources)
    plan = workers.Plan(settings_dict, subscription_pks, options.rounds, CONTENDERS)
    pool = _Pool(plan, options.processes)
    resources.callback(pool.stop)
    pool.start()
    return [pool.race(contender, err) for contender in CONTENDERS]


def _servers(options: Options, resources: contextlib.ExitStack, err: TextIO) -> tuple[str, str]:
    """The URLs to use: the caller's, or those of servers started here (stopped on exit)."""
    from dsm_redis.tools.servers import PostgresServer, RedisServer, ServerUnavailable

    redis_url, database_url = options.redis_url, options.database_url
    try:
        if not redis_url:
            status(err, "starting Redis (embedded)...")
            redis_url = resources.enter_context(RedisServer()).url
        if not database_url:
            status(err, "starting PostgreSQL (embedded)...")
            database_url = resources.enter_context(PostgresServer()).url
    except ServerUnavailable:
        raise  # not installed: the CLI says what to install
    except RuntimeError as exc:  # installed but failed to start: the message carries its log
        raise DemoError(f"could not start the embedded servers: {exc}") from exc
    check_redis(redis_url)
    return redis_url, database_url


class _Pool:
    """The worker processes, spawned once and raced once per contender."""

    def __init__(self, plan: workers.Plan, processes: int) -> None:
        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited sockets or threads
        self.plan = plan
        self.barrier = ctx.Barrier(processes + 1)  # the workers and us: the clock starts together
        self.progress = ctx.Value("q", 0)  # rounds done, summed over the workers
        self.results: Any = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=workers.main,
                args=(i, plan, self.barrier, self.progress, self.results),
                name=f"dsm_redis-demo-{i}",
                daemon=True,
            )
            for i in range(processes)
        ]
        self.finished = False

    def start(self) -> None:
        # Workers inherit "ignore SIGINT": Ctrl-C interrupts only us, and we stop them.
        with ignoring_signals(signal.SIGINT):
            for proc in self.procs:
                proc.start()

    def race(self, contender: str, err: TextIO) -> Result:
        from .models import reset_subscriptions, tally

        reset_subscriptions()
        with self.progress.get_lock():
            self.progress.value = 0
        try:
            self.barrier.wait(timeout=workers.BARRIER_TIMEOUT)
        except threading.BrokenBarrierError:
            failure = self._failure(wait=1.0)
            raise DemoError(failure or "the worker processes did not start in time") from None
        bar = Progress(err, contender, len(self.procs) * self.plan.rounds)
        bar.start()
        started = time.monotonic()
        counts = self._collect(bar)
        seconds = time.monotonic() - started
        bar.finish(seconds)
        self.finished = contender == self.plan.contenders[-1]
        total = {key: sum(c[key] for c in counts) for key in counts[0]}
        found = tally(total["deposits"])
        return Result(contender=contender, seconds=seconds, **total, **found)

    def _collect(self, bar: Progress) -> list[dict[str, int]]:
        counts: list[dict[str, int]] = []
        while len(counts) < len(self.procs):
            try:
                kind, index, value = self.results.get(timeout=_POLL)
            except queue.Empty:
                failure = self._failure(wait=0)
                if failure:
                    raise DemoError(failure) from None
                bar.update(self.progress.value)
                continue
            if kind == "error":
                raise DemoError(f"worker {index} failed:\n{value}")
            counts.append(value)
        return counts

    def _failure(self, wait: float) -> str | None:
        """What went wrong in a worker, if anything: its traceback, or how it died.

        Reads the results queue only when ``wait`` > 0 (a broken barrier: no result is pending).
        """
        if wait > 0:
            with contextlib.suppress(queue.Empty):
                kind, index, value = self.results.get(timeout=wait)
                if kind == "error":
                    return f"worker {index} failed:\n{value}"
        dead = [p for p in self.procs if p.exitcode not in (None, 0)]
        if dead:
            return f"worker process {dead[0].name} died (exit code {dead[0].exitcode})"
        return None

    def stop(self) -> None:
        """Let finished workers exit on their own; kill them otherwise (Ctrl-C, errors)."""
        for proc in self.procs:
            if proc.pid is None:
                continue  # never started
            proc.join(timeout=10 if self.finished else 0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
