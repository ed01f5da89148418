"""``python -m bench``: every contender, every scenario, one run, interleaved; then the report.

Order of a run:
1. servers: Redis and PostgreSQL started here (the library's test servers) unless ``--redis-url`` /
   ``--database-url`` are given; a fresh database is created for the run and dropped after it;
2. counts for one uncontended transition per contender: Redis commands (``MONITOR``) and SQL
   statements (``CaptureQueriesContext``);
3. uncontended latency: rounds of batches, contenders in a rotated order each round;
4. races: for each repeat, for each scenario (1, 2, 4, 8 processes on one hot object; 8 processes
   over 1,000 objects; the crowd: 16 and 32 processes on one hot object), every contender in a
   rotated order, so machine noise hits all alike; the racing workers also time every lease acquire
   (from the call to the grant) of the contenders that take leases;
5. Redis memory per object that ever transitioned (``--memory-objects``, 100,000 by default);
6. where an uncontended call's time goes (timers), and a cProfile of dsm_redis, floor and seed;
7. ``BENCHMARKS.md``, the chart and the raw results (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.contenders import CALLS, CONTENDERS, model_for

ROOT = Path(__file__).resolve().parent.parent
HOT_PROCESSES = (1, 2, 4, 8)
CROWD_PROCESSES = (16, 32)  # one hot object, reported as a figure of its own
SPREAD_PROCESSES = 8


def servers_module() -> Any:
    """The library's throwaway Redis and PostgreSQL servers (the only import of them in the bench)."""
    from dsm_redis.tools import servers as _servers

    return _servers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run (~2 minutes): 1 repeat, 1 s races, memory at 20,000 objects"
    )
    p.add_argument("--repeats", type=int, help="repeats of every race (default 8; --quick: 1)")
    p.add_argument("--duration", type=float, help="seconds per race (default 1.5; --quick: 1)")
    p.add_argument("--objects", type=int, default=1000, help="objects in the spread scenario")
    p.add_argument(
        "--crowd",
        default=",".join(map(str, CROWD_PROCESSES)),
        help="processes on one hot object for the crowd figure, comma-separated ('' to skip)",
    )
    p.add_argument(
        "--memory-objects",
        type=int,
        help="objects for the Redis memory figure (default 100,000; --quick: 20,000; 0 to skip)",
    )
    p.add_argument("--latency-rounds", type=int, help="rounds of the uncontended latency batches")
    p.add_argument("--latency-calls", type=int, help="calls per contender per latency round")
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument("--database-url", help="use this PostgreSQL server (a database is created on it)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown report to write")
    p.add_argument("--chart", default=str(ROOT / "bench" / "benchmarks.png"), help="PNG chart to write")
    p.add_argument("--json", default=str(ROOT / "bench" / "results.json"), help="raw results to write")
    p.add_argument("--from-json", metavar="PATH", help="only rewrite the report and chart from saved results")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 8)
    args.duration = args.duration or (1.0 if args.quick else 1.5)
    args.latency_rounds = args.latency_rounds or (3 if args.quick else 7)
    args.latency_calls = args.latency_calls or (60 if args.quick else 200)
    args.crowd = [int(x) for x in str(args.crowd).split(",") if x.strip()]
    if args.memory_objects is None:
        args.memory_objects = 20_000 if args.quick else 100_000
    return args


def command_line(argv: list[str] | None) -> str:
    """The command as run, with server URLs and output paths masked (they name this machine)."""
    masked = {
        "--redis-url": "<redis-url>",
        "--database-url": "<database-url>",
        "--out": "<file>",
        "--chart": "<file>",
        "--json": "<file>",
    }
    shown: list[str] = []
    args = list(argv if argv is not None else sys.argv[1:])
    while args:
        arg = args.pop(0)
        name, eq, _ = arg.partition("=")
        if name in masked:
            shown.append(f"{name} {masked[name]}")
            if not eq and args:
                args.pop(0)
        else:
            shown.append(arg)
    return " ".join(["python -m bench", *shown])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- servers and database -------------------------------------------------------------------------


class Servers:
    def __init__(self, redis_url: str | None, database_url: str | None) -> None:
        _servers = servers_module()
        self._started: list[Any] = []
        if redis_url is None:
            server = _servers.RedisServer().start()
            self._started.append(server)
            redis_url = server.url
        if database_url is None:
            pg = _servers.PostgresServer().start()
            self._started.append(pg)
            database_url = pg.url
        self.redis_url = redis_url
        self.base = _servers.database_settings_from_url(database_url)
        self.db_name = f"dsm_bench_{os.getpid()}_{int(time.time())}"
        self._admin("CREATE DATABASE {}")
        self.database = {**self.base, "NAME": self.db_name}

    def _admin(self, sql: str) -> None:
        import psycopg

        base = self.base
        kwargs = {"dbname": base["NAME"], "user": base.get("USER") or None, "host": base.get("HOST") or None}
        if base.get("PORT"):
            kwargs["port"] = base["PORT"]
        if base.get("PASSWORD"):
            kwargs["password"] = base["PASSWORD"]
        with psycopg.connect(autocommit=True, **{k: v for k, v in kwargs.items() if v is not None}) as conn:
            conn.execute(sql.format(self.db_name))

    def close(self) -> None:
        try:
            from django.db import connections

            connections.close_all()
            self._admin("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        finally:
            for server in reversed(self._started):
                server.stop()


def create_rows(objects: int) -> dict[str, Any]:
    """Per contender: the hot object, the spread objects, one object for latency and counts."""
    layout: dict[str, Any] = {}
    for name in CONTENDERS:
        model = model_for(name)
        rows = model.objects.bulk_create([model() for _ in range(objects + 2)])
        pks = [r.pk for r in rows]
        layout[name] = {"hot": pks[0], "probe": pks[1], "spread": pks[2:]}
    return layout


def reset(name: str) -> None:
    model_for(name).objects.update(balance=0, deposits=0)


def balance_sum(name: str) -> int:
    from django.db.models import Sum

    return int(model_for(name).objects.aggregate(s=Sum("balance"))["s"] or 0)


# -- machine --------------------------------------------------------------------------------------


def machine_info(redis_url: str) -> dict[str, Any]:
    import redis
    from django.db import connection

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = "unknown"
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            kb = int(next(line.split()[1] for line in fh if line.startswith("MemTotal")))
        memory = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    with connection.cursor() as cur:
        cur.execute("SHOW server_version")
        pg_version = cur.fetchone()[0]
        cur.execute("SHOW synchronous_commit")
        sync_commit = cur.fetchone()[0]
        cur.execute("SHOW fsync")
        fsync = cur.fetchone()[0]
    client = redis.Redis.from_url(redis_url)
    redis_version = client.info("server")["redis_version"]
    client.close()

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "measured": source_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "django": version("Django"),
        "postgresql": f"{pg_version} (fsync={fsync}, synchronous_commit={sync_commit})",
        "redis": redis_version,
        "psycopg": version("psycopg"),
        "redis-py": version("redis"),
        "django-fsm-2": version("django-fsm-2"),
        "django-logic": version("django-logic"),
        "dsm_redis": version("dsm_redis"),
    }


def source_version() -> str:
    """The dsm_redis measured: its version and, from git, the commit and whether it had local edits."""
    import dsm_redis

    package = Path(dsm_redis.__file__).resolve().parent
    text = f"dsm_redis {getattr(dsm_redis, '__version__', '?')}"

    def git(*cmd: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(package), *cmd], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short=10", "HEAD")
    if commit:
        dirty = git("status", "--porcelain", "--", ".")
        text += f", commit {commit}" + (" with uncommitted changes to dsm_redis/" if dirty else "")
    return text


# -- measurements ---------------------------------------------------------------------------------


def counts(layout: dict[str, Any], redis_url: str) -> dict[str, Any]:
    from bench import probes

    result = {}
    for name in CONTENDERS:
        model, pk = model_for(name), layout[name]["probe"]
        for _ in range(5):  # warm: connections open, scripts loaded
            CALLS[name](model.objects.get(pk=pk), pk, time.monotonic() + 60)
        obj = model.objects.get(pk=pk)
        call = CALLS[name]
        commands = probes.redis_commands(redis_url, lambda c=call, o=obj, k=pk: c(o, k, time.monotonic() + 60))
        obj = model.objects.get(pk=pk)
        sql = probes.sql_statements(lambda c=call, o=obj, k=pk: c(o, k, time.monotonic() + 60))
        result[name] = {"redis_client": commands["client"], "redis_lua": commands["lua"], "sql": sql}
    return result


def latency(layout: dict[str, Any], rounds: int, calls: int) -> dict[str, list[float]]:
    """Per contender, the median call time of each round (seconds), contenders interleaved."""
    return interleaved(CONTENDERS, rounds, calls, lambda name: deposit_on(name, layout[name]["probe"]))[0]


def deposit_on(name: str, pk: int) -> Callable[[], Any]:
    """Contender ``name``'s call on object ``pk``, the object loaded as a view would (not timed)."""
    obj = model_for(name).objects.get(pk=pk)
    return lambda: CALLS[name](obj, pk, time.monotonic() + 60)


def interleaved(
    names: Sequence[str], rounds: int, calls: int, ready: Callable[[str], Callable[[], Any]]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per name, each round's median wall-clock seconds per call and mean CPU seconds of the calling
    thread per call; ``ready(name)`` prepares one call (not timed) and returns it.

    Within a round the names take turns call by call (in an order rotated every round), so a burst
    of noise from anything else on the machine lands on all of them alike.
    """
    names = list(names)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        times: dict[str, list[float]] = {name: [] for name in order}
        spent: dict[str, list[float]] = {name: [] for name in order}
        for _ in range(calls):
            for name in order:
                call = ready(name)
                t0, c0 = time.perf_counter(), time.thread_time()
                call()
                spent[name].append(time.thread_time() - c0)
                times[name].append(time.perf_counter() - t0)
        for name in order:
            wall[name].append(statistics.median(times[name]))
            cpu[name].append(statistics.mean(spent[name]))
    return wall, cpu


def diagnostics(layout: dict[str, Any], calls: int) -> dict[str, Any]:
    """Where an uncontended call's time goes, and what dsm_redis's lease renewer costs.

    ``dsm_redis (renewer stubbed)`` is a diagnostic variant only: the lease renewer's per-lease
    ``add``/``discard`` are replaced by no-ops for those calls, to measure what registering every
    lease with the renewer thread costs (safe here: no call lasts anywhere near TTL/3).
    """
    from bench import probes
    from dsm_redis import lease as dsm_lease

    def entry(name: str) -> tuple[Any, Any]:
        model, pk, call = model_for(name), layout[name]["probe"], CALLS[name]
        return (lambda: model.objects.get(pk=pk)), (lambda obj: call(obj, pk, time.monotonic() + 60))

    entries = {name: entry(name) for name in CONTENDERS}
    renewer = getattr(dsm_lease, "_renewer", None)
    if renewer is not None and hasattr(renewer, "add") and hasattr(renewer, "discard"):
        load, dsm = entries["dsm_redis"]

        def dsm_stubbed(obj: Any) -> None:
            renewer.add = renewer.discard = lambda lease: None  # shadows the methods
            try:
                dsm(obj)
            finally:
                del renewer.add, renewer.discard

        entries["dsm_redis (renewer stubbed)"] = (load, dsm_stubbed)
    if hasattr(dsm_lease, "enter_barrier"):
        # What object_lock's door costs (fence.barrier: the token judged in a transaction of its
        # own before the block reads): an empty object_lock block against the bare lease.
        from dsm_redis.keys import object_key

        load, _ = entries["dsm_redis"]

        def door(obj: Any) -> None:
            with dsm_lease.object_lock(obj):
                pass

        def no_door(obj: Any) -> None:
            with dsm_lease.hold(object_key(obj)):
                pass

        entries["object_lock, empty block"] = (load, door)
        entries["lease alone, empty block (no door)"] = (load, no_door)
    return probes.breakdown(entries, calls)


def scenarios(objects: int, crowd: list[int]) -> list[dict[str, Any]]:
    out = [
        {"id": f"hot-{n}", "label": f"{n} proc, 1 hot object", "processes": n, "spread": False} for n in HOT_PROCESSES
    ]
    out.append({"id": f"spread-{SPREAD_PROCESSES}", "label": f"{SPREAD_PROCESSES} proc, {objects:,} objects",
                "processes": SPREAD_PROCESSES, "spread": True})  # fmt: skip
    out += [{"id": f"crowd-{n}", "label": f"{n} proc, 1 hot object", "processes": n, "spread": False} for n in crowd]
    return out


def pool_size(args: argparse.Namespace) -> int:
    return max(s["processes"] for s in scenarios(args.objects, args.crowd))


def races(pool: Any, layout: dict[str, Any], args: argparse.Namespace, redis_url: str) -> list[dict[str, Any]]:
    import redis

    from bench.pool import Race

    client = redis.Redis.from_url(redis_url)

    def redis_cpu() -> float | None:
        try:
            info = client.info("cpu")
            return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        except (redis.RedisError, KeyError, ValueError):
            return None

    records = []
    plan = scenarios(args.objects, args.crowd)
    total = args.repeats * len(plan) * len(CONTENDERS)
    done = 0
    for rep in range(args.repeats):
        for s_index, scenario in enumerate(plan):
            shift = (rep + s_index) % len(CONTENDERS)
            for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                reset(name)
                pks = tuple(layout[name]["spread"]) if scenario["spread"] else (layout[name]["hot"],)
                race = Race(name, pks, args.duration, time.time() + 0.2, seed=rep)
                results, cpu = pool.race(scenario["processes"], race, redis_cpu)
                final = balance_sum(name)
                ok = sum(r["ok"] for r in results)
                elapsed = max(r["ended"] for r in results) - race.start_at
                records.append({
                    "repeat": rep, "scenario": scenario["id"], "contender": name, "elapsed": elapsed,
                    "ok": ok, "final_balance": final, "lost": ok - final,
                    "retries": sum(r["retries"] for r in results),
                    "gave_up": sum(r["gave_up"] for r in results),
                    "errors": sum(r["errors"] for r in results),
                    "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
                    "goodput": final / elapsed, "throughput": ok / elapsed,
                    "client_cpu": sum(r["cpu"] for r in results), "machine_cpu": cpu["machine"],
                    "postgres_cpu": None if any(r["server_cpu"] is None for r in results) else sum(r["server_cpu"] for r in results),
                    "redis_cpu": cpu["redis"],
                    "latencies": [x for r in results for x in r["latencies"]],
                    "lease_waits": [x for r in results for x in r["lease_waits"]],
                })  # fmt: skip
                done += 1
                log(f"[{done}/{total}] {scenario['id']:>9} {name:<13} goodput {final / elapsed:7.0f}/s "
                    f"lost {ok - final:5d} retries {records[-1]['retries']:6d} errors {records[-1]['errors']}")  # fmt: skip
    return records


def phase_times(layout: dict[str, Any], calls: int) -> dict[str, list[tuple[str, float]]]:
    """Per-phase wall time of uncontended dsm_redis, floor and seed calls (``probes.phases``)."""
    from bench import probes

    out = {}
    for name in ("dsm_redis", "floor", "seed"):
        model, pk, call = model_for(name), layout[name]["probe"], CALLS[name]
        out[name] = probes.phases(
            lambda model=model, pk=pk: model.objects.get(pk=pk),
            lambda obj, pk=pk, call=call: call(obj, pk, time.monotonic() + 60),
            calls,
        )
    return out


def profiles(layout: dict[str, Any], calls: int) -> dict[str, Any]:
    from bench import probes

    out = {}
    for name in ("dsm_redis", "floor", "seed"):
        model, pk, call = model_for(name), layout[name]["probe"], CALLS[name]
        obj = model.objects.get(pk=pk)

        def once(obj: Any = obj, pk: int = pk, call: Any = call) -> None:
            call(obj, pk, time.monotonic() + 60)

        out[name] = probes.profile(once, calls)
        out[name]["cpu"] = probes.cpu_by_owner(once, calls)
    return out


# -- main -----------------------------------------------------------------------------------------


def prepare(servers: Any, objects: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Configure Django on the run's servers, migrate, create the rows: (worker setup, row layout)."""
    setup = {"database": servers.database, "redis_url": servers.redis_url, "run_id": str(os.getpid())}
    from bench.settings import configure

    configure(**setup)
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)
    return setup, create_rows(objects)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        from bench import report

        results = json.loads(Path(args.from_json).read_text())
        report.chart(results, Path(args.chart))
        Path(args.out).write_text(report.markdown(results, chart=os.path.relpath(args.chart, Path(args.out).parent)))
        print(report.summary(results))
        return 0
    t_start = time.time()
    load_start = os.getloadavg()
    log("starting servers" if not (args.redis_url and args.database_url) else "using the given servers")
    servers = Servers(args.redis_url, args.database_url)
    pool = None
    try:
        setup, layout = prepare(servers, args.objects)
        machine = machine_info(servers.redis_url)
        log(f"database {servers.db_name} ready; starting {pool_size(args)} worker processes")
        from bench.pool import Pool

        pool = Pool(pool_size(args), setup)
        pool.warm({name: layout[name]["spread"] for name in CONTENDERS})
        log("counting Redis commands and SQL statements per transition")
        counted = counts(layout, servers.redis_url)
        log(f"uncontended latency: {args.latency_rounds} rounds x {args.latency_calls} calls per contender")
        lat = latency(layout, args.latency_rounds, args.latency_calls)
        log(
            f"races: {args.repeats} repeats x {len(scenarios(args.objects, args.crowd))} scenarios x {len(CONTENDERS)} contenders, {args.duration:g} s each"
        )
        records = races(pool, layout, args, servers.redis_url)
        memory = None
        if args.memory_objects:
            from bench import probes

            log(f"Redis memory per object: a lease taken and released on {args.memory_objects:,} objects")
            memory = probes.redis_memory(servers.redis_url, args.memory_objects)
        log("timing the parts of an uncontended call; profiling")
        diag = diagnostics(layout, 300 if args.quick else 1500)
        profiled = profiles(layout, 300 if args.quick else 1000)
        phased = phase_times(layout, 300 if args.quick else 1500)
        results = {
            "command": command_line(argv),
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "chart", "json", "redis_url", "database_url")},
            "machine": machine, "counts": counted, "latency": lat, "races": records, "profiles": profiled,
            "breakdown": diag, "memory": memory, "phases": phased, "load": {"start": load_start, "end": os.getloadavg()},
            "wall_seconds": time.time() - t_start, "date": time.strftime("%Y-%m-%d"),
        }  # fmt: skip
    finally:
        if pool is not None:
            pool.close()
        servers.close()
    from bench import report

    Path(args.json).write_text(json.dumps(report.slim(results), indent=1))
    report.chart(results, Path(args.chart))
    Path(args.out).write_text(report.markdown(results, chart=os.path.relpath(args.chart, Path(args.out).parent)))
    log(f"wrote {args.out}, {args.chart}, {args.json} in {time.time() - t_start:.0f} s")
    print(report.summary(results))
    return 0
