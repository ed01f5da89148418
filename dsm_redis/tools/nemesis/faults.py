"""The faults the nemesis injects, their seed-determined schedule, and the persistent Redis they
restart.

Kinds (``--faults``, all by default):

- ``pause``           SIGSTOP a worker for longer than the lease TTL, then SIGCONT
- ``kill``            SIGKILL a worker (mid-operation, as likely as not); the run restarts it
- ``redis-restart``   Redis killed and started *empty* (leases and fencing counters lost)
- ``redis-aof``       Redis killed and started from its append-only file (everything comes back,
                      leases of holders that moved on included)
- ``redis-rollback``  Redis killed and started from a copy of its AOF taken at an earlier fault
                      (a lagging replica promoted: older counters, old leases back)
- ``pg-terminate``    ``pg_terminate_backend`` of the PostgreSQL connections of one or two workers
- ``partition``       one host cut from Redis, from PostgreSQL, or from both, then healed
- ``failover``        (``--redis sentinel`` only) the Sentinel group's primary SIGKILLed (it comes
                      back, empty, as the new primary's replica), or demoted by ``SENTINEL
                      FAILOVER`` while it runs: clients still connected to it keep writing there
                      until the sentinels convert it to a replica, which throws those writes away

The schedule (times, kinds, victims, durations) comes from ``Random(f"{seed}:faults")`` alone:
the same seed and options give the same schedule. The first faults cycle through every enabled
kind once (in a seed-shuffled order), so a run long enough for that pass injects each kind.

Limits: faults are applied one at a time from the run's main thread; each is bounded (a pause or a
partition lasts at most ``2 * TTL + 2`` seconds, a Redis restart waits at most the server's start
timeout, a failover at most ``FAILOVER_TIMEOUT`` for each of its steps). Redis faults need the
embedded Redis (not ``--redis-url``); partitions need hosts; ``failover`` needs the embedded Sentinel
group, whose three ``redis-*`` kinds are skipped (its Redis is not persistent: losing what the
promoted replica never received is what a failover does to it).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("pause", "kill", "redis-restart", "redis-aof", "redis-rollback", "pg-terminate", "partition", "failover")
REDIS_KINDS = frozenset({"redis-restart", "redis-aof", "redis-rollback"})
FAILOVER_VARIANTS = ("kill", "demote")
# About what each variant takes (down-after 1 s; a demoted primary is converted by the sentinels
# about 8 s after the promotion): the schedule leaves that room, so a run's last failover ends in time.
FAILOVER_SECONDS = {"kill": 3.0, "demote": 12.0}
FAILOVER_TIMEOUT = 60.0  # per step of a failover: a guard against a group that never recovers
FIRST_AT = 2.0  # seconds into the run: workers are up
QUIET_END = 3.0  # no fault starts in the last seconds: the run ends healed
GAP = (1.0, 3.5)  # seconds between one fault's end and the next one's start
FIRST_GAP = (0.5, 1.5)  # ... during the first pass over every kind: short, so short runs see each kind


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the start of the run
    kind: str
    victim: int  # a worker slot, a host index or a number of backends: interpreted per kind
    duration: float
    variant: str = ""

    def describe(self) -> str:
        return f"{self.kind}{' ' + self.variant if self.variant else ''} @{self.at:.1f}s"


def parse_kinds(text: str | None) -> tuple[str, ...]:
    if not text or text == "all":
        return KINDS
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    return kinds


def fault_schedule(seed: int, seconds: float, kinds: tuple[str, ...], ttl: float) -> list[Fault]:
    rng = random.Random(f"{seed}:faults")
    order = list(kinds)
    rng.shuffle(order)
    faults: list[Fault] = []
    t = FIRST_AT
    for _ in range(10_000):  # bounded: one fault per second at most over any sane run
        if not kinds:
            break
        kind = order.pop(0) if order else rng.choice(kinds)
        if kind in ("pause", "partition"):
            duration = rng.uniform(ttl + 0.5, 2 * ttl + 2)
        else:
            duration = 0.0
        variant = ""
        if kind == "partition":
            variant = rng.choice(("redis", "postgres", "both"))
        elif kind == "failover":
            variant = rng.choice(FAILOVER_VARIANTS)
            duration = FAILOVER_SECONDS[variant]  # room in the schedule, not a wait
        if t + duration > seconds - QUIET_END:
            break
        faults.append(Fault(round(t, 3), kind, rng.randrange(1 << 30), round(duration, 3), variant))
        t += duration + rng.uniform(*(FIRST_GAP if order else GAP))
    return faults


class RedisControl:
    """The embedded Redis, persistent (AOF, fsync always, no rewrites) in a directory of the run's
    own, so that it can be restarted empty, from its AOF, or from an older copy of it."""

    def __init__(self, directory: Path, binds: list[str]) -> None:
        from dsm_redis.tools.servers import RedisServer

        self.data = directory / "data"
        self.snapshots = directory / "snapshots"
        self.data.mkdir(parents=True)
        self.snapshots.mkdir()
        self.taken: list[Path] = []
        self.server = RedisServer(
            extra_args=[
                "--bind", "127.0.0.1", *binds,
                "--dir", str(self.data),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--auto-aof-rewrite-percentage", "0",
                "--maxmemory-policy", "noeviction",
            ]
        )  # fmt: skip

    @property
    def aof(self) -> Path:
        return self.data / "appendonly.aof"

    def start(self) -> str:
        self.server.start()
        return self.server.url

    def snapshot(self) -> None:
        """Copy the AOF as it is now (a prefix of it: the last command may be torn, which Redis's
        ``aof-load-truncated`` accepts)."""
        if self.aof.exists():
            copy = self.snapshots / f"appendonly-{len(self.taken)}.aof"
            shutil.copyfile(self.aof, copy)
            self.taken.append(copy)

    def restart(self, mode: str) -> str:
        """``empty``, ``aof`` or ``rollback``; what was done, in words."""
        self.server.kill()
        detail = "from its AOF"
        if mode == "empty":
            for name in ("appendonly.aof", "dump.rdb"):
                with contextlib.suppress(FileNotFoundError):
                    (self.data / name).unlink()
            detail = "empty"
        elif mode == "rollback":
            older = self.taken[-2] if len(self.taken) >= 2 else (self.taken[0] if self.taken else None)
            if older is None:
                self.aof.unlink(missing_ok=True)
                detail = "rolled back to nothing (no snapshot yet)"
            else:
                shutil.copyfile(older, self.aof)
                detail = f"rolled back to {older.name}"
        self.server.start()
        return detail

    def ensure_running(self) -> None:
        if self.server.pid is None:
            self.server.start()

    def stop(self) -> None:
        self.server.stop()


class SentinelControl:
    """The embedded Sentinel group (a primary, a replica, three sentinels; not persistent), and its
    failovers. Each failover returns once the group is whole again: the sentinels agree on the new
    primary and the other server replicates it, so the next one can happen."""

    def __init__(self) -> None:
        from dsm_redis.tools.servers import SentinelGroup

        self.group = SentinelGroup(service="nemesis")

    def start(self) -> str:
        self.group.start()
        return self.group.url

    def failover(self, variant: str) -> str:
        """``kill`` or ``demote``; what was done, in words."""
        group = self.group
        old, replica = group.primary(), group.replica()
        # A replica out of sync is no candidate: the sentinels would refuse (NOGOODSLAVE) or stall.
        group.wait_until("the replica to be in sync", lambda: group.in_sync(replica), FAILOVER_TIMEOUT)
        started = time.monotonic()
        if variant == "kill":
            old.kill()
        else:
            group.wait_until("a sentinel to start a failover", self._forced, FAILOVER_TIMEOUT)
        new = group.wait_for_new_primary(old, FAILOVER_TIMEOUT)
        promoted = time.monotonic() - started
        if old.pid is None:
            self._restart_as_replica(old, new.port)
        group.wait_until("the old primary to replicate the new one", lambda: group.in_sync(old), FAILOVER_TIMEOUT)
        how = "SIGKILLed" if variant == "kill" else "demoted by SENTINEL FAILOVER"
        return (
            f"primary :{old.port} {how}; after {promoted:.1f}s every sentinel named :{new.port}, "
            f"and :{old.port} was not primary"
        )

    def _forced(self) -> bool:
        """``SENTINEL FAILOVER``: True once a sentinel accepted it. A replica that has just come back
        is no candidate until the sentinels' next look at it (NOGOODSLAVE), nor is any while the
        previous failover is still being finished (INPROG): asked again at the next poll."""
        from redis import Redis, RedisError

        sentinel = Redis(host="127.0.0.1", port=self.group.sentinels[0].port, socket_timeout=5)
        try:
            sentinel.execute_command("SENTINEL", "FAILOVER", self.group.service)
        except RedisError as exc:
            if not str(exc).startswith(("NOGOODSLAVE", "INPROG")):
                raise RuntimeError(f"SENTINEL FAILOVER: {exc}") from exc
            time.sleep(0.5)
            return False
        finally:
            sentinel.close()
        return True

    @staticmethod
    def _restart_as_replica(server: Any, primary_port: int) -> None:
        args = list(server.extra_args)
        if "--replicaof" in args:
            at = args.index("--replicaof")
            del args[at : at + 3]
        server.extra_args = (*args, "--replicaof", "127.0.0.1", str(primary_port))
        server.start()

    def ensure_whole(self) -> None:
        """Every server runs (one killed mid-fault comes back as the primary's replica)."""
        down = [s for s in self.group.servers if s.pid is None]
        if down:
            primary = self.group.wait_for_new_primary(down[0], FAILOVER_TIMEOUT)
            for server in down:
                self._restart_as_replica(server, primary.port)

    def stop(self) -> None:
        self.group.stop()


def stop_process(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    return True


def continue_process(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def kill_process(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def terminate_backends(application_names: list[str]) -> int:
    """``pg_terminate_backend`` every connection of the run's database with one of these names."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = ANY(%s)",
            [application_names],
        )
        row: Any = cursor.fetchone()
    return int(row[0]) if row else 0
