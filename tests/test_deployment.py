"""The reference deployment (``docker/``) run for real, without a Docker engine.

The services of ``docker/compose.yaml`` are started as plain processes with the commands read from
the compose file (``docker/validate.py``'s live run): ``manage.py check --deploy`` and ``migrate``,
gunicorn with 4 workers, Celery workers of 2 processes each, a Redis with compose's options (the
append-only file on) and PostgreSQL; then ``docker/load.py`` races requests over HTTP and the test
fails on any lost update, forbidden transition (a period charged or billed twice), unexpected
response or service that died.

Two topologies:

- on loopback, against a Redis of its own and a scratch database on the suite's PostgreSQL;
- across network namespaces: the web server in one, the Celery workers in another, each joined to
  this namespace by a veth link of its own (a /30 in a free ``10.219.X.0/24`` block); Redis and a
  PostgreSQL of the test's own listen on loopback and on the links' host-side addresses only, and
  load.py reaches gunicorn at its namespace's address. The namespaces have no route beyond their
  link, so traffic only goes to loopback and to them. The namespaces and links are removed on the
  way out, also on failure (a run killed with SIGKILL leaves them: ``ip netns list | grep dsmd-``).
  Skipped, with the reason shown in the warnings summary, without root or ``ip netns``.

The load is small (a few hundred requests) and only outcomes are asserted, never timings.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dsm_redis.tools.servers import RedisServer, _free_port, database_settings_from_url

ROOT = Path(__file__).resolve().parent.parent
WEB_WORKERS = 4  # gunicorn workers, as compose.yaml
CELERY_WORKERS = 2  # compose.yaml runs 3 replicas; 2 (of 2 processes each) keep a 2-core machine responsive
LOAD: dict[str, Any] = {"objects": 5, "clients": 8, "requests": 400, "drain_timeout": 60, "timeout": 240}
BLOCK = "10.219"  # the namespaces' links: one free 10.219.X.0/24 per run
_IP_TIMEOUT = 15.0


def skip_loudly(reason: str) -> None:
    """Skip, and say why in the warnings summary (shown without ``-rs``)."""
    warnings.warn(f"reference deployment not run: {reason}", UserWarning, stacklevel=2)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def validate() -> Iterator[ModuleType]:
    """``docker/validate.py`` (not a package: loaded from its file)."""
    if importlib.util.find_spec("yaml") is None or importlib.util.find_spec("gunicorn") is None:
        pytest.fail("the deployment tests need PyYAML and gunicorn: pip install -e '.[test]'")
    name = "dsm_redis_docker_validate"
    spec = importlib.util.spec_from_file_location(name, ROOT / "docker" / "validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def suite_postgres() -> dict[str, Any]:
    settings = database_settings_from_url(os.environ["DSM_TEST_DATABASE_URL"])
    if settings["ENGINE"] != "django.db.backends.postgresql":
        skip_loudly("the example project needs PostgreSQL, and DSM_TEST_DATABASE_URL names SQLite")
    return settings


def _connect(settings: dict[str, Any], **kwargs: Any) -> Any:
    import psycopg

    return psycopg.connect(
        host=settings["HOST"], port=settings["PORT"] or None, user=settings["USER"] or None,
        password=settings["PASSWORD"] or None, dbname=settings["NAME"], connect_timeout=5, **kwargs,
    )  # fmt: skip


@contextlib.contextmanager
def scratch_database(server: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """A database of the run's own on ``server`` (a Django ``DATABASES`` entry); dropped after."""
    with _connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {**server, "NAME": name}
    finally:
        with _connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_args(services: dict[str, Any]) -> list[str]:
    """compose.yaml's redis-server options (append-only file on, no eviction)."""
    command = services["redis"]["command"]
    assert command[0] == "redis-server", command
    return [str(arg) for arg in command[1:]]


def assert_sound(report: dict[str, Any]) -> None:
    print("load report:", json.dumps(report))
    assert report["lost"] == 0, report
    assert report["forbidden"] == 0, report
    assert report["unexpected"] == 0, report
    assert report["deposits_answered"] == report["balance_grew"], report
    assert sum(report["outcomes"].values()) == report["requests"], report
    # Celery took part: queued deposits were answered 202 and (balance_grew) all applied.
    assert report["outcomes"].get("deposit async 202", 0) > 0, report


def assert_aof_on(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()


def test_reference_deployment_files_are_consistent(validate: ModuleType) -> None:
    """validate.py's static checks: compose.yaml, the Dockerfile and its ignore file, the example
    project (``check --deploy``, URLs, Celery tasks)."""
    validate.problems.clear()
    validate.check_compose()
    validate.check_dockerfile()
    validate.check_django()
    assert validate.problems == []


def test_reference_deployment_on_loopback(validate: ModuleType, tmp_path: Path) -> None:
    server = suite_postgres()
    services = validate.compose_services()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(extra_args=redis_args(services)))
        database = stack.enter_context(scratch_database(server, f"dsm_deploy_{os.getpid()}"))
        run = stack.enter_context(validate.LiveRun(tmp_path, services))
        side = validate.Side(validate.server_env(services, redis.url, database, ["127.0.0.1"]))
        run.migrate(side)
        base = run.web(side, f"127.0.0.1:{_free_port()}", workers=WEB_WORKERS)
        run.workers(side, CELERY_WORKERS)
        report = run.load([base], **LOAD)
        assert_aof_on(redis.url)
    assert_sound(report)


# -- network namespaces ----------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=check)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"dsmd-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns add` failed: {(getattr(exc, 'stderr', '') or str(exc)).strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Link:
    """A namespace and the veth pair joining it to this one: ``host_addr`` here, ``addr`` there."""

    namespace: str
    link: str
    peer: str
    host_addr: str
    addr: str
    subnet: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]


class Namespaces:
    """``with Namespaces("web", "workers") as net: net["web"]`` — one namespace and /30 link each,
    in a 10.219.X.0/24 block no address of this machine uses; everything removed on exit."""

    def __init__(self, *roles: str) -> None:
        assert len(roles) <= 64
        self.roles = roles
        self.links: dict[str, Link] = {}
        self.tag = f"{os.getpid():x}"
        self.block = -1

    def __getitem__(self, role: str) -> Link:
        return self.links[role]

    def __enter__(self) -> Namespaces:
        try:
            lock_path = Path(tempfile.gettempdir()) / "dsm_redis-deployment-netns.lock"
            with open(lock_path, "a+") as lock:  # two runs must not pick the same block
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.block = self._free_block()
                for i, role in enumerate(self.roles):
                    self._add(i, role, self.block)
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @staticmethod
    def _free_block() -> int:
        taken = set()
        for word in _ip("-o", "-4", "addr", "show").stdout.split():
            if word.startswith(BLOCK + "."):
                with contextlib.suppress(ValueError, IndexError):
                    taken.add(int(word.split(".")[2]))
        free = [x for x in range(1, 255) if x not in taken]
        if not free:
            raise RuntimeError(f"no free {BLOCK}.X.0/24 block")
        return free[0]

    def _add(self, i: int, role: str, block: int) -> None:
        base = 4 * i  # 10.219.X.<base>/30: .base+1 here, .base+2 in the namespace
        link = Link(
            namespace=f"dsmd-{self.tag}-{role}", link=f"dd{self.tag}h{i}", peer=f"dd{self.tag}p{i}",
            host_addr=f"{BLOCK}.{block}.{base + 1}", addr=f"{BLOCK}.{block}.{base + 2}",
            subnet=f"{BLOCK}.{block}.{base}/30",
        )  # fmt: skip
        self.links[role] = link  # recorded first: destroy() removes whatever part of it exists
        _ip("netns", "add", link.namespace)
        _ip("link", "add", link.link, "type", "veth", "peer", "name", link.peer, "netns", link.namespace)
        _ip("addr", "add", f"{link.host_addr}/30", "dev", link.link)
        _ip("link", "set", link.link, "up")
        _ip("-n", link.namespace, "addr", "add", f"{link.addr}/30", "dev", link.peer)
        _ip("-n", link.namespace, "link", "set", link.peer, "up")
        _ip("-n", link.namespace, "link", "set", "lo", "up")

    def destroy(self) -> None:
        """Remove the namespaces (their veth ends go with them) and the host-side links. Idempotent."""
        for link in self.links.values():
            _ip("netns", "del", link.namespace, check=False)
            _ip("link", "del", link.link, check=False)  # gone with its peer already, normally
        self.links.clear()


def _postgres_bindir() -> Path:
    with contextlib.suppress(Exception):  # the pgserver wheel's binaries, as the suite's server
        return Path(importlib.import_module("pgserver._commands").POSTGRES_BIN_PATH)
    from dsm_redis.tools.servers.postgres import _find_pg_bindir

    bindir = _find_pg_bindir()
    if bindir is None:
        pytest.fail("no PostgreSQL binaries (pgserver wheel, or initdb/postgres on PATH)")
    return bindir


class TcpPostgres:
    """A PostgreSQL of the test's own listening on TCP at ``listen`` (the suite's listens on a unix
    socket only), accepting connections from loopback and ``clients`` (CIDRs) only. Run as an
    unprivileged user when root, as PostgreSQL requires."""

    def __init__(self, listen: list[str], clients: list[str]) -> None:
        self.listen = listen
        self.clients = clients
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dsm_redis-deploy-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def settings(self) -> dict[str, Any]:
        return {"ENGINE": "django.db.backends.postgresql", "NAME": "postgres", "USER": "postgres",
                "PASSWORD": "", "HOST": "127.0.0.1", "PORT": str(self.port)}  # fmt: skip

    def __enter__(self) -> TcpPostgres:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        import pwd

        bindir = _postgres_bindir()
        user: dict[str, Any] = {}
        if os.geteuid() == 0:
            for name in ("pgserver", "postgres", "nobody"):
                with contextlib.suppress(KeyError):
                    entry = pwd.getpwnam(name)
                    user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
                    os.chown(self.dir, entry.pw_uid, entry.pw_gid)
                    break
        data, log = self.dir / "data", self.dir / "postgres.log"
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
             "--locale=C", "--no-sync"],
            cwd=self.dir, capture_output=True, check=True, timeout=120, **user,
        )  # fmt: skip
        hba = ["local all all trust", "host all all 127.0.0.1/32 trust"]
        hba += [f"host all all {cidr} trust" for cidr in self.clients]
        (data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "100",
                    "log_connections": "on"}  # fmt: skip
        options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-h", ",".join(self.listen), "-p", str(self.port),
                 "-k", str(self.dir), *options],
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **user,
            )  # fmt: skip
        for _ in range(300):  # bounded by attempts (about 30 s of 0.1 s pauses), not by a clock
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with status {self.proc.returncode}:\n{log.read_text()}")
            with contextlib.suppress(Exception):
                _connect(self.settings()).close()
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not accept connections in time:\n{log.read_text()}")

    def client_addresses(self) -> set[str]:
        """The addresses TCP connections came from so far (``log_connections``)."""
        log = (self.dir / "postgres.log").read_text(errors="replace")
        return set(re.findall(r"connection received: host=([0-9.]+) ", log))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def client_addresses(redis_url: str) -> set[str]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return {str(c["addr"]).rsplit(":", 1)[0] for c in client.client_list()}
    finally:
        client.close()


def test_reference_deployment_across_network_namespaces(validate: ModuleType, tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason is not None:
        skip_loudly(reason)
    services = validate.compose_services()
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(Namespaces("web", "workers"))
        web, workers = net["web"], net["workers"]
        # Redis and PostgreSQL listen on loopback (for this test's own checks) and on the links.
        listen = ["127.0.0.1", web.host_addr, workers.host_addr]
        redis = stack.enter_context(RedisServer(extra_args=[*redis_args(services), "--bind", *listen]))
        pg = stack.enter_context(TcpPostgres(listen, [web.subnet, workers.subnet]))
        database = stack.enter_context(scratch_database(pg.settings(), "shop"))
        run = stack.enter_context(validate.LiveRun(tmp_path, services))

        def side(link: Link) -> Any:
            """The servers as seen from ``link``'s namespace: at the link's host-side address."""
            redis_url = f"redis://{link.host_addr}:{redis.port}/0"
            env = validate.server_env(services, redis_url, {**database, "HOST": link.host_addr}, [web.addr])
            return validate.Side(env, link.prefix)

        run.migrate(side(web))
        base = run.web(side(web), f"{web.addr}:8000", workers=WEB_WORKERS)
        run.workers(side(workers), CELERY_WORKERS)
        report = run.load([base], **LOAD)
        assert_aof_on(redis.url)
        # The web server and the workers reached Redis over their links (gunicorn workers hold
        # lease connections, Celery workers broker connections), not over some other path.
        assert {web.addr, workers.addr} <= client_addresses(redis.url)
        assert {web.addr, workers.addr} <= pg.client_addresses()  # and PostgreSQL
    assert_sound(report)
    # Nothing of the run is left: no namespace, no link, no address of its block.
    assert not {web.namespace, workers.namespace} & set(_ip("netns", "list").stdout.split())
    links = _ip("-o", "link", "show").stdout
    assert web.link not in links and workers.link not in links
    assert f" {BLOCK}.{net.block}." not in _ip("-o", "-4", "addr", "show").stdout
