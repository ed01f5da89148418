"""What ``REPLICA_ACKS`` costs: a small probe, apart from the full benchmark.

``python -m bench.replica_acks`` starts a Sentinel group (a primary, a replica, three sentinels:
``dsm_redis.tools.servers.SentinelGroup``) and times an uncontended lease taken and given back (the
Redis part of a transition) through its ``redis+sentinel://`` URL, with ``REPLICA_ACKS`` 0 and 1,
interleaved round by round. It writes ``bench/replica_acks.md``, which ``python -m bench`` (and
``--from-json``) append to ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("replica_acks.md")
TIMES = "\N{MULTIPLICATION SIGN}"


def _backend(url: str, acks: int) -> Any:
    from dsm_redis.backends.redis import RedisLockBackend
    from dsm_redis.conf import parse

    return RedisLockBackend(
        parse({"LOCATION": url, "OPTIONS": {"KEY_PREFIX": f"bench-acks-{acks}", "REPLICA_ACKS": acks}})
    )


def _round(backend: Any, calls: int) -> list[float]:
    times = []
    for i in range(calls):
        key = f"bench.probe:{i % 50}"
        started = time.perf_counter()
        grant = backend.acquire(key, ttl=30, timeout=0)
        backend.release(key, grant.owner)
        times.append(time.perf_counter() - started)
    return times


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replica_acks", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=300, help="lease take-and-give-back calls per round and setting")
    args = p.parse_args(argv)

    from django.conf import settings

    if not settings.configured:
        settings.configure(INSTALLED_APPS=[], DSM_REDIS={})
    from dsm_redis.tools.servers import SentinelGroup

    samples: dict[int, list[float]] = {0: [], 1: []}
    with SentinelGroup() as group:
        backends = {acks: _backend(group.url, acks) for acks in samples}
        for backend in backends.values():
            _round(backend, 20)  # connections and script caches warm
        for _ in range(args.rounds):
            for acks, backend in backends.items():
                samples[acks] += _round(backend, args.calls)
        for backend in backends.values():
            backend.close()
    med = {acks: statistics.median(v) * 1000 for acks, v in samples.items()}
    p99 = {acks: _pct(v, 0.99) * 1000 for acks, v in samples.items()}
    lines = [
        "## Replica acknowledgement (`REPLICA_ACKS`)",
        "",
        f"Measured by `python -m bench.replica_acks` ({args.rounds} rounds {TIMES} {args.calls} calls per setting, "
        f"interleaved; {time.strftime('%Y-%m-%d')}, {platform.machine()}, the same machine as above): an "
        "uncontended lease taken and given back through a `redis+sentinel://` URL, a primary and one replica "
        "on loopback. With `REPLICA_ACKS = 1` the acquire script is sent with a `WAIT 1 <timeout>` behind it, "
        "in one round trip, whose reply comes once the replica acknowledged the lease.",
        "",
        "| `REPLICA_ACKS` | median per lease | p99 per lease |",
        "|---|---|---|",
        *(f"| {acks} | {med[acks]:.3f} ms | {p99[acks]:.3f} ms |" for acks in samples),
        "",
        f"The acknowledgement costs {med[1] - med[0]:.3f} ms per lease at the median ({med[1] / med[0]:.2f}{TIMES}), "
        "on loopback; across hosts add the replica's network round trip. A replica down or lagging makes "
        "each acquire wait `REPLICA_ACK_TIMEOUT` and fail with `LockNotReplicated`.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
