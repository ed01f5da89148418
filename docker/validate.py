#!/usr/bin/env python3
"""Check the reference deployment without a Docker engine.

    python docker/validate.py           # static checks (below); needs PyYAML and Django + dsm_redis
    python docker/validate.py --live    # and run the example for real, outside containers

Static:
- compose.yaml: only keys of the Compose specification that this file means to use, every
  ``depends_on`` names a service with the right kind of readiness (a healthcheck for
  ``service_healthy``, a one-shot for ``service_completed_successfully``), named volumes are
  declared, every ``${VAR}`` has a default, the build context and Dockerfile exist, and the
  commands name modules and files the image contains;
- Dockerfile: every ``COPY`` source exists and survives ``Dockerfile.dockerignore``;
- the example project: ``manage.py check --deploy`` passes, the URLs resolve, and the Celery app
  registers ``shop.tasks.deposit`` and dsm_redis's transition task.

Live (``--live``; needs ``dsm_redis[embedded,postgres,celery]``, gunicorn and PyYAML): the
services of compose.yaml as plain processes, their commands read from compose.yaml — a real Redis
with compose's options (append-only file on) and PostgreSQL (``dsm_redis.tools.servers``), the
``migrate`` service (``check --deploy``, ``migrate``), gunicorn with several workers, several
Celery workers, and ``load.py`` against them; it fails if a service dies or the load script finds
a lost update, a forbidden transition or an unexpected response. ``tests/test_deployment.py``
runs the same pieces in the test suite, on loopback and across network namespaces.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = HERE / "example"

SERVICE_KEYS = {
    "build", "image", "init", "environment", "command", "restart", "depends_on", "healthcheck",
    "ports", "volumes", "deploy", "stop_grace_period", "profiles",
}  # fmt: skip
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}

problems: list[str] = []


def problem(message: str) -> None:
    problems.append(message)
    print(f"  PROBLEM: {message}")


def check_compose() -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        sys.exit("validate.py needs PyYAML to read compose.yaml: pip install pyyaml")
    text = (HERE / "compose.yaml").read_text()
    compose: dict[str, Any] = yaml.safe_load(text)  # resolves the x-app anchor and the << merges
    print("compose.yaml")
    allowed_top = {"name", "services", "volumes"}
    for key in compose:
        if key not in allowed_top and not key.startswith("x-"):
            problem(f"top-level key {key!r}")
    services = compose["services"]
    for var in re.findall(r"\$\{([^}]*)\}", text):
        if ":-" not in var:
            problem(f"${{{var}}} has no default: `docker compose up` would need an .env file")
    volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for key in service:
            if key not in SERVICE_KEYS:
                problem(f"services.{name}.{key} is not a key this file means to use")
        for dep, spec in (service.get("depends_on") or {}).items():
            if dep not in services:
                problem(f"services.{name} depends on unknown service {dep!r}")
                continue
            condition = spec.get("condition")
            if condition not in CONDITIONS:
                problem(f"services.{name}.depends_on.{dep}.condition {condition!r}")
            if condition == "service_healthy" and "healthcheck" not in services[dep]:
                problem(f"services.{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            if condition == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                problem(f"services.{name} waits for {dep} to complete, but {dep} restarts")
        health = service.get("healthcheck")
        if health is not None:
            if set(health) - HEALTHCHECK_KEYS:
                problem(f"services.{name}.healthcheck keys {sorted(set(health) - HEALTHCHECK_KEYS)}")
            if not (isinstance(health.get("test"), list) and health["test"][0] in ("CMD", "CMD-SHELL")):
                problem(f"services.{name}.healthcheck.test must be [CMD, ...] or [CMD-SHELL, ...]")
        for mount in service.get("volumes") or []:
            source = str(mount).split(":", 1)[0]
            if not source.startswith((".", "/")) and source not in volumes:
                problem(f"services.{name} mounts undeclared volume {source!r}")
        for port in service.get("ports") or []:
            if not re.fullmatch(r"(\d+:)?\d+(/(tcp|udp))?", str(port)):
                problem(f"services.{name}.ports {port!r}")
        replicas = (service.get("deploy") or {}).get("replicas")
        if replicas is not None and not (isinstance(replicas, int) and replicas > 0):
            problem(f"services.{name}.deploy.replicas {replicas!r}")
        build = service.get("build")
        if build:
            context = (HERE / build["context"]).resolve()
            if not (context / build["dockerfile"]).is_file():
                problem(f"services.{name}.build: no {build['dockerfile']} in {context}")
        if "build" not in service and "image" not in service:
            problem(f"services.{name} has neither build nor image")
    app_services = [n for n, s in services.items() if s.get("image") == "dsm-redis-example:latest"]
    print(f"  {len(services)} services; the app image runs {', '.join(app_services)}")
    for name in app_services:
        check_command(name, services[name]["command"])
    return compose


def check_command(name: str, command: list[str] | str) -> None:
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"]:
        for part in argv[2].split("&&"):
            check_command(name, shlex.split(part))
        return
    if argv[0] == "gunicorn":
        module, _, attr = argv[1].partition(":")
        path = EXAMPLE / (module.replace(".", "/") + ".py")
        if not path.is_file() or f"{attr} =" not in path.read_text():
            problem(f"services.{name}: gunicorn app {argv[1]} not found in the image's /app")
    elif argv[0] == "celery":
        app = argv[argv.index("-A") + 1]
        if not (EXAMPLE / app / "celery.py").is_file():
            problem(f"services.{name}: celery app {app!r} has no {app}/celery.py")
    elif argv[0] == "python":
        script = argv[1]
        if script == "manage.py":
            if not (EXAMPLE / "manage.py").is_file():
                problem(f"services.{name}: no manage.py in the image's /app")
        elif script == "load.py":
            if not (HERE / "load.py").is_file():
                problem(f"services.{name}: no load.py")
        else:
            problem(f"services.{name}: unknown script {script!r}")
    else:
        problem(f"services.{name}: unknown command {argv[0]!r}")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, simplified: last matching pattern wins; '!' re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            result = not negate
        elif pattern == "**":
            result = not negate
    return result


def check_dockerfile() -> None:
    print("Dockerfile")
    patterns = [
        line.strip()
        for line in (HERE / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = 0
    for line in (HERE / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, _ = line.split()[1:]
        for source in sources:
            copies += 1
            rel = source.rstrip("/")
            if not (ROOT / rel).exists():
                problem(f"COPY {source}: not in the build context (repository root)")
            elif ignored(rel, patterns):
                problem(f"COPY {source}: excluded by Dockerfile.dockerignore")
            elif (ROOT / rel).is_dir():
                sample = next((p for p in (ROOT / rel).rglob("*.py")), None)
                if sample is not None and ignored(str(sample.relative_to(ROOT)), patterns):
                    problem(f"COPY {source}: {sample.relative_to(ROOT)} is excluded by Dockerfile.dockerignore")
    for needed in ("dsm_redis/lua/acquire.lua", "dsm_redis/py.typed", "dsm_redis/migrations/0001_initial.py"):
        if ignored(needed, patterns):
            problem(f"{needed} is excluded by Dockerfile.dockerignore")
    print(f"  {copies} COPY sources present and not ignored")


def example_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "shop.settings", "PYTHONPATH": f"{EXAMPLE}{os.pathsep}{ROOT}"}
    env.update(extra)
    return env


PROBE = """
import django
django.setup()
from django.urls import resolve
for path in ("/healthz", "/stats", "/subscriptions", "/subscriptions/1", "/subscriptions/1/pay",
             "/subscriptions/1/deposit/async"):
    resolve(path)
from shop import celery_app
celery_app.loader.import_default_modules()
names = set(celery_app.tasks)
assert "shop.tasks.deposit" in names, sorted(names)
assert any(n.startswith("dsm_redis.") for n in names), sorted(names)
print("  URLs resolve; Celery tasks:", ", ".join(sorted(n for n in names if not n.startswith("celery."))))
"""


def check_django() -> None:
    print("example project")
    run = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "ERROR"],
        cwd=EXAMPLE, env=example_env(), capture_output=True, text=True,
    )  # fmt: skip
    if run.returncode != 0:
        problem(f"manage.py check --deploy failed:\n{run.stdout}{run.stderr}")
    else:
        print("  manage.py check --deploy: no errors")
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=EXAMPLE, env=example_env(), capture_output=True, text=True
    )
    if probe.returncode != 0:
        problem(f"URL/Celery probe failed:\n{probe.stdout}{probe.stderr}")
    else:
        print(probe.stdout.rstrip())


# -- live ------------------------------------------------------------------------------------------
#
# The same services as compose.yaml, started as plain processes: their commands are read from
# compose.yaml and run with this interpreter, so what runs here is what the containers would run.
# tests/test_deployment.py uses these pieces (on loopback, and across network namespaces).


class LiveFailure(RuntimeError):
    """A service failed to start, exited early, or the load script found something wrong."""


def compose_services() -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        sys.exit("validate.py needs PyYAML to read compose.yaml: pip install pyyaml")
    services: dict[str, Any] = yaml.safe_load((HERE / "compose.yaml").read_text())["services"]
    return services


def _argv(command: list[str] | str) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def service_commands(service: dict[str, Any]) -> list[list[str]]:
    """A service's command as argv lists to run outside its container (``sh -c "a && b"`` is two),
    with this interpreter for ``python``, ``gunicorn`` and ``celery``, and ``load.py`` from here."""
    argv = _argv(service["command"])
    if argv[:2] == ["sh", "-c"]:
        return [cmd for part in argv[2].split("&&") for cmd in service_commands({"command": part.strip()})]
    head, *rest = argv
    if head == "python" and rest[:1] == ["load.py"]:
        return [[sys.executable, str(HERE / "load.py"), *rest[1:]]]
    if head == "python":
        return [[sys.executable, *rest]]
    if head in ("gunicorn", "celery"):
        return [[sys.executable, "-m", head, *rest]]
    raise LiveFailure(f"do not know how to run {head!r} outside a container")


def with_option(argv: list[str], name: str, value: str | float) -> list[str]:
    """``argv`` with ``--name=value`` in place of any ``--name=...`` or ``--name ...`` it had."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == f"--{name}":
            skip = True
        elif not arg.startswith(f"--{name}="):
            out.append(arg)
    return [*out, f"--{name}={value}"]


def app_environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's ``environment`` with every ``${VAR:-default}`` resolved as Compose would."""

    def resolve(match: re.Match[str]) -> str:
        name, _, default = match.group(1).partition(":-")
        return os.environ.get(name) or default

    return {key: re.sub(r"\$\{([^}]*)\}", resolve, str(value)) for key, value in service["environment"].items()}


def server_env(services: dict[str, Any], redis_url: str, database: dict[str, Any], hosts: list[str]) -> dict[str, str]:
    """The app services' environment (compose.yaml's), pointed at these servers: ``redis_url`` is
    the lease Redis (db 0; the broker is db 1 on the same server), ``database`` a Django
    ``DATABASES`` entry, ``hosts`` the names the web server is reached by."""
    env = app_environment(services["web"])
    env.update(
        DSM_REDIS_URL=redis_url, CELERY_BROKER_URL=redis_url.rsplit("/", 1)[0] + "/1",
        POSTGRES_HOST=str(database["HOST"]), POSTGRES_PORT=str(database["PORT"] or 5432),
        POSTGRES_DB=str(database["NAME"]), POSTGRES_USER=str(database["USER"]),
        POSTGRES_PASSWORD=str(database["PASSWORD"] or ""), DJANGO_ALLOWED_HOSTS=",".join(hosts),
    )  # fmt: skip
    return env


@dataclass
class Side:
    """Where a group of processes runs: its environment (how it reaches the servers) and a command
    prefix (``["ip", "netns", "exec", "web"]`` runs it in a network namespace)."""

    env: dict[str, str]
    prefix: list[str] = field(default_factory=list)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LiveRun:
    """The example project's services as plain processes; ``stop()`` (or leaving the ``with``)
    ends every one of them, bounded in time. Logs go to ``logs/<name>.log``."""

    def __init__(self, logs: Path, services: dict[str, Any] | None = None) -> None:
        self.logs = logs
        self.services = services if services is not None else compose_services()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> LiveRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _command(self, side: Side, argv: list[str]) -> list[str]:
        return [*side.prefix, *argv]

    def once(self, name: str, side: Side, argv: list[str], timeout: float = 180) -> None:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            try:
                done = subprocess.run(
                    self._command(side, argv), cwd=EXAMPLE, env=example_env(**side.env), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise LiveFailure(f"{shlex.join(argv)} did not finish in {timeout:.0f}s:\n{_tail(log)}") from None
        if done.returncode != 0:
            raise LiveFailure(f"{shlex.join(argv)} exited with status {done.returncode}:\n{_tail(log)}")

    def spawn(self, name: str, side: Side, argv: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                self._command(side, argv), cwd=EXAMPLE, env=example_env(**side.env), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def migrate(self, side: Side) -> None:
        """The ``migrate`` service: ``check --deploy --fail-level ERROR``, then ``migrate``."""
        for i, argv in enumerate(service_commands(self.services["migrate"])):
            self.once(f"migrate-{i}", side, argv)

    def web(self, side: Side, bind: str, workers: int | None = None) -> str:
        """The ``web`` service (gunicorn) bound to ``bind`` (host:port); returns its base URL."""
        (argv,) = service_commands(self.services["web"])
        argv = with_option(argv, "bind", bind)
        if workers is not None:
            argv = with_option(argv, "workers", workers)
        self.spawn("web", side, argv)
        return f"http://{bind}"

    def workers(self, side: Side, count: int | None = None) -> None:
        """The ``worker`` service: ``count`` Celery workers (default: compose's replicas)."""
        (argv,) = service_commands(self.services["worker"])
        count = count if count is not None else int(self.services["worker"].get("deploy", {}).get("replicas", 1))
        for i in range(count):
            self.spawn(f"worker{i}", side, with_option(argv, "hostname", f"worker{i}@%h"))

    def load(self, bases: list[str], timeout: float = 600, **options: str | int | float) -> dict[str, Any]:
        """The ``load`` service against ``bases`` (``--base`` from compose replaced, other options
        overridden by ``options``); returns its report. Raises :class:`LiveFailure` if it found a
        lost update, a forbidden transition or an unexpected response, or a service died."""
        (argv,) = service_commands(self.services["load"])
        argv = [arg for arg in argv if not arg.startswith("--base")] + [f"--base={base}" for base in bases]
        for name, value in options.items():
            argv = with_option(argv, name.replace("_", "-"), value)
        report = self.logs / "load.json"
        argv = with_option(argv, "report", str(report))
        self.check_running()
        try:
            done = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LiveFailure(f"load.py did not finish in {timeout:.0f}s\n{self.log_tails()}") from None
        (self.logs / "load.log").write_text(done.stdout + done.stderr)
        print("\n".join("  | " + line for line in (done.stdout + done.stderr).splitlines()))
        self.check_running()
        if done.returncode != 0 or not report.is_file():
            raise LiveFailure(
                f"load.py failed (status {done.returncode}):\n{done.stdout}{done.stderr}\n{self.log_tails()}"
            )
        result: dict[str, Any] = json.loads(report.read_text())
        return result

    def check_running(self) -> None:
        dead = {name: proc.returncode for name, proc in self.procs.items() if proc.poll() is not None}
        if dead:
            raise LiveFailure(f"exited early: {dead}\n{self.log_tails()}")

    def log_tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{_tail(log)}" for log in sorted(self.logs.glob("*.log")))

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to every process (Celery finishes its tasks, gunicorn its requests), SIGKILL
        what is still running after ``timeout`` seconds."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def live(web: int, workers: int, requests: int) -> None:
    sys.path.insert(0, str(ROOT))  # this checkout's dsm_redis, as the image installs it
    from dsm_redis.tools.servers import PostgresServer, RedisServer

    print("live run (outside containers)")
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        sys.exit("validate.py --live runs the web service with gunicorn, as compose.yaml does: pip install gunicorn")
    services = compose_services()
    redis_args = _argv(services["redis"]["command"])[1:]  # --appendonly yes, --maxmemory-policy noeviction
    logs = Path(tempfile.mkdtemp(prefix="dsm_redis-example-"))
    with RedisServer(extra_args=redis_args) as redis, PostgresServer() as pg, LiveRun(logs, services) as run:
        side = Side(server_env(services, redis.url, pg.django_settings(), ["127.0.0.1"]))
        try:
            run.migrate(side)
            base = run.web(side, f"127.0.0.1:{_free_port()}", workers=web)
            print(f"  gunicorn with {web} workers")
            run.workers(side, workers)
            print(f"  {workers} Celery workers (2 processes each)")
            run.load([base], requests=requests)
        except LiveFailure as exc:
            problem(f"{exc}\n(logs in {logs})")
            return
    shutil.rmtree(logs, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", action="store_true", help="also run the example for real (no containers)")
    parser.add_argument("--web", type=int, default=4, help="gunicorn workers in the live run (compose: 4)")
    parser.add_argument("--workers", type=int, default=3, help="Celery workers in the live run (compose: 3)")
    parser.add_argument("--requests", type=int, default=600, help="requests the load script sends")
    args = parser.parse_args()
    check_compose()
    check_dockerfile()
    check_django()
    if args.live and not problems:
        live(args.web, args.workers, args.requests)
    print(f"{len(problems)} problem(s)" if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
