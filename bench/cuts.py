"""``python -m bench.cuts``: a quick A/B probe for hot-path changes, lighter than ``python -m bench``.

Uncontended latency of dsm_redis, the floor and the seed, call by call in a rotated order (so
noise lands on all alike), as median µs per round, and the calling thread's CPU per call; optionally (``--race N``) the floor and
dsm_redis racing on one hot object with N processes, checked for lost updates; optionally
(``--profile N``) where each one's CPU per call goes, by who owns the code (dsm_redis, Django,
redis-py, psycopg, the standard library, socket calls). Run it on two
checkouts in turn: the floor is the same code in both, so dsm_redis/floor compares them even when
the machine's load drifts between runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.run import Servers, balance_sum, deposit_on, interleaved, prepare, reset

NAMES = ("dsm_redis", "floor", "seed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuts", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=300, help="calls per contender per round")
    p.add_argument("--race", type=int, default=0, help="processes racing on one hot object (0: no race)")
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--profile", type=int, default=0, help="then cProfile this many calls of each, by owner")
    p.add_argument("--redis-url")
    p.add_argument("--database-url")
    args = p.parse_args(argv)
    servers = Servers(args.redis_url, args.database_url)
    pool = None
    try:
        setup, layout = prepare(servers, max(8, args.race))
        if args.race:
            from bench.pool import Pool, Race

            pool = Pool(args.race, setup)
            pool.warm({name: layout[name]["spread"] for name in ("dsm_redis", "floor")})
            for name in ("floor", "dsm_redis"):
                reset(name)
                race = Race(name, (layout[name]["hot"],), args.duration, time.time() + 0.2)
                results, _ = pool.race(args.race, race, lambda: None)
                ok, final = sum(r["ok"] for r in results), balance_sum(name)
                errors = sum(r["errors"] for r in results)
                first = next((r["first_error"] for r in results if r["first_error"]), None)
                print(f"race {name:<10} {args.race} proc: ok {ok} lost {ok - final} errors {errors} {first or ''}")
        for name in NAMES:  # warm
            call = deposit_on(name, layout[name]["probe"])
            for _ in range(50):
                call()
        medians, cpu = interleaved(NAMES, args.rounds, args.calls, lambda name: deposit_on(name, layout[name]["probe"]))
        med = {name: statistics.median(v) * 1e6 for name, v in medians.items()}
        print(" ".join(f"{name} {med[name]:.0f}us" for name in NAMES),
              f"dsm/floor {med['dsm_redis'] / med['floor']:.3f} dsm/seed {med['dsm_redis'] / med['seed']:.3f}")  # fmt: skip
        # The caller's own CPU per call (its thread: the Python around the round trips), which the
        # machine's load moves far less than the wall-clock times above.
        used = {name: statistics.median(v) * 1e6 for name, v in cpu.items()}
        print("cpu " + " ".join(f"{name} {used[name]:.0f}us" for name in NAMES),
              f"dsm/floor {used['dsm_redis'] / used['floor']:.3f} dsm/seed {used['dsm_redis'] / used['seed']:.3f}")  # fmt: skip
        if args.profile:
            from bench.probes import cpu_by_owner

            for name in NAMES:
                found = cpu_by_owner(deposit_on(name, layout[name]["probe"]), args.profile)
                print(f"\nwhere {name}'s CPU per call goes ({found['cpu_per_call'] * 1e6:.0f} us):")
                for owner, seconds in found["owners"]:
                    print(f"  {owner:<32} {seconds * 1e6:6.0f} us")
    finally:
        if pool is not None:
            pool.close()
        servers.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
