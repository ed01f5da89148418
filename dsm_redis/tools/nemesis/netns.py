"""Hosts for the nemesis: Linux network namespaces joined to this one by veth links, and
partitions between them and the servers.

Each host gets a namespace ``dsmn-<run>-<i>`` and a veth pair whose host-side end carries two
addresses of a 10.213.X.0/24 block picked free at creation (one for Redis, one for PostgreSQL, so
that either can be cut alone); the namespace's end carries 10.213.X.10. Workers run inside with
``ip netns exec``. A partition adds a blackhole route inside the namespace (from Redis, from
PostgreSQL) or takes the host-side link down (from both); healing undoes it.

Limits: needs root and ``ip`` (iproute2); without them ``unavailable()`` says why and the run
goes on with one local host. Traffic only ever goes to loopback and to these links. Everything
created is removed by ``destroy()`` (idempotent), which the run calls from ``finally``, from an
``atexit`` hook and on SIGTERM/SIGINT; a SIGKILLed run leaves its namespaces behind (``ip netns
list | grep dsmn-`` finds them).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = "10.213"
_IP_TIMEOUT = 10.0
_LOCK_FILE = Path(tempfile.gettempdir()) / "dsm_redis-nemesis-netns.lock"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=check)


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"dsmn-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"`ip netns add` failed: {detail.strip()}"
    finally:
        with contextlib.suppress(Exception):
            _ip("netns", "del", probe, check=False)
    return None


@dataclass(eq=False)  # hashable by identity: a host is one namespace
class Host:
    index: int
    namespace: str
    link: str  # host-side veth
    peer: str  # namespace-side veth
    redis_addr: str
    postgres_addr: str
    addr: str
    cut: set[str] = field(default_factory=set)  # what it is partitioned from now

    @property
    def name(self) -> str:
        return f"h{self.index}"


class Hosts:
    def __init__(self, count: int, run_id: str) -> None:
        self.count = count
        self.run_id = run_id[:6]
        self.hosts: list[Host] = []
        self._destroyed = False
        self._pid = os.getpid()

    def create(self) -> list[Host]:
        atexit.register(self.destroy)
        with open(_LOCK_FILE, "a+") as lock:  # two runs must not pick the same block
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = self._taken_blocks()
            free = [x for x in range(1, 255) if x not in taken]
            if len(free) < self.count:
                raise RuntimeError(f"no free {BLOCK}.X.0/24 blocks left for {self.count} hosts")
            for i in range(self.count):
                self._add(i, free[i])
        return self.hosts

    @staticmethod
    def _taken_blocks() -> set[int]:
        out = _ip("-o", "-4", "addr", "show").stdout
        taken = set()
        for word in out.split():
            if word.startswith(BLOCK + "."):
                with contextlib.suppress(ValueError, IndexError):
                    taken.add(int(word.split(".")[2]))
        return taken

    def _add(self, i: int, x: int) -> None:
        ns = f"dsmn-{self.run_id}-{i}"
        host = Host(
            i, ns, f"dn{self.run_id}{i}", f"dp{self.run_id}{i}", f"{BLOCK}.{x}.1", f"{BLOCK}.{x}.2", f"{BLOCK}.{x}.10"
        )
        self.hosts.append(host)  # listed first: destroy() removes whatever part of it exists
        _ip("netns", "add", ns)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", host.peer, "netns", ns)
        _ip("addr", "add", f"{host.redis_addr}/24", "dev", host.link)
        _ip("addr", "add", f"{host.postgres_addr}/24", "dev", host.link)
        _ip("link", "set", host.link, "up")
        _ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", host.peer)
        _ip("-n", ns, "link", "set", host.peer, "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def command(self, host: Host, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", host.namespace, *argv]

    def partition(self, host: Host, target: str) -> None:
        """Cut ``host`` from ``redis``, ``postgres`` or ``both``."""
        if target == "both":
            _ip("link", "set", host.link, "down")
        else:
            addr = host.redis_addr if target == "redis" else host.postgres_addr
            _ip("-n", host.namespace, "route", "add", "blackhole", f"{addr}/32")
        host.cut.add(target)

    def heal(self, host: Host) -> None:
        for target in sorted(host.cut):
            if target == "both":
                _ip("link", "set", host.link, "up", check=False)
            else:
                addr = host.redis_addr if target == "redis" else host.postgres_addr
                _ip("-n", host.namespace, "route", "del", "blackhole", f"{addr}/32", check=False)
        host.cut.clear()

    def heal_all(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                self.heal(host)

    def destroy(self) -> None:
        """Remove every namespace and link this run made. Idempotent; best effort."""
        if self._destroyed or os.getpid() != self._pid:
            return
        self._destroyed = True
        for host in self.hosts:
            with contextlib.suppress(Exception):
                _ip("netns", "del", host.namespace, check=False)
            with contextlib.suppress(Exception):
                _ip("link", "del", host.link, check=False)
        with contextlib.suppress(Exception):
            atexit.unregister(self.destroy)
