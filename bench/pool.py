"""Worker processes: spawned once per run (fresh interpreters, no inherited sockets), each with its
own Django set up against the bench database, idle on a queue until told to race.

A race is timed by the wall clock: every worker sleeps until the same ``start_at``, makes calls
until ``start_at + duration`` (a call in flight then finishes, its time counted), and reports.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any

_ctx = mp.get_context("spawn")


@dataclass(frozen=True)
class Race:
    contender: str
    pks: tuple[int, ...]
    duration: float
    start_at: float  # time.time() at which every worker starts
    grace: float = 10.0  # a retrying call gives up this long after the race's end
    seed: int = 0


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _process_cpu(pid: int | None) -> float | None:
    """utime + stime of a process on this machine, in seconds (None when it cannot be read)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _backend_pids(contender: str) -> tuple[int, ...] | None:
    """The PostgreSQL backends serving this process's connections (to count their CPU too): Django's,
    and the floor's own connection when the floor races."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pids = [int(cursor.fetchone()[0])]
    if contender == "floor":
        from bench import floor

        pids.append(floor.client().pg.info.backend_pid)
    return tuple(pids)


def _backends_cpu(pids: tuple[int, ...] | None) -> float | None:
    if pids is None:
        return None
    cpu = [_process_cpu(pid) for pid in pids]
    return None if any(c is None for c in cpu) else sum(c for c in cpu if c is not None)


def run_race(index: int, race: Race) -> dict[str, Any]:
    from bench.contenders import CALLS, GaveUp, model_for, take_lease_waits, watch_lease_waits

    model = model_for(race.contender)
    call = CALLS[race.contender]
    rng = random.Random(race.seed * 1000 + index)
    pks = race.pks
    one = pks[0] if len(pks) == 1 else None
    watch_lease_waits()
    take_lease_waits(race.contender)  # drop the waits of warm-up calls
    delay = race.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    started = time.time()
    end = time.perf_counter() + race.duration
    hard_stop = time.monotonic() + race.duration + race.grace
    backends = _backend_pids(race.contender)
    server0 = _backends_cpu(backends)
    cpu = time.process_time()
    latencies: list[float] = []
    ok = retries = gave_up = errors = 0
    first_error = None
    while time.perf_counter() < end:
        pk = one if one is not None else rng.choice(pks)
        obj = model.objects.get(pk=pk)
        t0 = time.perf_counter()
        try:
            _, r = call(obj, pk, hard_stop)
            ok += 1
            retries += r
        except GaveUp as exc:
            gave_up += 1
            retries += int(exc.args[0])
        except Exception:  # noqa: BLE001 - counted and reported, never hidden
            errors += 1
            if first_error is None:
                first_error = traceback.format_exc(limit=6)
        latencies.append(time.perf_counter() - t0)
    return {
        "ok": ok,
        "retries": retries,
        "gave_up": gave_up,
        "errors": errors,
        "first_error": first_error,
        "latencies": latencies,
        "lease_waits": take_lease_waits(race.contender),
        "started": started,
        "ended": time.time(),
        "cpu": time.process_time() - cpu,
        # The PostgreSQL backend's CPU (same machine only); a reconnect mid-race would make it None.
        "server_cpu": _delta(server0, _backends_cpu(backends)) if backends == _backend_pids(race.contender) else None,
    }


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def warm_up(index: int, pks: dict[str, int]) -> None:
    """Open connections and load scripts before anything is measured."""
    from bench.contenders import CALLS, model_for

    for name, pk in pks.items():
        model = model_for(name)
        for _ in range(20):
            CALLS[name](model.objects.get(pk=pk), pk, time.monotonic() + 60)


def _worker(index: int, setup: dict[str, Any], inbox: Any, outbox: Any) -> None:
    try:
        from bench.settings import configure

        configure(**setup)
        outbox.put((index, "ok", os.getpid()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops the run
        outbox.put((index, "error", traceback.format_exc()))
        return
    while True:
        message = inbox.get()
        if message is None:
            return
        kind, args = message
        try:
            if kind == "race":
                result: Any = run_race(index, args)
            elif kind == "warm":
                result = warm_up(index, *args)
            else:
                raise ValueError(kind)
            outbox.put((index, "ok", result))
        except BaseException:  # noqa: BLE001 - reported to the parent, which stops the run
            outbox.put((index, "error", traceback.format_exc()))


class Pool:
    def __init__(self, size: int, setup: dict[str, Any]) -> None:
        self.outbox = _ctx.Queue()
        self.inboxes = [_ctx.Queue() for _ in range(size)]
        self.procs = [
            _ctx.Process(target=_worker, args=(i, setup, self.inboxes[i], self.outbox), daemon=True)
            for i in range(size)
        ]
        for p in self.procs:
            p.start()
        self.pids = self._collect(range(size), timeout=120)

    def _collect(self, indexes: Any, timeout: float) -> list[Any]:
        wanted = set(indexes)
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while wanted - results.keys():
            index, status, value = self.outbox.get(timeout=max(1.0, deadline - time.monotonic()))
            if status == "error":
                raise RuntimeError(f"bench worker {index} failed:\n{value}")
            results[index] = value
        return [results[i] for i in sorted(wanted)]

    def warm(self, spread: dict[str, list[int]]) -> None:
        """Each worker runs every contender a few times on an object of its own."""
        for i, inbox in enumerate(self.inboxes):
            inbox.put(("warm", ({name: pks[i] for name, pks in spread.items()},)))
        self._collect(range(len(self.inboxes)), timeout=300)

    def race(self, n: int, race: Race, redis_cpu: Any) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
        """Run ``race`` on workers 0..n-1: their results, and CPU seconds spent meanwhile by Redis
        (``redis_cpu()``: its own counters) and by the whole machine (``/proc/stat``, which also
        counts anything else running on it)."""
        busy0, _ = _cpu_ticks()
        redis0 = redis_cpu()
        for i in range(n):
            self.inboxes[i].put(("race", race))
        results = self._collect(range(n), timeout=race.duration + race.grace + 120)
        busy1, _ = _cpu_ticks()
        return results, {"machine": (busy1 - busy0) / os.sysconf("SC_CLK_TCK"), "redis": _delta(redis0, redis_cpu())}

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
