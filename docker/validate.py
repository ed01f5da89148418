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

Live (``--live``; needs ``dsm_redis[embedded,postgres,celery]``): a real Redis and PostgreSQL
(``dsm_redis._servers``), ``migrate``, several web server processes (gunicorn if installed, else
``manage.py runserver``), several Celery worker processes, and ``load.py`` against them; it fails
if the load script finds a lost update or a forbidden transition.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def check_compose() -> dict:
    try:
        import yaml
    except ImportError:
        sys.exit("validate.py needs PyYAML to read compose.yaml: pip install pyyaml")
    text = (HERE / "compose.yaml").read_text()
    compose = yaml.safe_load(text)  # resolves the x-app anchor and the << merges
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def live(web: int, workers: int, requests: int) -> None:
    sys.path.insert(0, str(ROOT))  # this checkout's dsm_redis, as the image installs it
    from dsm_redis._servers import PostgresServer, RedisServer

    print("live run (outside containers)")
    with RedisServer() as redis, PostgresServer() as pg:
        db = pg.django_settings()
        env = example_env(
            POSTGRES_HOST=db["HOST"], POSTGRES_PORT=str(db["PORT"]), POSTGRES_DB=db["NAME"],
            POSTGRES_USER=db["USER"], POSTGRES_PASSWORD=db["PASSWORD"] or "",
            DSM_REDIS_URL=redis.url, CELERY_BROKER_URL=redis.url.rsplit("/", 1)[0] + "/1",
            DSM_REDIS_LOG_LEVEL="WARNING",
        )  # fmt: skip
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=EXAMPLE, env=env, check=True
        )
        procs: list[subprocess.Popen[bytes]] = []
        logs = Path(tempfile.mkdtemp(prefix="dsm_redis-example-"))
        try:
            bases = []
            try:
                import gunicorn  # noqa: F401

                port = _free_port()
                bases.append(f"http://127.0.0.1:{port}")
                server = ["gunicorn", "shop.wsgi:application", f"--bind=127.0.0.1:{port}", f"--workers={web}"]
                procs.append(_spawn([sys.executable, "-m", *server], env, logs / "web.log"))
                print(f"  gunicorn with {web} workers")
            except ImportError:
                for i in range(web):
                    port = _free_port()
                    bases.append(f"http://127.0.0.1:{port}")
                    cmd = [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
                    procs.append(_spawn(cmd, env, logs / f"web{i}.log"))
                print(f"  {web} runserver processes (gunicorn is not installed)")
            for i in range(workers):
                cmd = [sys.executable, "-m", "celery", "-A", "shop", "worker", "--concurrency=2", "--loglevel=WARNING",
                       f"--hostname=w{i}@%h"]  # fmt: skip
                procs.append(_spawn(cmd, env, logs / f"worker{i}.log"))
            print(f"  {workers} Celery workers (2 processes each)")
            load = [sys.executable, str(HERE / "load.py"), *(f"--base={b}" for b in bases), f"--requests={requests}"]
            result = subprocess.run(load, env=env, capture_output=True, text=True, timeout=900)
            print("\n".join("  | " + line for line in (result.stdout + result.stderr).splitlines()))
            if result.returncode != 0:
                problem(f"load.py failed (logs in {logs})")
            else:
                shutil.rmtree(logs, ignore_errors=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=EXAMPLE, env=env, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(0.2)
    if proc.poll() is not None:
        sys.exit(f"{' '.join(cmd)} exited at once:\n{log.read_text()}")
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--live", action="store_true", help="also run the example for real (no containers)")
    parser.add_argument("--web", type=int, default=3, help="web server processes in the live run")
    parser.add_argument("--workers", type=int, default=3, help="Celery workers in the live run")
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
