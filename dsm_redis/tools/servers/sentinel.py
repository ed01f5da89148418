"""A throwaway Redis Sentinel group: one primary, one replica and three sentinels on loopback.

Every process is a :class:`RedisServer` (the same ``redis-server`` binary; a sentinel is that binary
run with ``--sentinel`` and a generated configuration it may rewrite), each in a temporary
directory of its own, on a free port. ``start()`` returns once the replica is in sync and every
sentinel knows the replica and the other sentinels, so a failover can happen; if any step fails,
whatever already started is stopped. The sentinels declare the primary down after
``down_after_ms`` without an answer: small (1 s by default) so a test's failover is quick.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from .process import _Server
from .redis import RedisServer

if TYPE_CHECKING:
    from typing_extensions import Self

_READY_TIMEOUT = 60.0  # a guard against a hung start, not a speed requirement


def _info(port: int, section: str) -> dict[str, str]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        raw = client.execute_command("INFO", section)
    finally:
        client.close()
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, str):
        return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)
    return {str(k): str(v) for k, v in dict(raw).items()}


class SentinelGroup(_Server):
    """``with SentinelGroup() as group: group.url`` — a ``redis+sentinel://`` URL of the service."""

    def __init__(
        self,
        service: str = "dsm",
        *,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.service = service
        self.sentinel_count = sentinels
        self.quorum = sentinels // 2 + 1
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisServer] = []  # the primary and the replica, in the order started
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self) -> Self:
        try:
            primary = RedisServer().start()
            self.servers.append(primary)
            self.servers.append(RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start())
            self.wait_until("the replica to sync with the primary", lambda: self.in_sync(self.servers[1]))
            for _ in range(self.sentinel_count):
                self.sentinels.append(
                    RedisServer(config=self._sentinel_config(primary.port), extra_args=["--sentinel"]).start()
                )
            self.wait_until("every sentinel to know the replica and the other sentinels", self._sentinels_ready)
        except BaseException:
            self.stop()
            raise
        return self

    def _sentinel_config(self, primary_port: int) -> str:
        name = self.service
        return "\n".join(
            [
                "sentinel deny-scripts-reconfig yes",
                f"sentinel monitor {name} 127.0.0.1 {primary_port} {self.quorum}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
                "",
            ]
        )

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            state = self.sentinel_state(sentinel)
            if state is None or int(state.get("num-slaves", 0)) < 1:
                return False
            if int(state.get("num-other-sentinels", 0)) < self.sentinel_count - 1:
                return False
        return True

    def sentinel_state(self, sentinel: RedisServer) -> dict[str, Any] | None:
        """``SENTINEL MASTER <service>`` as one sentinel sees it; None if it does not answer."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=2, socket_connect_timeout=2)
        try:
            state: Any = client.sentinel_master(self.service)
            return dict(state)
        except redis.RedisError:
            return None
        finally:
            client.close()

    def primary(self) -> RedisServer:
        """The server the sentinels name as the primary now (the first sentinel that answers)."""
        for sentinel in self.sentinels:
            state = self.sentinel_state(sentinel)
            if state is not None:
                return self._server_on(int(state["port"]))
        raise RuntimeError("no sentinel answers")

    def replica(self) -> RedisServer:
        """A server that is not the primary now."""
        primary = self.primary()
        return next(s for s in self.servers if s is not primary)

    def _server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def in_sync(self, replica: RedisServer) -> bool:
        try:
            return _info(replica.port, "replication").get("master_link_status") == "up"
        except Exception:  # noqa: BLE001 - not answering yet
            return False

    def wait_for_new_primary(self, old: RedisServer, timeout: float = _READY_TIMEOUT) -> RedisServer:
        """Wait until every sentinel that answers names a primary other than ``old``, that server
        says it is a primary, and ``old``, if it still runs, says it is a replica; return the new one."""

        def role(server: RedisServer) -> str | None:
            try:
                return _info(server.port, "replication").get("role")
            except Exception:  # noqa: BLE001 - not answering (yet, or any more)
                return None

        def promoted() -> RedisServer | None:
            ports = {int(state["port"]) for s in self.sentinels if (state := self.sentinel_state(s)) is not None}
            if len(ports) != 1 or old.port in ports:
                return None
            new = self._server_on(ports.pop())
            if role(new) != "master" or (old.pid is not None and role(old) != "slave"):
                return None
            return new

        return self.wait_until("the sentinels to promote a new primary", promoted, timeout)

    def wait_until(self, what: str, check: Any, timeout: float = _READY_TIMEOUT) -> Any:
        """``check()``'s first true value, polled until ``timeout``; else RuntimeError naming ``what``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")

    def stop(self) -> None:
        """Stop every process (sentinels first, so none of them reconfigures the others) and
        remove their directories. Idempotent."""
        for server in [*self.sentinels, *self.servers]:
            with contextlib.suppress(Exception):
                server.stop()
        self.sentinels, self.servers = [], []

    def __repr__(self) -> str:
        return f"<SentinelGroup {self.service} servers={self.servers} sentinels={len(self.sentinels)}>"
