"""``python -m dsm_redis demo`` end to end, in a subprocess, against the suite's running servers.

The demo creates (and drops) a database of its own on the suite's PostgreSQL and uses a Redis key
prefix of its own, so it needs no Django test database and starts no servers. Only outcomes are
asserted, never timings: how much the cowboy code loses depends on scheduling, what dsm_redis
loses must be nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsm_redis.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^(?P<contender>cowboy|dsm_redis)" + r"\s+(\d+)" * 5 + r"\s+[\d.]+s$")


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    return subprocess.run(
        [sys.executable, "-m", "dsm_redis", "demo", *args,
         "--redis-url", os.environ["DSM_TEST_REDIS_URL"],
         "--database-url", os.environ["DSM_TEST_DATABASE_URL"]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def table_rows(stdout: str) -> dict[str, tuple[int, ...]]:
    """contender -> (attempted, committed, refused, lost updates, illegal transitions)."""
    rows = {}
    for line in stdout.splitlines():
        match = ROW.match(line)
        if match:
            rows[match["contender"]] = tuple(int(n) for n in match.groups()[1:])
    return rows


def test_demo_dsm_redis_loses_nothing_where_cowboy_code_races():
    done = run_demo("--processes", "4", "--objects", "2", "--rounds", "15")
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    header = "contender  attempted  committed  refused  lost updates  illegal transitions  time"
    assert header in done.stdout.splitlines()
    rows = table_rows(done.stdout)
    assert set(rows) == {"cowboy", "dsm_redis"}, done.stdout
    attempted, committed, refused, lost, illegal = rows["dsm_redis"]
    assert (lost, illegal) == (0, 0)
    assert committed + refused <= attempted
    assert rows["cowboy"][0] == 4 * 15 * 2  # every round is a pay-or-bill and a deposit
    assert "Traceback" not in done.stderr


def test_demo_refuses_a_database_it_cannot_race_on(capsys: pytest.CaptureFixture[str]):
    # Fails before configuring Django, so it can run in this process.
    status = main(["demo", "--redis-url", os.environ["DSM_TEST_REDIS_URL"], "--database-url", "sqlite:///demo.db"])
    assert status == 1
    assert "needs PostgreSQL" in capsys.readouterr().err


def test_demo_rejects_nonsense_options(capsys: pytest.CaptureFixture[str]):
    assert main(["demo", "--processes", "0"]) == 2
    assert "--processes" in capsys.readouterr().err
