"""The Celery side of the tests: a real prefork worker, and what a worker does with a message.

:class:`Worker` runs ``celery -A tests.celery_app worker --pool=prefork`` on the suite's Redis
(broker in database 1) and the test database, in a session of its own so that it can be killed as
a group; ``run_transition`` runs the transition task in this thread, as a worker would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from django.db import connections

from dsm_redis import tasks as dsm_tasks
from tests.helpers import WAIT
from tests.testapp import tasks

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """``celery -A tests.celery_app worker --pool=prefork`` in its own session (killable as a group)."""

    def __init__(
        self,
        log: Path,
        name: str,
        queue: str,
        concurrency: int = 3,
        env: dict[str, str] | None = None,
        include: tuple[str, ...] = (),
    ) -> None:
        self.log, self.queue = log, queue
        env = {
            **os.environ,
            **(env or {}),
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DSM_TEST_DB_NAME": connections["default"].settings_dict["NAME"],
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [
            sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "--pool=prefork",
            f"--concurrency={concurrency}", "--loglevel=INFO", f"--hostname={name}-{uuid.uuid4().hex[:6]}@%h",
            "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat",
            *(f"--include={module}" for module in include),
        ]  # fmt: skip
        connections.close_all()  # nothing of ours stays open in the database the worker uses
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            tasks.ping.apply_async(queue=queue).get(timeout=WAIT)
        except Exception:
            self.stop()
            raise AssertionError(f"worker did not start:\n{log.read_text()[-4000:]}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), as a crashed host would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # warm shutdown (main process only): it stops its pool children
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        try:  # pool children left behind (there should be none)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_transition(payload: dict[str, Any], task_id: str | None = None) -> Any:
    """What a worker does with a message (eagerly, in this thread)."""
    return dsm_tasks.transition._get_current_object().apply(kwargs=payload, task_id=task_id, throw=True).get()
