#!/usr/bin/env python3
"""Load the example deployment and check that nothing was lost.

Standard library only: run it in the compose project (``docker compose --profile load run --rm
load``) or from any machine that reaches the web service (``python3 docker/load.py --base
http://localhost:8000``). Give ``--base`` several times to spread requests over several web
servers.

It creates a few subscriptions, then ``--clients`` threads send ``--requests`` requests at random
to them: deposits (synchronous, and queued to Celery with ``--async-share``), payments and bills.
Every deposit that was answered 200 (done) or 202 (queued) must show in the balances, and no
subscription may be charged or billed twice for one period. It waits for the Celery workers to
drain the queued deposits, prints a summary and exits 1 if anything was lost or forbidden.

Note: queued deposits are at-least-once, as Celery delivery is: a worker killed after its commit
but before its acknowledgement runs the deposit again (a self-loop cannot be recognised as a
duplicate by its state). With no worker killed, the balance must match exactly.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any


def call(base: str, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base.rstrip("/") + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"null")
        except ValueError:
            payload = None
        return exc.code, payload


def wait_ready(bases: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for base in bases:
        while True:
            try:
                if call(base, "GET", "/healthz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"{base} did not become ready within {timeout:.0f}s")
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", action="append", help="web base URL (repeatable); default http://localhost:8000")
    parser.add_argument("--objects", type=int, default=5, help="subscriptions to race on (default 5)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads (default 16)")
    parser.add_argument("--requests", type=int, default=1000, help="requests in all (default 1000)")
    parser.add_argument("--async-share", type=float, default=0.3, help="share of deposits queued to Celery")
    parser.add_argument("--drain-timeout", type=float, default=300, help="seconds to wait for queued deposits")
    parser.add_argument("--report", type=Path, help="also write the summary to this file, as JSON")
    args = parser.parse_args(argv)
    bases = args.base or ["http://localhost:8000"]
    wait_ready(bases, timeout=120)

    status, created = call(bases[0], "POST", "/subscriptions", {"count": args.objects})
    if status != 201:
        sys.exit(f"creating subscriptions failed: HTTP {status} {created}")
    ids: list[int] = created["ids"]
    _, before = call(bases[0], "GET", "/stats")

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    remaining = iter(range(args.requests))

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            with lock:
                if next(remaining, None) is None:
                    return
            base, pk = rng.choice(bases), rng.choice(ids)
            roll = rng.random()
            if roll < 0.6:
                queued = rng.random() < args.async_share
                status, _ = call(base, "POST", f"/subscriptions/{pk}/deposit" + ("/async" if queued else ""))
                kind = "deposit async" if queued else "deposit"
            else:
                edge = "pay" if roll < 0.8 else "bill"
                status, _ = call(base, "POST", f"/subscriptions/{pk}/{edge}")
                kind = edge
            with lock:
                outcomes[f"{kind} {status}"] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    expected = before["balance"] + outcomes["deposit 200"] + outcomes["deposit async 202"]
    deadline = time.monotonic() + args.drain_timeout
    while True:  # queued deposits finish in the Celery workers
        _, after = call(bases[0], "GET", "/stats")
        if after["balance"] >= expected or time.monotonic() > deadline:
            break
        time.sleep(1)

    print(f"{args.requests} requests from {args.clients} clients over {len(bases)} web server(s) in {elapsed:.1f}s")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome:<20} {count}")
    lost = expected - after["balance"]
    illegal = after["illegal"] - before["illegal"]
    print(
        f"deposits answered 200/202: {expected - before['balance']}; balance grew by {after['balance'] - before['balance']}"
    )
    print(f"lost updates: {lost}; forbidden transitions (double charge or bill): {illegal}")
    failures = sum(n for outcome, n in outcomes.items() if not outcome.endswith((" 200", " 202", " 409", " 503")))
    if failures:
        print(f"unexpected responses: {failures}")
    if args.report is not None:
        summary = {
            "requests": args.requests, "clients": args.clients, "web_servers": len(bases),
            "outcomes": dict(sorted(outcomes.items())),
            "deposits_answered": expected - before["balance"], "balance_grew": after["balance"] - before["balance"],
            "lost": lost, "forbidden": illegal, "unexpected": failures,
        }  # fmt: skip
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if lost == 0 and illegal == 0 and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
