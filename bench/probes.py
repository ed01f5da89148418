"""Counting what one uncontended transition costs: Redis round trips (server-side, ``MONITOR``),
SQL statements (``CaptureQueriesContext``), and where the time goes (``cProfile``)."""

from __future__ import annotations

import cProfile
import io
import pstats
import threading
import time
from collections.abc import Callable
from typing import Any

START, END = "bench-monitor-start", "bench-monitor-end"


def redis_commands(redis_url: str, fn: Callable[[], Any]) -> dict[str, Any]:
    """Commands Redis received while ``fn`` ran, as ``MONITOR`` shows them.

    ``client`` are the commands clients sent (each one a network round trip); ``lua`` are those a
    script ran inside Redis (no round trip; ``INFO commandstats`` would count them too).
    """
    import redis

    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    monitor_client = redis.Redis.from_url(redis_url)
    marker = redis.Redis.from_url(redis_url)

    def listen() -> None:
        with monitor_client.monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                seen.append(command)
                if END in command["command"]:
                    return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(0.05)
    marker.echo(START)
    fn()
    marker.echo(END)
    thread.join(10)
    monitor_client.close()
    marker.close()
    begin = next(i for i, c in enumerate(seen) if START in c["command"])
    window = [c for c in seen[begin + 1 :] if END not in c["command"]]
    client = [c["command"] for c in window if c["client_type"] != "lua"]
    lua = [c["command"] for c in window if c["client_type"] == "lua"]
    return {"client": client, "lua": lua}


def sql_statements(fn: Callable[[], Any]) -> list[str]:
    """SQL sent while ``fn`` ran: Django's (``CaptureQueriesContext``) and statements run with
    ``psycopg.Connection.execute`` directly (the floor's; Django never calls it on its path)."""
    import psycopg
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    raw: list[str] = []
    original = psycopg.Connection.execute

    def execute(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        raw.append(query if params is None else f"{query} -- {list(params)}")
        return original(self, query, params, **kwargs)

    psycopg.Connection.execute = execute  # type: ignore[method-assign]
    try:
        with CaptureQueriesContext(connection) as ctx:
            fn()
    finally:
        psycopg.Connection.execute = original  # type: ignore[method-assign]
    return [q["sql"] for q in ctx.captured_queries] + raw


# Functions whose cumulative time the profile summary reports, by layer.
_LAYERS = {
    "SQL (Django cursor execute, incl. server time)": ("django/db/backends/utils.py", "execute"),
    "Redis (redis-py execute_command, incl. server time)": ("redis/client.py", "execute_command"),
    "Model.save": ("django/db/models/base.py", "save"),
    "QuerySet.get": ("django/db/models/query.py", "get"),
    "transaction.atomic __enter__": ("django/db/transaction.py", "__enter__"),
    "transaction.atomic __exit__ (COMMIT)": ("django/db/transaction.py", "__exit__"),
}


def profile(fn: Callable[[], Any], calls: int, top: int = 18) -> dict[str, Any]:
    """cProfile ``calls`` runs of ``fn``: per-call time by layer, and the top functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    wall = time.perf_counter() - t0
    profiler.disable()
    stats = pstats.Stats(profiler)
    layers: dict[str, float] = {}
    for label, (path, name) in _LAYERS.items():
        total = 0.0
        for (filename, _, funcname), (_, _, _, cumulative, callers) in stats.stats.items():  # type: ignore[attr-defined]
            if filename.endswith(path) and funcname == name:
                # Count only outermost entries: skip time already counted by a recursive caller.
                own_callers = [c for c in callers if c[0].endswith(path) and c[2] == name]
                if not own_callers:
                    total += cumulative
        layers[label] = total / calls
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    return {"calls": calls, "per_call_wall": wall / calls, "layers": layers, "top": _trim(out.getvalue())}


def cpu_by_owner(fn: Callable[[], Any], calls: int) -> dict[str, Any]:
    """The calling thread's CPU per call of ``fn``, and how it splits by who owns the code that spends
    it: dsm_redis, Django, redis-py, psycopg, the standard library, builtins, socket calls.

    The split comes from a second pass under cProfile on the thread's CPU clock (each function's own
    time, summed by owner) and is scaled to the unprofiled CPU per call. Approximate: the profiler's
    cost per Python call inflates code made of many small Python calls (the libraries' Python) against
    C (psycopg's and hiredis's extensions, builtins).
    """
    c0 = time.thread_time()
    for _ in range(calls):
        fn()
    cpu = (time.thread_time() - c0) / calls
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    owners: dict[str, float] = {}
    for (path, _, function), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        owner = _owner(path, function)
        owners[owner] = owners.get(owner, 0.0) + own
    total = sum(owners.values()) or 1.0
    ranked = sorted(((owner, own / total * cpu) for owner, own in owners.items()), key=lambda item: -item[1])
    return {"calls": calls, "cpu_per_call": cpu, "owners": ranked}


_PACKAGES = {
    "redis": "redis-py",
    "hiredis": "redis-py",
    "django": "Django",
    "asgiref": "Django",
    "psycopg": "psycopg",
    "psycopg_binary": "psycopg",
}
_SOCKET_CALLS = ("recv", "send", "poll", "select", "socket", "connect")


def _owner(path: str, function: str) -> str:
    if "site-packages/" in path:
        package = path.split("site-packages/")[1].split("/")[0]
        return _PACKAGES.get(package, package)
    if "/dsm_redis/" in path:
        return "dsm_redis"
    if "/bench/" in path:
        return "bench (the contender's code)"
    if path == "~":  # a builtin: a socket call is the kernel's share of a round trip
        if "hiredis" in function:
            return "redis-py"
        return "socket calls (kernel)" if any(word in function for word in _SOCKET_CALLS) else "builtins"
    return "standard library"


def _trim(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(line.rstrip() for line in lines[start:] if line.strip())


def breakdown(calls_by_name: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]], rounds: int) -> dict[str, Any]:
    """Where the wall time of an uncontended call goes, without a profiler's distortion.

    Each entry is (load, call): ``load()`` (not timed) gets the object, ``call(obj)`` is timed.
    Calls of every entry run interleaved (one call each, in turn). Per call: time inside SQL
    statements (Django's ``execute_wrapper``, client + server), time inside Redis commands (redis-py
    ``execute_command``), and the rest (Python in Django, the library and the bench). Medians, ms.
    """
    import redis
    from django.db import connection

    current: dict[str, float] = {"sql": 0.0, "redis": 0.0, "sql_n": 0, "redis_n": 0}

    def sql_wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            current["sql"] += time.perf_counter() - t0
            current["sql_n"] += 1

    original = redis.Redis.execute_command

    def redis_wrapper(self: Any, *args: Any, **options: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(self, *args, **options)
        finally:
            current["redis"] += time.perf_counter() - t0
            current["redis_n"] += 1

    import psycopg

    raw_execute = psycopg.Connection.execute

    def raw_wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:  # the floor's own statements
        t0 = time.perf_counter()
        try:
            return raw_execute(self, *args, **kwargs)
        finally:
            current["sql"] += time.perf_counter() - t0
            current["sql_n"] += 1

    commit = connection._commit

    def commit_wrapper() -> Any:  # COMMIT is a round trip too, but not a cursor statement
        t0 = time.perf_counter()
        try:
            return commit()
        finally:
            current["sql"] += time.perf_counter() - t0
            current["sql_n"] += 1

    samples: dict[str, dict[str, list[float]]] = {n: {"total": [], "sql": [], "redis": []} for n in calls_by_name}
    redis.Redis.execute_command = redis_wrapper  # type: ignore[method-assign]
    psycopg.Connection.execute = raw_wrapper  # type: ignore[method-assign]
    connection._commit = commit_wrapper
    try:
        with connection.execute_wrapper(sql_wrapper):
            for _ in range(rounds):
                for name, (load, call) in calls_by_name.items():
                    obj = load()
                    current.update(sql=0.0, redis=0.0, sql_n=0, redis_n=0)
                    t0 = time.perf_counter()
                    call(obj)
                    total = time.perf_counter() - t0
                    samples[name]["total"].append(total)
                    samples[name]["sql"].append(current["sql"])
                    samples[name]["redis"].append(current["redis"])
    finally:
        redis.Redis.execute_command = original  # type: ignore[method-assign]
        psycopg.Connection.execute = raw_execute  # type: ignore[method-assign]
        del connection._commit
    out = {}
    import statistics

    for name, s in samples.items():
        total, sql, red = (statistics.median(s[k]) for k in ("total", "sql", "redis"))
        rest = statistics.median([t - q - r for t, q, r in zip(s["total"], s["sql"], s["redis"], strict=True)])
        out[name] = {"total": total, "sql": sql, "redis": red, "rest": rest}
    return out


def redis_memory(redis_url: str, objects: int, label: str = "benchapp.memoryprobe") -> dict[str, Any]:
    """Redis memory left behind per object that ever transitioned, at ``objects`` objects.

    Each object gets one lease taken and given back through dsm_redis's own backend (the real
    acquire and release scripts, with the run's key prefix), as one transition does; no database is
    involved. Measured: ``INFO memory`` ``used_memory`` and ``DBSIZE`` before, and again once the
    release's short-lived keys (the signal lists, which expire after a second) are gone, and
    ``MEMORY USAGE`` of a sample of the keys that stay (by kind). The keys are deleted afterwards.
    """
    from concurrent.futures import ThreadPoolExecutor

    import redis

    from dsm_redis.backends import get_backend

    backend = get_backend()
    client = redis.Redis.from_url(redis_url)

    def settled_dbsize() -> int:
        # Expired keys are reclaimed lazily or by Redis's active cycle: wait until the count holds.
        last, stable = client.dbsize(), 0
        while stable < 3:
            time.sleep(0.5)
            now = client.dbsize()
            stable = stable + 1 if now == last else 0
            last = now
        return last

    settled_dbsize()
    before_keys = client.dbsize()
    before = int(client.info("memory")["used_memory"])

    def transition(start: int, stop: int) -> None:
        for i in range(start, stop):
            grant = backend.acquire(f"{label}:{i}", ttl=30.0, timeout=5.0)
            backend.release(f"{label}:{i}", grant.owner)

    t0 = time.perf_counter()
    threads = 4
    step = -(-objects // threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: transition(k * step, min(objects, (k + 1) * step)), range(threads)))
    seconds = time.perf_counter() - t0
    time.sleep(1.2)  # past the signal lists' expiry
    after_keys = settled_dbsize()
    after = int(client.info("memory")["used_memory"])
    kinds: dict[str, list[int]] = {}
    names = list(client.scan_iter(match=f"*{{{label}:*", count=1000))
    for name in names[:: max(1, len(names) // 300)]:
        text = name.decode()
        kind = (
            "lock"
            if text.startswith("lock:")
            else "signal"
            if text.startswith("lock-signal:")
            else text.rsplit(":", 1)[-1]
        )
        usage = client.memory_usage(name)
        if usage is not None:
            kinds.setdefault(kind, []).append(int(usage))
    for i in range(0, len(names), 1000):
        client.unlink(*names[i : i + 1000])
    version = client.info("server")["redis_version"]
    client.close()
    return {
        "objects": objects,
        "seconds": seconds,
        "redis": version,
        "used_memory_delta": after - before,
        "bytes_per_object": (after - before) / objects,
        "keys_left": after_keys - before_keys,
        "keys_per_object": (after_keys - before_keys) / objects,
        "memory_usage_by_kind": {k: sum(v) / len(v) for k, v in kinds.items()},
    }


def phases(load: Callable[[], Any], call: Callable[[Any], Any], calls: int) -> list[tuple[str, float]]:
    """Per-phase wall time of an uncontended call: median seconds between consecutive round-trip edges.

    Timed at points that do not depend on the library's internals: the lease backend's ``acquire``
    and ``release`` (dsm_redis's backend instance; the floor's own script calls are timed at
    ``redis.Redis.execute_command``), every SQL statement (Django's ``execute_wrapper``, and
    ``psycopg.Connection.execute`` for the floor) and Django's COMMIT (``connection._commit``).
    A gap between two edges is Python: the ORM building the next statement, the library's
    bookkeeping, the side effect. Returns (phase, seconds) in call order.
    """
    import statistics

    import psycopg
    import redis
    from django.db import connection

    from dsm_redis.backends import get_backend

    marks: list[tuple[str, float, float]] = []  # (label, start, end) of each round trip
    clock = time.perf_counter
    depth = [0]

    def timed(label: str, fn: Callable[[], Any]) -> Any:
        if depth[0]:  # inside a timed call already (dsm_redis's backend calling redis-py)
            return fn()
        depth[0] += 1
        t0 = clock()
        try:
            return fn()
        finally:
            depth[0] -= 1
            marks.append((label, t0, clock()))

    def sql_label(sql: Any) -> str:
        return "SQL " + (str(sql).split() or ["?"])[0].upper()

    def django_sql(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        return timed(sql_label(sql), lambda: execute(sql, params, many, context))

    backend = get_backend()
    acquire, release = backend.acquire, backend.release
    raw_execute, raw_command = psycopg.Connection.execute, redis.Redis.execute_command
    connection.ensure_connection()
    commit = connection._commit
    backend.acquire = lambda *a, **k: timed("lease acquire", lambda: acquire(*a, **k))  # type: ignore[method-assign]
    backend.release = lambda *a, **k: timed("lease release", lambda: release(*a, **k))  # type: ignore[method-assign]
    connection._commit = lambda: timed("SQL COMMIT", commit)
    psycopg.Connection.execute = lambda self, q, *a, **k: timed(sql_label(q), lambda: raw_execute(self, q, *a, **k))  # type: ignore[method-assign]
    redis.Redis.execute_command = lambda self, *a, **k: timed(f"Redis {a[0]}", lambda: raw_command(self, *a, **k))  # type: ignore[method-assign]
    samples: dict[str, list[float]] = {}
    order: list[str] = []

    def add(phase: str, seconds: float) -> None:
        if phase not in samples:
            order.append(phase)
            samples[phase] = []
        samples[phase].append(seconds)

    try:
        with connection.execute_wrapper(django_sql):
            for _ in range(calls):
                obj = load()
                marks.clear()
                t0 = clock()
                call(obj)
                t1 = clock()
                previous, last = "the call", t0
                seen: dict[str, int] = {}
                for label, start, end in marks:
                    seen[label] = seen.get(label, 0) + 1
                    name = label if seen[label] == 1 else f"{label} ({seen[label]})"
                    add(f"Python: after {previous}, before {name}", start - last)
                    add(name, end - start)
                    previous, last = name, end
                add(f"Python: after {previous}, until the return", t1 - last)
    finally:
        for name in ("acquire", "release"):
            vars(backend).pop(name, None)
        del connection._commit
        psycopg.Connection.execute = raw_execute  # type: ignore[method-assign]
        redis.Redis.execute_command = raw_command  # type: ignore[method-assign]
    return [(phase, statistics.median(samples[phase])) for phase in order if len(samples[phase]) * 2 >= calls]
