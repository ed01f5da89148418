"""The ``nemesis`` subcommand of ``python -m dsm_redis``: its options, and the report it prints.

Exit status: 0 when the history checks clean, 1 when the checker found violations (or the run
could not happen), 2 when the linearizability search was undecided, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

INSTALL_HINT = "pip install 'dsm_redis[embedded,postgres,celery]'"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 5 <= value <= 86_400:
        raise argparse.ArgumentTypeError(f"must be between 5 and 86400 seconds, got {value:g}")
    return value


def _faults(text: str) -> tuple[str, ...]:
    from .faults import parse_kinds

    try:
        return parse_kinds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(commands: Any, positive_int: Callable[[str], int]) -> None:
    from .faults import KINDS

    p = commands.add_parser(
        "nemesis",
        help="random faults against real processes, Redis and PostgreSQL; check the history",
        description="Run worker processes (in network namespaces when possible) that loop random "
        "operations on a few shared objects through dsm_redis while faults are injected at random "
        "(seed-determined) moments; record the history, check it (journal vs outcomes, state chain, "
        "fencing tokens, linearizability) and print a report. Exits 0 only when it checks clean.",
    )
    p.add_argument("--seconds", type=_seconds, default=60.0, help="how long the workers run (default: 60)")
    p.add_argument("--seed", type=int, help="replay this operation and fault schedule (default: random, printed)")
    p.add_argument(
        "--hosts", type=int, default=3, help="network namespaces to spread workers over (default: 3; 0: none)"
    )
    p.add_argument("--workers", type=positive_int, default=6, help="worker processes (default: 6)")
    p.add_argument("--objects", type=positive_int, default=3, help="shared objects (default: 3)")
    p.add_argument(
        "--faults", type=_faults, default=KINDS, help=f"comma-separated fault kinds (default: all: {','.join(KINDS)})"
    )
    p.add_argument("--contender", choices=("dsm_redis", "cowboy"), default="dsm_redis",
                   help="the code under test (cowboy: the seed README's unprotected code, a negative control)")  # fmt: skip
    p.add_argument("--ttl", type=float, default=2.0, help="lease TTL in seconds (default: 2)")
    p.add_argument("--history", help="write the history (JSON lines) here (default: a file in the temp directory)")
    p.add_argument("--redis-url", help="use this Redis instead of starting one (Redis faults are then skipped)")
    p.add_argument(
        "--redis", choices=("single", "sentinel"), default="single",
        help="the Redis it starts: one persistent server (default), or a Sentinel group (a primary, a replica, "
        "3 sentinels) for the failover fault; workers then run on this host only",
    )  # fmt: skip
    p.add_argument(
        "--replica-acks", type=int, choices=(0, 1), default=0,
        help="the workers' REPLICA_ACKS: leases acknowledged by the replica (WAIT) before use; needs --redis sentinel",
    )  # fmt: skip
    p.add_argument("--database-url", help="use this PostgreSQL instead of starting one")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from django.core.exceptions import ImproperlyConfigured

    from dsm_redis.tools.servers import ServerUnavailable
    from dsm_redis.tools.servers.process import sigterm_as_interrupt

    from .run import NemesisError, Options, format_report, run

    if args.hosts < 0:
        return _fail("--hosts must be 0 or more")
    if importlib.util.find_spec("celery") is None:
        # Its locked_task operations would all end as "info" (ImportError) and test nothing.
        return _fail(f"the nemesis runs locked_task bodies, which need Celery: {INSTALL_HINT}")
    options = Options(
        seconds=args.seconds, seed=args.seed, hosts=args.hosts, workers=args.workers, objects=args.objects,
        faults=args.faults, redis_url=args.redis_url, database_url=args.database_url, history=args.history,
        contender=args.contender, ttl=args.ttl, redis=args.redis, replica_acks=args.replica_acks,
    )  # fmt: skip
    try:
        with sigterm_as_interrupt():
            report = run(options, sys.stderr)
    except ServerUnavailable as exc:
        return _fail(f"{str(exc).split('. ')[0]}. Install the embedded servers with: {INSTALL_HINT}")
    except (NemesisError, ImproperlyConfigured) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; everything the nemesis started has been stopped", status=130)
    print(format_report(report))
    if report.verdict.violations:
        return 1
    return 0 if report.verdict.clean else 2


def _fail(message: str, status: int = 1) -> int:
    print(f"dsm_redis nemesis: {message}", file=sys.stderr)
    return status
