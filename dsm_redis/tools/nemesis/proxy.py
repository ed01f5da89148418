"""A TCP relay, so that workers in other network namespaces reach a server that listens only
where they cannot (the embedded PostgreSQL listens on a unix socket, and unix sockets are not
confined by network namespaces: a worker must not be able to bypass a partition through one).

The relay listens on the hosts' server-side addresses and copies bytes both ways to its target
(a unix socket path, or a loopback TCP port). Accepted sockets use TCP keepalive and
``TCP_USER_TIMEOUT`` (a few seconds), as a server would, so a partitioned worker's connection is
dropped and its open transaction rolled back by PostgreSQL instead of holding row locks forever.

Limits: one thread per direction per connection (a few dozen connections in a nemesis run);
``stop()`` closes everything and joins nothing that could block.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Sequence

_KEEPALIVE = {"TCP_KEEPIDLE": 2, "TCP_KEEPINTVL": 1, "TCP_KEEPCNT": 3}
_USER_TIMEOUT_MS = 5000
_BUFFER = 65536


class Relay:
    def __init__(self, target: str | tuple[str, int], listen: Sequence[str]) -> None:
        self.target = target
        self.addresses = list(listen)
        self.port = 0
        self._listeners: list[socket.socket] = []
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self) -> Relay:
        for addr in self.addresses:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr, self.port))
            self.port = sock.getsockname()[1]  # the first picks a free port; the rest reuse it
            sock.listen(64)
            self._listeners.append(sock)
        threading.Thread(target=self._accept_loop, name="nemesis-relay", daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                ready, _, _ = select.select(self._listeners, [], [], 0.2)
            except (OSError, ValueError):
                return
            for listener in ready:
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.settimeout(5)
        upstream.connect(self.target)
        upstream.settimeout(None)
        return upstream

    def _serve(self, client: socket.socket) -> None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _KEEPALIVE.items():
            if hasattr(socket, name):
                client.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _USER_TIMEOUT_MS)
        try:
            upstream = self._connect()
        except OSError:
            client.close()
            return
        with self._lock:
            if self._stopped.is_set():
                client.close()
                upstream.close()
                return
            self._sockets.update((client, upstream))
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_BUFFER)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)

    def stop(self) -> None:
        self._stopped.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
