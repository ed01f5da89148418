"""A throwaway PostgreSQL on a unix socket: from the ``pgserver`` wheel, else ``initdb``/``pg_ctl``."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

if TYPE_CHECKING:
    from typing_extensions import Self
from .process import (
    _INSTALL_HINT,
    _PG_TIMEOUT,
    _PG_TUNING,
    ServerUnavailable,
    _AtexitStop,
    _cmdline_mentions,
    _log_tail,
    _pid_alive,
    _Server,
    _terminate_pid,
)
from .urls import database_settings_from_url


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
    lines = ["", "# Added by dsm_redis.tools.servers: a throwaway server, durability is not wanted."]
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
