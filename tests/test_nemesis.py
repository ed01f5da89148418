"""``python -m dsm_redis nemesis`` end to end, in subprocesses, plus its seed-determined schedules.

The short run injects every fault kind (the partition needs root and ``ip netns``; without them it
is skipped with a printed reason, and the test accepts that) and must check clean. The two
negative controls run the first seconds of the *same* seed's schedule (a shorter run's schedule is
a prefix of a longer one's) and must be caught: the seed README's unprotected cowboy code, and
dsm_redis with the database's fencing judgement switched off in the workers. Two more runs do the
same through a Sentinel group (``--redis sentinel``) whose primary is SIGKILLed and demoted: clean,
and caught with fencing off. Only verdicts are asserted, never counts or timings. The runs start
their own Redis (they restart it, or fail it over) and use the suite's PostgreSQL, where they create
and drop a database of their own.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsm_redis.__main__ import main
from dsm_redis.tools.nemesis.checker import check
from dsm_redis.tools.nemesis.faults import KINDS, fault_schedule, parse_kinds
from dsm_redis.tools.nemesis.history import load
from dsm_redis.tools.nemesis.workers import UNFENCED_ENV, schedule

ROOT = Path(__file__).resolve().parent.parent
SEED = 7
CLEAN_SECONDS, CONTROL_SECONDS = "45", "20"
# The Sentinel runs: seed 7's schedule kills a worker, then demotes the primary at 3 s (its clients
# keep writing to it until the sentinels convert it, about 8 s on: a split brain), then, in the
# longer run (its workers with REPLICA_ACKS 1), SIGKILLs the promoted one.
SENTINEL = ("--redis", "sentinel", "--faults", "failover,kill")
SENTINEL_CLEAN_SECONDS, SENTINEL_CONTROL_SECONDS = "25", "20"


def nemesis(history: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", UNFENCED_ENV)}
    return subprocess.run(
        [sys.executable, "-m", "dsm_redis", "nemesis", "--seed", str(SEED), "--history", str(history),
         "--database-url", os.environ["DSM_TEST_DATABASE_URL"], *args],
        cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def faults_injected(stdout: str) -> dict[str, int]:
    line = next(line for line in stdout.splitlines() if line.startswith("faults: "))
    return {m["kind"]: int(m["n"]) for m in re.finditer(r"(?P<kind>[a-z-]+) (?P<n>\d+)", line.split(";")[0])}


def skipped(stdout: str) -> set[str]:
    return {m[1] for m in re.finditer(r"^  skipped ([a-z-]+):", stdout, re.M)}


def test_a_short_run_with_every_fault_checks_clean(tmp_path: Path):
    history = tmp_path / "clean.jsonl"
    done = nemesis(history, "--seconds", CLEAN_SECONDS)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    assert "verdict: clean" in done.stdout
    injected = faults_injected(done.stdout)
    assert set(KINDS) - skipped(done.stdout) <= set(injected), done.stdout
    # The saved history checks clean on its own, and operations of every outcome kind were judged.
    verdict = check(load(history))
    assert verdict.clean and verdict.journal_entries > 0


def test_the_cowboy_contender_is_caught(tmp_path: Path):
    done = nemesis(tmp_path / "cowboy.jsonl", "--seconds", CONTROL_SECONDS, "--contender", "cowboy")
    assert done.returncode == 1, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    assert "VIOLATION" in done.stdout and "verdict: " in done.stdout


def test_dsm_redis_with_fencing_switched_off_is_caught(tmp_path: Path):
    done = nemesis(tmp_path / "unfenced.jsonl", "--seconds", CONTROL_SECONDS, env={UNFENCED_ENV: "1"})
    assert done.returncode == 1, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    assert "fencing DISABLED" in done.stdout
    assert "VIOLATION" in done.stdout


def test_a_run_through_sentinel_failovers_checks_clean(tmp_path: Path):
    """With REPLICA_ACKS too: each lease acknowledged by the replica (WAIT) across the failovers."""
    done = nemesis(tmp_path / "sentinel.jsonl", "--seconds", SENTINEL_CLEAN_SECONDS, *SENTINEL, "--replica-acks", "1")
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    assert "verdict: clean" in done.stdout
    assert faults_injected(done.stdout).get("failover", 0) >= 2, done.stdout
    assert {"redis-restart", "redis-aof", "redis-rollback", "partition"} <= skipped(done.stdout)
    history = load(tmp_path / "sentinel.jsonl")
    assert check(history).clean
    failovers = [e["detail"] for e in history.faults if e["kind"] == "failover" and e["phase"] == "end"]
    assert any("SIGKILLed" in d for d in failovers) and any("demoted" in d for d in failovers), failovers


def test_dsm_redis_with_fencing_switched_off_is_caught_by_a_sentinel_failover(tmp_path: Path):
    """The demoted primary's counters, raised by the clients still connected to it, are thrown away
    when the sentinels convert it: only the database's judgement refuses the lower tokens after."""
    done = nemesis(
        tmp_path / "sentinel-unfenced.jsonl", "--seconds", SENTINEL_CONTROL_SECONDS, *SENTINEL, env={UNFENCED_ENV: "1"}
    )
    assert done.returncode == 1, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-5000:]}"
    assert "fencing DISABLED" in done.stdout and faults_injected(done.stdout).get("failover", 0) >= 1
    assert "VIOLATION" in done.stdout


def test_the_fault_schedule_is_the_seeds_and_a_shorter_run_gets_its_prefix():
    kinds = tuple(k for k in KINDS if k != "failover")  # what a run with one Redis schedules
    long = fault_schedule(SEED, float(CLEAN_SECONDS), kinds, ttl=2.0)
    assert long == fault_schedule(SEED, float(CLEAN_SECONDS), kinds, ttl=2.0)
    assert long != fault_schedule(SEED + 1, float(CLEAN_SECONDS), kinds, ttl=2.0)
    assert {f.kind for f in long} == set(kinds)  # the first pass covers every kind
    short = fault_schedule(SEED, float(CONTROL_SECONDS), kinds, ttl=2.0)
    assert short and long[: len(short)] == short
    # What gives the fencing-off control its teeth: Redis forgetting counters (restarted empty, or
    # rolled back) hands out low tokens, which only the database's judgement refuses.
    assert {"redis-restart", "redis-rollback"} & {f.kind for f in short}
    for fault in long:
        assert fault.at + fault.duration <= float(CLEAN_SECONDS)
    # The Sentinel runs': a demote early in the shorter one, a SIGKILL of the primary in the longer.
    sentinel = ("failover", "kill")
    long = fault_schedule(SEED, float(SENTINEL_CLEAN_SECONDS), sentinel, ttl=2.0)
    short = fault_schedule(SEED, float(SENTINEL_CONTROL_SECONDS), sentinel, ttl=2.0)
    assert long[: len(short)] == short
    assert ("failover", "demote") in [(f.kind, f.variant) for f in short]
    assert ("failover", "kill") in [(f.kind, f.variant) for f in long]


def test_the_operation_schedule_is_the_seeds():
    first = list(itertools.islice(schedule(SEED, 3, [1, 2], 0.05), 50))
    assert first == list(itertools.islice(schedule(SEED, 3, [1, 2], 0.05), 50))
    assert first != list(itertools.islice(schedule(SEED, 4, [1, 2], 0.05), 50))
    assert {p.kind for p in first} >= {"advance", "deposit", "object_lock"}


def test_fault_kinds_are_checked_by_name(capsys: pytest.CaptureFixture[str]):
    assert parse_kinds("all") == KINDS
    assert parse_kinds("pause,kill") == ("pause", "kill")
    with pytest.raises(ValueError, match="unknown fault kind"):
        parse_kinds("pause,meteor")
    assert main(["nemesis", "--faults", "meteor"]) == 2
    assert "unknown fault kind" in capsys.readouterr().err
    # A Sentinel group is the nemesis's own: a Redis of the caller's cannot be failed over.
    assert main(["nemesis", "--redis", "sentinel", "--redis-url", "redis://127.0.0.1:1/0"]) == 1
    assert "--redis sentinel starts a Sentinel group of its own" in capsys.readouterr().err
    assert main(["nemesis", "--replica-acks", "1"]) == 1
    assert "--replica-acks needs replicas" in capsys.readouterr().err


def test_without_celery_the_nemesis_refuses_to_start_and_says_what_to_install():
    import subprocess
    import sys

    # A child whose import system has no celery: its locked_task operations would test nothing.
    code = (
        "import sys, importlib.util as u; real = u.find_spec; "
        "u.find_spec = lambda name, *a: None if name == 'celery' else real(name, *a); "
        "from dsm_redis.__main__ import main; sys.exit(main(['nemesis', '--seconds', '5']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "pip install 'dsm_redis[embedded,postgres,celery]'" in done.stderr
