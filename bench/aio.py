"""``python -m bench.aio``: the asyncio contender beside the blocking dsm_redis one.

- ``dsm_redis``: the blocking call (``obj.machine.deposit()``) in worker processes, one caller per
  process, as in ``python -m bench`` (``bench.pool``);
- ``dsm_redis async``: N coroutines on ONE event loop in one process, each looping
  ``obj = await Model.objects.aget(pk=...)`` (not timed) then ``await obj.machine.adeposit()``
  (timed): the lease awaited on the loop, BEGIN..COMMIT in one worker-thread call.

Both on the hot object and over ``--objects`` objects, the same ``DsmAccount`` rows, alternated
within each repeat. Threads used: for the async contender the most threads its process had alive
during the race (sampled on the loop); for the blocking one, its processes times the threads each
had (the caller's and the lease renewer's). Writes the section ``## asyncio`` of ``BENCHMARKS.md``
(replaced in place; a full ``python -m bench`` run rewrites the file without it: run this again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.run import ROOT, Servers, balance_sum, command_line, log, prepare, reset

NAME = "dsm_redis"
SECTION = "## asyncio"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.aio", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repeat of 1 s races")
    p.add_argument("--repeats", type=int, help="repeats of every race (default 3; --quick: 1)")
    p.add_argument("--duration", type=float, help="seconds per race (default 1.5; --quick: 1)")
    p.add_argument("--coroutines", default="8,64,256", help="coroutines on the loop, comma-separated")
    p.add_argument("--processes", type=int, default=8, help="processes of the blocking contender")
    p.add_argument("--objects", type=int, default=1000, help="objects in the spread scenario")
    p.add_argument("--redis-url", help="use this Redis instead of starting one")
    p.add_argument("--database-url", help="use this PostgreSQL server (a database is created on it)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown report to update")
    p.add_argument("--json", default=str(ROOT / "bench" / "aio_results.json"), help="raw results to write")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.duration = args.duration or (1.0 if args.quick else 1.5)
    args.coroutines = [int(x) for x in str(args.coroutines).split(",") if x.strip()]
    return args


async def _async_race(pks: tuple[int, ...], coroutines: int, duration: float, seed: int) -> dict[str, Any]:
    from asgiref.sync import sync_to_async
    from django.db import connections

    from bench.contenders import model_for

    model = model_for(NAME)
    end = time.perf_counter() + duration
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    threads = threading.active_count()
    running = True

    async def sample() -> None:
        nonlocal threads
        while running:
            threads = max(threads, threading.active_count())
            await asyncio.sleep(0.005)

    async def caller(index: int) -> None:
        nonlocal errors, first_error
        rng = random.Random(seed * 1000 + index)
        while time.perf_counter() < end:
            obj = await model.objects.aget(pk=pks[0] if len(pks) == 1 else rng.choice(pks))
            t0 = time.perf_counter()
            try:
                await obj.machine.adeposit()
            except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                errors += 1
                first_error = first_error or repr(exc)
            latencies.append(time.perf_counter() - t0)

    sampler = asyncio.ensure_future(sample())
    started = time.time()
    await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(coroutines))), duration + 120)
    ended = time.time()
    running = False
    await sampler
    await sync_to_async(connections.close_all)()
    return {"ok": len(latencies) - errors, "errors": errors, "first_error": first_error, "latencies": latencies,
            "elapsed": ended - started, "threads": threads}  # fmt: skip


def _record(kind: str, scenario: str, callers: int, threads: int, run: dict[str, Any], final: int) -> dict[str, Any]:
    lat = sorted(run["latencies"]) or [0.0]
    return {
        "contender": kind,
        "scenario": scenario,
        "callers": callers,
        "threads": threads,
        "ok": run["ok"],
        "final_balance": final,
        "lost": run["ok"] - final,
        "errors": run["errors"],
        "first_error": run["first_error"],
        "goodput": final / run["elapsed"],
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


def _async_process(setup: dict[str, Any], pks: tuple[int, ...], n: int, duration: float, seed: int, out: Any) -> None:
    from bench.settings import configure

    configure(**setup)
    out.put(asyncio.run(_async_race(pks, n, duration, seed)))


def _in_process(setup: dict[str, Any], pks: tuple[int, ...], n: int, duration: float, seed: int) -> dict[str, Any]:
    """The async race in a process of its own (spawned): its thread count is the contender's alone."""
    from bench.pool import _ctx

    out = _ctx.Queue()
    process = _ctx.Process(target=_async_process, args=(setup, pks, n, duration, seed, out), daemon=True)
    process.start()
    try:
        return dict(out.get(timeout=duration + 300))
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def races(pool: Any, layout: dict[str, Any], setup: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench.pool import Race

    records = []
    plans = [("hot", (layout[NAME]["hot"],)), (f"{args.objects:,} objects", tuple(layout[NAME]["spread"]))]
    for rep in range(args.repeats):
        for scenario, pks in plans:
            reset(NAME)
            before = balance_sum(NAME)
            results, _ = pool.race(
                args.processes, Race(NAME, pks, args.duration, time.time() + 0.2, seed=rep), lambda: None
            )
            elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
            merged = {"ok": sum(r["ok"] for r in results), "errors": sum(r["errors"] for r in results),
                      "first_error": next((r["first_error"] for r in results if r["first_error"]), None),
                      "latencies": [x for r in results for x in r["latencies"]], "elapsed": elapsed}  # fmt: skip
            # Each blocking process: its caller's thread and the lease renewer's.
            records.append(_record("blocking", scenario, args.processes, 2 * args.processes, merged,
                                   balance_sum(NAME) - before))  # fmt: skip
            log(
                f"{scenario:>14} blocking x{args.processes:<4} goodput {records[-1]['goodput']:7.0f}/s lost {records[-1]['lost']}"
            )
            for n in args.coroutines:
                reset(NAME)
                run = _in_process(setup, pks, n, args.duration, rep)
                records.append(_record("async", scenario, n, run["threads"], run, balance_sum(NAME)))
                log(f"{scenario:>14} async    x{n:<4} goodput {records[-1]['goodput']:7.0f}/s lost {records[-1]['lost']} "
                    f"threads {run['threads']}")  # fmt: skip
    return records


def markdown(records: list[dict[str, Any]], command: str, args: argparse.Namespace, load: tuple[float, float]) -> str:
    rows = []
    keys = sorted({(r["scenario"], r["contender"], r["callers"]) for r in records}, key=lambda k: (k[0] != "hot", k))
    for scenario, kind, callers in keys:
        group = [r for r in records if (r["scenario"], r["contender"], r["callers"]) == (scenario, kind, callers)]
        who = (
            f"`{NAME}` blocking, {callers} processes"
            if kind == "blocking"
            else f"`{NAME}` async, {callers} coroutines on 1 loop"
        )
        rows.append(
            f"| {scenario} | {who} | {statistics.median(r['goodput'] for r in group):,.0f} | "
            f"{statistics.median(r['p50_ms'] for r in group):.1f} | {statistics.median(r['p99_ms'] for r in group):.1f} | "
            f"{max(r['threads'] for r in group)} | {sum(r['lost'] for r in group)} of {sum(r['ok'] for r in group):,} | "
            f"{sum(r['errors'] for r in group)} |"
        )
    return "\n".join(
        [
            SECTION,
            "",
            f"The asyncio API (`await obj.machine.adeposit()`) beside the blocking call, same rows, same servers; "
            f"`{command}` ({args.repeats} repeat(s) of {args.duration:g} s races, {time.strftime('%Y-%m-%d')}; "
            f"raw numbers: `bench/aio_results.json`). Goodput = deposits that survived per second; "
            f"latency from the call to its return, the lease wait included; threads: the most alive in the "
            f"async contender's one process during its race (the loop's, and Django's one thread-sensitive "
            f"worker thread for the database steps; leases are renewed by asyncio tasks), and for the "
            f"blocking one two per process (the caller's and the lease renewer's). Load average (1 min): "
            f"{load[0]:.1f} at the start, {load[1]:.1f} at the end (the machine may be shared).",
            "",
            "| scenario | contender | goodput /s | p50 ms | p99 ms | threads | lost updates | errors |",
            "|---|---|---:|---:|---:|---:|---|---:|",
            *rows,
            "",
            "Every database step of one loop runs in one worker thread (Django's thread-sensitive "
            "`sync_to_async`), so one process's async goodput is bounded by one thread's database "
            "round trips; waiting coroutines cost no thread (a waiter awaits the release's wake-up, and "
            "only one coroutine per object and loop is queued in Redis).",
            "",
        ]
    )


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    servers = Servers(args.redis_url, args.database_url)
    pool = None
    try:
        setup, layout = prepare(servers, args.objects)
        from bench.pool import Pool

        pool = Pool(args.processes, setup)
        pool.warm({NAME: layout[NAME]["spread"]})
        records = races(pool, layout, setup, args)
    finally:
        if pool is not None:
            pool.close()
        servers.close()
    command = command_line(argv).replace("python -m bench", "python -m bench.aio", 1)
    Path(args.json).write_text(json.dumps({"command": command, "records": records}, indent=1))
    write_section(Path(args.out), markdown(records, command, args, (load_start, os.getloadavg()[0])))
    log(f"wrote {args.out} ({SECTION}) and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
