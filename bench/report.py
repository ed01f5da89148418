# ruff: noqa: RUF001, RUF002 - the report is typeset text: its multiplication signs and dashes are meant
"""Statistics, the markdown report, the chart and the console summary, from one run's results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.contenders import CONTENDERS, DSM, FLOOR, LOGIC_BACKOFF, PEERS


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _runs(results: dict[str, Any], scenario: str, name: str) -> list[dict[str, Any]]:
    return [r for r in results["races"] if r["scenario"] == scenario and r["contender"] == name]


def scenario_ids(results: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for r in results["races"]:
        if r["scenario"] not in seen:
            seen.append(r["scenario"])
    return seen


def race_stats(results: dict[str, Any], scenario: str, name: str) -> dict[str, Any]:
    runs = _runs(results, scenario, name)
    lat = [x for r in runs for x in r.get("latencies", [])]
    pooled = results.get("latency_pooled", {}).get(f"{scenario}|{name}", {})
    ok = sum(r["ok"] for r in runs)
    return {
        "goodput": _median([r["goodput"] for r in runs]),
        "throughput": _median([r["throughput"] for r in runs]),
        "ok": ok,
        "lost": sum(r["lost"] for r in runs),
        "lost_max_run": max((r["lost"] for r in runs), default=0),
        "retries_per_call": sum(r["retries"] for r in runs) / max(1, ok + sum(r["gave_up"] for r in runs)),
        "gave_up": sum(r["gave_up"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "first_error": next((r["first_error"] for r in runs if r.get("first_error")), None),
        "machine_cpu_ms": _median([1000 * r["machine_cpu"] / r["final_balance"] for r in runs if r["final_balance"]]),
        "client_cpu_ms": _median([1000 * r["client_cpu"] / r["ok"] for r in runs if r["ok"]]),
        "postgres_cpu_ms": _median(
            [1000 * r["postgres_cpu"] / r["ok"] for r in runs if r["ok"] and r.get("postgres_cpu") is not None]
        ),
        "redis_cpu_ms": _median(
            [1000 * r["redis_cpu"] / r["ok"] for r in runs if r["ok"] and r.get("redis_cpu") is not None]
        ),
        "stack_cpu_ms": _median([1000 * _stack(r) / r["ok"] for r in runs if r["ok"] and _stack(r) is not None]),
        "stack_cpu_good_ms": _median(
            [1000 * _stack(r) / r["final_balance"] for r in runs if r["final_balance"] and _stack(r) is not None]
        ),
        "p50": _pct(lat, 0.5) if lat else pooled.get("p50", float("nan")),
        "p99": _pct(lat, 0.99) if lat else pooled.get("p99", float("nan")),
        "max": max(lat) if lat else pooled.get("max", float("nan")),
    }


def lease_wait_stats(results: dict[str, Any], scenario: str, name: str) -> dict[str, float] | None:
    """p50/p99/max of the lease waits (call to grant) over every call of every repeat, if measured."""
    runs = _runs(results, scenario, name)
    waits = [x for r in runs for x in r.get("lease_waits", [])]
    if waits:
        return {"calls": len(waits), "p50": _pct(waits, 0.5), "p99": _pct(waits, 0.99), "max": max(waits)}
    return results.get("lease_waits_pooled", {}).get(f"{scenario}|{name}")


def _stack(run: dict[str, Any]) -> float | None:
    """CPU seconds of the racing clients, their PostgreSQL backends and Redis during one race."""
    if run.get("postgres_cpu") is None or run.get("redis_cpu") is None:
        return None
    return run["client_cpu"] + run["postgres_cpu"] + run["redis_cpu"]


def _fall(results: dict[str, Any], crowd: str, hot: str, name: str) -> float:
    """Median over repeats of goodput(name, crowd) / goodput(name, hot) in the same repeat."""
    by_rep = {r["repeat"]: r["goodput"] for r in _runs(results, hot, name)}
    return _median([r["goodput"] / by_rep[r["repeat"]] for r in _runs(results, crowd, name) if by_rep.get(r["repeat"])])


def goodput_ratio(results: dict[str, Any], scenario: str, a: str, b: str) -> float:
    """Median over repeats of goodput(a) / goodput(b) measured in the same repeat."""
    by_rep = {r["repeat"]: r["goodput"] for r in _runs(results, scenario, b)}
    ratios = [r["goodput"] / by_rep[r["repeat"]] for r in _runs(results, scenario, a) if by_rep.get(r["repeat"])]
    return _median(ratios)


def ratio_range(results: dict[str, Any], scenario: str, a: str, b: str) -> str:
    """``median× (min–max)`` of goodput(a) / goodput(b) over repeats."""
    by_rep = {r["repeat"]: r["goodput"] for r in _runs(results, scenario, b)}
    ratios = [r["goodput"] / by_rep[r["repeat"]] for r in _runs(results, scenario, a) if by_rep.get(r["repeat"])]
    if len(ratios) < 2:
        return f"{_median(ratios):.2f}×"
    return f"{_median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def latency_ratio(results: dict[str, Any], a: str, b: str) -> float:
    """Median over rounds of median-latency(a) / median-latency(b) in the same round."""
    la, lb = results["latency"][a], results["latency"][b]
    return _median([x / y for x, y in zip(la, lb, strict=True)])


def round_trips(results: dict[str, Any], name: str) -> int:
    return len(results["counts"][name]["redis_client"])


def statements(results: dict[str, Any], name: str) -> list[str]:
    return results["counts"][name]["sql"]


def _verb(sql: str) -> str:
    s = sql.strip().upper()
    if s.startswith("SELECT") and "FOR UPDATE" in s:
        return "SELECT … FOR UPDATE"
    return s.split()[0] if s else "?"


# "A few times the p99": a waiter passed over again and again shows as a longest wait far beyond it.
STARVATION = 3.0


def _procs(scenario: str) -> int:
    return int(scenario.split("-")[1])


def targets(results: dict[str, Any], name: str = "dsm_redis") -> list[dict[str, Any]]:
    """The issue's targets, as measured for ``name`` (a dsm_redis contender)."""
    out = []
    r = latency_ratio(results, name, "seed")
    out.append({"target": "uncontended latency ≤ 1.0× seed", "measured": f"{r:.2f}× seed", "met": r <= 1.0})
    if FLOOR in results["latency"]:
        f = latency_ratio(results, name, FLOOR)
        out.append({"target": "uncontended latency ≤ 1.25× floor", "measured": f"{f:.2f}× floor", "met": f <= 1.25})
    hots = sorted((s for s in scenario_ids(results) if s.startswith("hot") and s != "hot-1"), key=_procs)
    hot = hots[-1]
    for h in hots:
        ratios = {p: goodput_ratio(results, h, name, p) for p in PEERS}
        detail = ", ".join(f"{r:.2f}× {p}" for p, r in ratios.items())
        out.append({"target": f"goodput on one hot object at {_procs(h)} processes ≥ 1.0× seed and every peer's",
                    "measured": detail, "met": min(ratios.values()) >= 1.0})  # fmt: skip
    spread = next(s for s in scenario_ids(results) if s.startswith("spread"))
    sr = goodput_ratio(results, spread, name, "seed")
    objects = f"{results['args']['objects']:,}"
    out.append({"target": f"goodput over {objects} objects ≥ 1.0× seed", "measured": f"{sr:.2f}× seed", "met": sr >= 1.0})
    waits = lease_wait_stats(results, hot, name)
    if waits and waits["p99"]:
        spread_of = waits["max"] / waits["p99"]
        out.append({"target": f"no starvation on one hot object at {_procs(hot)} processes: max lease wait ≤ "
                              f"{STARVATION}× its p99",
                    "measured": f"max {_ms(waits['max'])} ms = {spread_of:.1f}× p99 ({_ms(waits['p99'])} ms)",
                    "met": spread_of <= STARVATION})  # fmt: skip
    crowd = [s for s in scenario_ids(results) if s.startswith("crowd")]
    if crowd:
        # Goodput at 16/32 processes against the same contender's at 8, within each repeat.
        falls = {c: (_fall(results, c, hot, name), _fall(results, c, hot, "seed")) for c in crowd}
        detail = ", ".join(f"{c.split('-')[1]} proc {d:.2f}× (seed {sd:.2f}×)" for c, (d, sd) in falls.items())
        out.append({"target": f"goodput at {'/'.join(c.split('-')[1] for c in crowd)} processes ÷ goodput at "
                              f"{hot.split('-')[1]} ≥ seed's", "measured": detail,
                    "met": all(d >= sd for d, sd in falls.values())})  # fmt: skip
    lost = sum(r["lost"] for r in results["races"] if r["contender"] == name)
    calls = sum(r["ok"] for r in results["races"] if r["contender"] == name)
    out.append({"target": "zero lost updates", "measured": f"{lost} lost of {calls:,} committed", "met": lost == 0})
    rt = round_trips(results, name)
    kinds = ", ".join(c.split()[0].strip(chr(34)) for c in results["counts"][name]["redis_client"])
    out.append(
        {"target": "two Redis round trips per uncontended transition", "measured": f"{rt} ({kinds})", "met": rt == 2}
    )
    sql = statements(results, name)
    selects = [q for q in sql if q.strip().upper().startswith("SELECT")]
    out.append(
        {
            "target": "no extra read (one SELECT: the row lock)",
            "measured": f"{len(selects)} SELECT in {len(sql)} statements",
            "met": len(selects) == 1,
        }
    )
    return out


# -- markdown ------------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{1000 * x:.2f}"


def _s_label(results: dict[str, Any], sid: str) -> str:
    kind, n = sid.split("-")
    objects = results["args"]["objects"]
    return f"{n} proc, {objects:,} objects" if kind == "spread" else f"{n} proc, 1 object"


def markdown(results: dict[str, Any], chart: str) -> str:
    m, a = results["machine"], results["args"]
    sids = scenario_ids(results)
    hot_max = [s for s in sids if s.startswith("hot")][-1]
    spread = next(s for s in sids if s.startswith("spread"))
    L: list[str] = []
    w = L.append
    w("# Benchmarks")
    w("")
    w("dsm_redis against the code it replaces and against its peers: the same business operation, the same "
      "PostgreSQL and Redis on loopback, all contenders in one run, interleaved. Figures are medians over "
      "repeats and ratios measured within the same repeat; absolute times are for this machine only.")  # fmt: skip
    w("")
    w("Reproduce (from the repository root, in a virtualenv):")
    w("")
    w("```")
    w("pip install -e '.[bench]'")
    w(results["command"])
    w("```")
    w("")
    w(f"`python -m bench --quick` is a ~2 minute smoke run (1 repeat, 1 s races, Redis memory at 20,000 "
      f"objects); `--crowd ''` leaves out the 16/32-process figure and `--memory-objects 0` the memory one. "
      f"`--redis-url` / `--database-url` use existing "
      f"servers (a database is created on the PostgreSQL server for the run and dropped after it); without "
      f"them the run starts its own, like the test suite. This run: {a['repeats']} repeat{'s' if a['repeats'] != 1 else ''}, "
      f"{a['duration']:g} s per race, {a['latency_rounds']} latency rounds × {a['latency_calls']} calls, "
      f"{results['wall_seconds'] / 60:.1f} minutes in all ({results['date']}). Raw numbers: `bench/results.json`; "
      f"`python -m bench --from-json bench/results.json` rewrites this file and the chart from them.")  # fmt: skip
    w("")
    w(f"![goodput and latency per contender]({chart})")
    w("")
    w("## Machine")
    w("")
    w("| | |")
    w("|---|---|")
    if m.get("measured"):
        w(f"| measured | {m['measured']} |")
    w(f"| CPU | {m['cpu']}, {m['cores']} cores |")
    w(f"| memory | {m['memory']} |")
    w(f"| OS | {m['os']} |")
    for key in (
        "python",
        "django",
        "postgresql",
        "redis",
        "psycopg",
        "redis-py",
        "django-fsm-2",
        "django-logic",
        "dsm_redis",
    ):
        w(f"| {key} | {m[key]} |")
    load = results.get("load")
    if load:
        w(f"| load average (1 min) | {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end |")
    w("")
    w("PostgreSQL on a unix socket, Redis on 127.0.0.1, both on this machine; the processes racing, "
      "PostgreSQL and Redis share its cores. The machine may be shared with other work (see the load "
      "average): that is why contenders are interleaved and ratios are taken within a repeat.")  # fmt: skip
    w("")
    w("## Targets")
    w("")
    w("| target | " + " | ".join(DSM) + " |")
    w("|---|" + "---|" * len(DSM))
    per = {name: targets(results, name) for name in DSM}
    for i, t in enumerate(per["dsm_redis"]):
        cells = [f"{per[n][i]['measured']}: {'met' if per[n][i]['met'] else '**missed**'}" for n in DSM]
        w(f"| {t['target']} | " + " | ".join(cells) + " |")
    w("")
    w("`dsm_redis` is the library as configured by default; `dsm_redis+column` is the same library on a model "
      "that opts into `FencingTokenField` (the fencing mark kept in the row, written by the transition's own "
      "UPDATE, instead of in the shared mark table).")  # fmt: skip
    w("")
    w("## The operation and the contenders")
    w("")
    w("Each contender has its own model (same columns: `state`, `balance`, `deposits`) in the bench-only app "
      "`bench/benchapp`. The operation is a *deposit*: a self-loop edge `open → open` whose side effect reads "
      "`balance` from the instance and writes `balance + 1` (a read-modify-write, the shape of every lost "
      "update) and counts the deposit. A caller loads the object (`Model.objects.get`, not timed) and makes "
      "one call (timed from the call to its return, retries included):")  # fmt: skip
    w("")
    w("| contender | the call |")
    w("|---|---|")
    w("| `cowboy` | the seed README's code: check the state in memory, change, `save()`; no lock |")
    w(
        "| `seed` | deus-state-machina's algorithm, re-implemented: per-instance `RLock`, `atomic`, "
        "`select_for_update().get()`, `refresh_from_db()`, side effect, `save()`, `state_changed` |"
    )
    w("| `pg-advisory` | what a PostgreSQL user might pick instead of Redis: `atomic`, "
      "`SELECT pg_advisory_xact_lock(hashtext('<model>:<pk>'))` (a transaction-scoped lock per object, as "
      "`django-pglock` takes it), `select_for_update().get()`, side effect on that row, `save()` |")  # fmt: skip
    w(
        "| `django-fsm-2` | `ConcurrentTransitionMixin` model, `@transition(source='open', target='open')`; "
        "`deposit(); save()` inside `atomic` as its docs require; on `ConcurrentTransition` reload and retry until success |"
    )
    w(f"| `django-logic` | `Process` bound with `ProcessManager`, `Transition('deposit', sources=['open'], "
      f"target=None, side_effects=[...])` (its documented form for an edge that writes no new state; the side "
      f"effect saves `balance`, `deposits`); state lock = `cache.add` on Django's `RedisCache`; on a `locked` "
      f"refusal sleep a random 0–{LOGIC_BACKOFF * 1000:g} ms, reload, retry until success |")  # fmt: skip
    w(
        "| `dsm_redis` | `obj.machine.deposit()` (Redis backend, default TTL and renewal, fencing on); it waits "
        "for the lease itself |"
    )
    if "dsm_redis+column" in CONTENDERS:
        w("| `dsm_redis+column` | the same, on a model with `fencing_token = FencingTokenField()` |")
    if FLOOR in CONTENDERS:
        w("| `floor` | a reference, not a peer: dsm_redis's protocol with no library around it (`bench/floor.py`). "
          "redis-py calls of dsm_redis's acquire script (read from the installed package) and of "
          "python-redis-lock's UNLOCK script, waiting on the signal list with `BLPOP` like dsm_redis; then "
          "on a psycopg connection of its own (autocommit, default server-side binding, so statements are "
          "prepared after a few runs): `BEGIN`, `SELECT … FOR UPDATE` with `dsm_redis_fence(…)` in its select "
          "list, `UPDATE`, `COMMIT`; then the release. Its lost updates are counted like everyone's |")  # fmt: skip
    w("")
    w("Goodput = deposits that survived (the final balance) per second of race; throughput counts every call "
      "that returned success. Lost updates = successful calls − final balance. A call that retries more "
      "than 10 s past the race's end gives up and is counted.")  # fmt: skip
    w("")
    w("## Uncontended latency and cost per transition")
    w("")
    w("One process, one object, no contention. Latency: median of the per-round medians; ratios: median of the "
      "per-round ratios. Redis round trips: commands clients sent, as `MONITOR` shows them (commands a Lua "
      "script runs inside Redis are listed apart: no round trip). SQL: `CaptureQueriesContext` around the "
      "call (the caller's `get` not included).")  # fmt: skip
    w("")
    has_floor = FLOOR in results["latency"]
    w("| contender | latency ms | vs seed | vs cowboy | vs floor | Redis round trips | inside Lua | SQL statements |")
    w("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in CONTENDERS:
        c = results["counts"][name]
        verbs = [_verb(s) for s in c["sql"]]
        w(f"| {name} | {_ms(_median(results['latency'][name]))} | {latency_ratio(results, name, 'seed'):.2f}× | "
          f"{latency_ratio(results, name, 'cowboy'):.2f}× | "
          f"{f'{latency_ratio(results, name, FLOOR):.2f}×' if has_floor else '–'} | "
          f"{len(c['redis_client'])} | {len(c['redis_lua'])} | "
          f"{len(verbs)}: {', '.join(verbs)} |")  # fmt: skip
    w("")
    w("## Goodput")
    w("")
    w("Deposits that survived per second, median over repeats.")
    w("")
    w("| contender | " + " | ".join(_s_label(results, s) for s in sids) + " |")
    w("|---|" + "---:|" * len(sids))
    for name in CONTENDERS:
        w(f"| {name} | " + " | ".join(f"{race_stats(results, s, name)['goodput']:,.0f}" for s in sids) + " |")
    w("")
    w("Ratios: median over repeats of the ratio within a repeat; for dsm_redis, (lowest–highest) of those ratios. "
      "`floor` is dsm_redis's protocol by hand (a reference, not a peer):")  # fmt: skip
    w("")
    w("| ratio | " + " | ".join(_s_label(results, s) for s in sids) + " |")
    w("|---|" + "---:|" * len(sids))
    for name in DSM:
        for peer in [*PEERS, *([FLOOR] if FLOOR in CONTENDERS else [])]:
            w(f"| **{name} / {peer}** | " + " | ".join(ratio_range(results, s, name, peer) for s in sids) + " |")
    for name in PEERS:
        if name != "seed":
            w(
                f"| {name} / seed | "
                + " | ".join(f"{goodput_ratio(results, s, name, 'seed'):.2f}×" for s in sids)
                + " |"
            )
    for name in PEERS:
        if name != "cowboy":
            w(
                f"| {name} / cowboy | "
                + " | ".join(f"{goodput_ratio(results, s, name, 'cowboy'):.2f}×" for s in sids)
                + " |"
            )
    w("")
    w("Throughput (successful calls per second, lost ones included), median over repeats:")
    w("")
    w("| contender | " + " | ".join(_s_label(results, s) for s in sids) + " |")
    w("|---|" + "---:|" * len(sids))
    for name in CONTENDERS:
        w(f"| {name} | " + " | ".join(f"{race_stats(results, s, name)['throughput']:,.0f}" for s in sids) + " |")
    w("")
    w("## Lost updates")
    w("")
    w("Successful calls whose deposit is missing from the final balance, summed over all repeats "
      "(of how many successful calls).")  # fmt: skip
    w("")
    w("| contender | " + " | ".join(_s_label(results, s) for s in sids) + " |")
    w("|---|" + "---:|" * len(sids))
    for name in CONTENDERS:
        cells = []
        for s in sids:
            st = race_stats(results, s, name)
            cells.append(f"{st['lost']:,} / {st['ok']:,}")
        w(f"| {name} | " + " | ".join(cells) + " |")
    w("")
    w("## Fairness: how long a call waits")
    w("")
    w("Time from the call to its return (waiting for the lock or the row, retries included), over every call "
      "of every repeat: p50 / p99 / max in ms, and retries per call.")  # fmt: skip
    w("")
    hot_sids = [s for s in sids if s.startswith("hot")]
    w(
        "| contender | "
        + " | ".join(_s_label(results, s) for s in [*hot_sids, spread])
        + " | retries/call, "
        + _s_label(results, hot_max)
        + " |"
    )
    w("|---|" + "---:|" * (len(hot_sids) + 2))
    for name in CONTENDERS:
        cells = []
        for s in [*hot_sids, spread]:
            st = race_stats(results, s, name)
            cells.append(f"{_ms(st['p50'])} / {_ms(st['p99'])} / {_ms(st['max'])}")
        st = race_stats(results, hot_max, name)
        extra = f"{st['retries_per_call']:.2f}"
        if st["gave_up"]:
            extra += f" ({st['gave_up']} gave up)"
        w(f"| {name} | " + " | ".join(cells) + f" | {extra} |")
    w("")
    leased = [n for n in CONTENDERS if any(lease_wait_stats(results, s, n) for s in sids)]
    if leased:
        w("### Lease waits on one hot object")
        w("")
        w("Time from asking for the lease to holding it, measured in the racing processes (dsm_redis: a timer "
          "around its backend's `acquire`, installed by the bench worker; floor: its own acquire loop), over "
          "every call of every repeat: p50 / p99 / max in ms, and max ÷ p99 (starvation shows as a max far "
          "beyond the p99). The acquire round trip itself is included.")  # fmt: skip
        w("")
        lease_sids = [s for s in sids if not s.startswith("spread")]
        w("| contender | " + " | ".join(_s_label(results, s) for s in lease_sids) + " |")
        w("|---|" + "---:|" * len(lease_sids))
        for name in leased:
            cells = []
            for s in lease_sids:
                st = lease_wait_stats(results, s, name)
                cells.append("–" if not st else f"{_ms(st['p50'])} / {_ms(st['p99'])} / {_ms(st['max'])} "
                                                f"({st['max'] / st['p99'] if st['p99'] else float('nan'):.1f}×)")  # fmt: skip
            w(f"| {name} | " + " | ".join(cells) + " |")
        w("")
    errors = [(s, n, race_stats(results, s, n)) for s in sids for n in CONTENDERS]
    errors = [(s, n, st) for s, n, st in errors if st["errors"]]
    if errors:
        w("Calls that raised (counted, not retried):")
        w("")
        for s, n, st in errors:
            first = (st["first_error"] or "").strip().splitlines()[-1:] or ["?"]
            w(f"- {n}, {_s_label(results, s)}: {st['errors']} — `{first[0]}`")
        w("")
    mem = results.get("memory")
    if mem:
        w("## Redis memory per object")
        w("")
        w(f"What Redis keeps for every object that ever transitioned: a lease taken and released through "
          f"dsm_redis's own backend (its acquire and release scripts, the run's key prefix) on "
          f"{mem['objects']:,} distinct objects, then `INFO memory` `used_memory` and `DBSIZE` compared with "
          f"before, once the release's signal lists (1 s expiry) are gone; `MEMORY USAGE` of a sample of "
          f"the keys that stay, by kind (Redis {mem['redis']}).")  # fmt: skip
        w("")
        w("| objects | used_memory delta | bytes per object | keys left per object | MEMORY USAGE per key |")
        w("|---:|---:|---:|---:|---|")
        kinds = ", ".join(f"{k}: {v:.0f} B" for k, v in sorted(mem["memory_usage_by_kind"].items())) or "none left"
        w(f"| {mem['objects']:,} | {mem['used_memory_delta'] / 1024 / 1024:.1f} MiB | {mem['bytes_per_object']:.0f} | "
          f"{mem['keys_per_object']:.2f} | {kinds} |")  # fmt: skip
        w("")
    w("## CPU per transition")
    w("")
    w("The racing processes, PostgreSQL and Redis share the machine's cores, so without contention goodput is "
      "about cores ÷ CPU per transition. Counted per successful call, medians over repeats, ms: the racing "
      "Python processes (their own CPU time), the PostgreSQL backends serving them (`/proc/<pid>/stat`), "
      "Redis (`INFO cpu`); then their sum per call and per surviving deposit. The last column is the whole "
      "machine's busy time per surviving deposit (`/proc/stat`): it also counts whatever else ran on the "
      "machine meanwhile.")  # fmt: skip
    w("")
    for sid in (spread, hot_max):
        w(f"**{_s_label(results, sid)}**")
        w("")
        w(
            "| contender | Python clients | PostgreSQL | Redis | sum per call | sum per surviving deposit | whole machine per surviving deposit |"
        )
        w("|---|---:|---:|---:|---:|---:|---:|")
        for name in CONTENDERS:
            st = race_stats(results, sid, name)
            w(f"| {name} | {st['client_cpu_ms']:.2f} | {st['postgres_cpu_ms']:.2f} | {st['redis_cpu_ms']:.2f} | "
              f"{st['stack_cpu_ms']:.2f} | {st['stack_cpu_good_ms']:.2f} | {st['machine_cpu_ms']:.2f} |")  # fmt: skip
        w("")
    w("## What one uncontended transition sends")
    w("")
    for name in CONTENDERS:
        c = results["counts"][name]
        w(f"**{name}**")
        w("")
        w("```")
        for cmd in c["redis_client"]:
            w(f"redis> {_short(cmd)}")
        if c["redis_lua"]:
            w(f"        (inside Lua, no round trip: {', '.join(_short(x).split()[0] for x in c['redis_lua'])})")
        for sql in c["sql"]:
            w(f"sql>   {_short(sql, 150)}")
        w("```")
        w("")
    w("## Where the time of an uncontended call goes")
    w("")
    b = results["breakdown"]
    w("Timers, not a profiler: each call is split into time inside SQL statements and COMMIT (Django's "
      "`execute_wrapper` and `_commit`, client and server), time inside Redis commands (redis-py `execute_command`, client and server) and the "
      "rest (Python: Django, the library, the bench). All entries take turns call by call; medians, ms. "
      "`dsm_redis (renewer stubbed)` is a diagnostic variant: the lease renewer's per-lease `add`/`discard` "
      "replaced by no-ops for those calls, to measure what registering each lease with the renewer costs. "
      "`object_lock, empty block` against `lease alone, empty block (no door)` is what entering "
      "`object_lock` costs for its door (the token judged and committed before the block reads).")  # fmt: skip
    w("")
    w("| call | total | SQL + COMMIT | Redis | rest (Python) |")
    w("|---|---:|---:|---:|---:|")
    for name, v in b.items():
        w(f"| {name} | {_ms(v['total'])} | {_ms(v['sql'])} | {_ms(v['redis'])} | {_ms(v['rest'])} |")
    w("")
    phased = results.get("phases")
    if phased:
        w("Per phase, median µs over uncontended calls (`bench/probes.py` `phases`): the round trips (lease "
          "acquire and release, each SQL statement, Redis commands of the floor and COMMIT), timed at the "
          "lease backend, Django's `execute_wrapper` and `_commit`, and psycopg/redis-py for the floor; the "
          "gaps between them are Python. In a Django transaction psycopg sends `BEGIN` as a round trip of "
          "its own just before the first statement, so Django's `SQL SELECT` phase holds two round trips; "
          "the floor sends `BEGIN` itself.")  # fmt: skip
        w("")
        for name, rows in phased.items():
            total = sum(v for _, v in rows)
            python = sum(v for k, v in rows if k.startswith("Python"))
            w(f"**{name}**: {total * 1e6:.0f} µs in all, of which {python * 1e6:.0f} µs Python between round trips")
            w("")
            w("| phase | µs |")
            w("|---|---:|")
            for phase, v in rows:
                w(f"| {phase} | {v * 1e6:.0f} |")
            w("")
    p = results["profiles"]
    by_owner = {n: p[n]["cpu"] for n in ("dsm_redis", FLOOR, "seed") if n in p and "cpu" in p[n]}
    if by_owner:
        w("### Where the CPU goes")
        w("")
        w("The calling thread's CPU per uncontended call, split by who owns the code that spends it: each "
          "function's own time under cProfile on the thread's CPU clock, summed by owner and scaled to the "
          "CPU per call measured without the profiler (µs). Approximate: the profiler's cost per Python "
          "call inflates code made of many small Python functions (dsm_redis, Django, redis-py's Python) "
          "against C (psycopg's and hiredis's extensions, builtins).")  # fmt: skip
        w("")
        owners = list(dict.fromkeys(o for found in by_owner.values() for o, _ in found["owners"]))
        w("| owner | " + " | ".join(by_owner) + " |")
        w("|---|" + "---:|" * len(by_owner))
        for owner in owners:
            cells = [next((f"{v * 1e6:.0f}" for o, v in found["owners"] if o == owner), "–") for found in by_owner.values()]
            w(f"| {owner} | " + " | ".join(cells) + " |")
        w("| **CPU per call** | " + " | ".join(f"**{f['cpu_per_call'] * 1e6:.0f}**" for f in by_owner.values()) + " |")
        w("")
    for name in [n for n in ("dsm_redis", FLOOR) if n in p]:
        w(f"cProfile of {p[name]['calls']} uncontended {name} calls (the profiler inflates Python time), "
          f"top functions by own time:")  # fmt: skip
        w("")
        w("```")
        w("\n".join(p[name]["top"].splitlines()[:16]))
        w("```")
        w("")
    w("")
    w(analysis(results))
    w("")
    w(FINDINGS.strip())
    w("")
    # Measured apart, kept across runs: the cuts (python -m bench.cuts, each against the code before
    # it) and python -m bench.replica_acks.
    for name in ("cuts.md", "replica_acks.md"):
        probe = Path(__file__).with_name(name)
        if probe.exists():
            w("")
            w(probe.read_text().strip())
            w("")
    return "\n".join(L)


def analysis(results: dict[str, Any]) -> str:
    """Why each missed target is missed, with this run's numbers, and what would fix it."""
    b = results["breakdown"]
    sids = scenario_ids(results)
    hot_max = [s for s in sids if s.startswith("hot")][-1]
    spread = next(s for s in sids if s.startswith("spread"))
    dsm, seed = b["dsm_redis"], b["seed"]
    column = b.get("dsm_redis+column")
    stub = b.get("dsm_redis (renewer stubbed)")
    renewer = dsm["total"] - stub["total"] if stub else 0.0
    fence = dsm["total"] - column["total"] if column else 0.0
    t = {name: targets(results, name) for name in DSM}
    missed = {x["target"] for name in DSM for x in t[name] if not x["met"]}
    out = ["## Why the missed targets are missed, and what would fix them", ""]
    if not missed:
        out.append("Every target was met in this run.")
        return "\n".join(out)

    def measured(target: str) -> str:
        return "; ".join(f"{name} {next(x['measured'] for x in t[name] if x['target'] == target)}" for name in DSM)

    floor = b.get(FLOOR)
    if floor is not None:
        fr = latency_ratio(results, "dsm_redis", FLOOR)
        out += [
            f"**Against the floor (dsm_redis {fr:.2f}× floor).** Per call (timers above): floor {_ms(floor['total'])} ms "
            f"= SQL {_ms(floor['sql'])} + Redis {_ms(floor['redis'])} + Python {_ms(floor['rest'])}; dsm_redis "
            f"{_ms(dsm['total'])} ms = SQL {_ms(dsm['sql'])} + Redis {_ms(dsm['redis'])} + Python {_ms(dsm['rest'])}. "
            f"Both send the same four statements and two Redis commands, so the difference is time spent in "
            f"Python around them: the SELECT and the UPDATE are compiled once (`rowlock.py`, `rowwrite.py`), but "
            f"each call still binds its parameters, sends `pre_save`/`post_save`, turns the locked row into a "
            f"model instance, and goes through Django's cursor wrappers and client-side binding; then the "
            f"library's own bookkeeping (lease registry, renewer, on-commit hooks, snapshots).",
            "",
        ]
    lat = next((m for m in missed if m.startswith("uncontended")), None)
    if lat:
        text = (
            f"**Uncontended latency ({measured(lat)}).** Per call (timers above): dsm_redis "
            f"{_ms(dsm['total'])} ms = SQL {_ms(dsm['sql'])} + Redis {_ms(dsm['redis'])} + Python {_ms(dsm['rest'])}; "
            f"seed {_ms(seed['total'])} ms = SQL {_ms(seed['sql'])} + Python {_ms(seed['rest'])}. dsm_redis sends "
            f"one SQL statement fewer than seed (no `refresh_from_db`), but adds two Redis round trips "
            f"({_ms(dsm['redis'])} ms, the protocol's floor: acquire and release)"
        )
        if column:
            text += (
                f", and by default its row-lock SELECT also upserts the fencing mark in the shared mark table "
                f"(a second row written, with its WAL record, per transition): on a model with "
                f"`FencingTokenField` the same call takes {_ms(column['total'])} ms ({_ms(abs(fence))} ms "
                f"{'less' if fence >= 0 else 'more'})"
            )
        text += "."
        if stub:
            text += (
                f" The diagnostic row with the renewer's per-lease `add`/`discard` stubbed out differs by "
                f"{_ms(renewer)} ms: registering a lease takes the renewer's lock and a heap push, without "
                f"waking its thread (a lease due after the thread's next wake-up needs no notify)."
            )
        out += [text, "", "What would fix it, in the library (the benchmark only measures):", ""]
        if column and fence > 0.05e-3:
            out.append(
                f"- Fencing mark: the row's own column (`FencingTokenField`) instead of the shared table saves "
                f"{_ms(fence)} ms here; making it the documented fast path (or the default for new models) "
                f"moves dsm_redis to {latency_ratio(results, 'dsm_redis+column', 'seed'):.2f}× seed."
            )
        rest = dsm["total"] - max(fence, 0.0)
        out.append(
            f"- With the column, about {_ms(rest)} ms against seed's {_ms(seed['total'])} ms. What remains is the two "
            f"Redis round trips ({_ms(dsm['redis'])} ms, of which redis-py's own Python is a good part on loopback) "
            f"set against the one SELECT that dsm_redis saves: ≤ 1.0× seed needs each Redis call to cost less "
            f"than half a Django query."
        )
        out.append("")
    hot = next((m for m in missed if m.startswith("goodput on one hot")), None)
    if hot:
        s1 = goodput_ratio(results, "hot-1", "dsm_redis", "seed")
        d_cpu = race_stats(results, hot_max, "dsm_redis")["stack_cpu_good_ms"]
        s_cpu = race_stats(results, hot_max, "seed")["stack_cpu_good_ms"]
        out += [
            f"**Hot-object goodput ({measured(hot)}).** On one object a correct contender runs its critical "
            f"sections one after another, so goodput is 1 ÷ (critical section + hand-over). With one process "
            f"dsm_redis's goodput is {s1:.2f}× seed's (its uncontended transition, above). Its hand-over is "
            f"first come, first served: the release script grants the lease to the oldest waiter and mints its "
            f"token, and that waiter, asleep in `BLPOP`, must be woken and scheduled, then extend its grant, "
            f"before its row-lock SELECT is sent; seed's waiters are queued inside PostgreSQL with their SELECT "
            f"already sent, and whichever process runs first proceeds on the holder's COMMIT (barging). Only the lease "
            f"holder has a transaction open (the waiters sleep in Redis); the CPU per surviving deposit under "
            f"contention (table above) is {d_cpu:.1f} ms for dsm_redis against {s_cpu:.1f} ms for seed. With 8 "
            f"processes, PostgreSQL and Redis on 2 cores every wake-up also waits to be scheduled, so this ratio "
            f"moves more between repeats than the others (lowest–highest in the ratio table).",
            "",
            "What would fix it: everything that shortens the uncontended path (above) shortens the critical "
            "section. Taking the waiter's extension round trip off the critical path too was tried and gave "
            "nothing measurable (*Cuts, each measured*). The rest is the price of first come, first served on "
            "an oversubscribed machine: waking a sleeping waiter costs a scheduling delay that barging, which "
            "lets a running process go first, does not pay, and which bounds every wait instead (fairness "
            "table).",
            "",
        ]
    spread_t = next((m for m in missed if m.startswith("goodput over")), None)
    if spread_t:
        sd, dd = race_stats(results, spread, "seed"), race_stats(results, spread, "dsm_redis")
        per = "; ".join(f"{name} {race_stats(results, spread, name)['stack_cpu_ms']:.2f} ms" for name in DSM)
        out += [
            f"**Goodput over {results['args']['objects']:,} objects ({measured(spread_t)}).** Without contention "
            f"the cores are the limit, and CPU per transition (clients + PostgreSQL + Redis, table above) tracks "
            f"the goodput ratio: {per}, against {sd['stack_cpu_ms']:.2f} ms for seed. Seed sends BEGIN, the "
            f"row-lock SELECT, a second SELECT (`refresh_from_db`), the UPDATE and COMMIT; dsm_redis one SELECT "
            f"fewer and two Redis script calls more, and each of those costs CPU three times over: redis-py in "
            f"the calling process, the kernel's loopback, and Redis running the script. Split (ms per "
            f"transition): dsm_redis {dd['client_cpu_ms']:.2f} in the calling process, "
            f"{dd['postgres_cpu_ms']:.2f} in PostgreSQL, {dd['redis_cpu_ms']:.2f} in Redis; seed "
            f"{sd['client_cpu_ms']:.2f} in the calling process, {sd['postgres_cpu_ms']:.2f} in PostgreSQL. "
            f"So the calling process is not where the gap is: the lease's two script calls cost Redis and the "
            f"kernel CPU that seed's one more SELECT does not, on the same 2 cores; ≥ 1.0× seed needs a lease "
            f"that costs the servers nothing.",
            "",
        ]
    return "\n".join(out)


def _short(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


FINDINGS = """
## Notes on the peers

- **django-fsm-2** (`ConcurrentTransitionMixin`) guards only the *state column*: its `save()` becomes
  `UPDATE … WHERE id = %s AND state = <state when loaded>`. A self-loop (`open → open`) never changes the
  state, so a writer holding a stale `balance` always matches and overwrites: the deposit race is not
  detected at all (no `ConcurrentTransition`, no retry), hence its lost updates under contention. On an
  edge that changes the state (`new → paid`) the same check does refuse the second writer. It takes no
  lock, so it is the cheapest per call.
- **django-logic** serialises callers with its state lock (`cache.add`, a Redis `SET NX`) and, under the
  lock, re-reads only the *state column* (plus a query for in-flight background work). The side effect
  runs on the instance the caller loaded *before* the lock, so a deposit computed from a `balance` read
  before another caller's commit overwrites it: lost updates, although no two side effects overlap. A
  side effect that calls `refresh_from_db()` first would avoid them at the cost of one more query. Its
  lock does not wait: a refused caller must retry (here: random sleep up to the backoff, reload, call
  again), so under contention calls retry many times and the longest wait grows; its release is a `GET`
  then a `DEL` (two round trips, not atomic).
- **pg-advisory** is correct on one database for the same reason: the transaction holds both locks. Its
  waiters wait inside PostgreSQL, each holding a database connection and an open transaction (a pool
  of N connections caps the waiters at N; dsm_redis's waiters sleep in Redis and take a connection
  only once granted). Its lock lasts one transaction: it cannot span several transactions, a Celery
  task or work outside the database, and a holder needs no fencing token because its lock and its
  writes end together (a holder whose connection dies is rolled back). Holders show in `pg_locks`
  only as numbers.
- **seed** (deus-state-machina's algorithm) is correct across processes *on one database*, because
  `select_for_update` inside the transaction does the work its `RLock` cannot; it does not cover work
  that spans transactions, which is what dsm_redis adds (leases, fencing).
"""


# -- chart -----------------------------------------------------------------------------------------

COLOURS = {"cowboy": "#999999", "seed": "#1f77b4", "pg-advisory": "#17becf", "django-fsm-2": "#ff7f0e", "django-logic": "#9467bd",
           "dsm_redis": "#d62728", "dsm_redis+column": "#8c1515", "floor": "#2ca02c"}  # fmt: skip


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sids = scenario_ids(results)
    hot = [s for s in sids if not s.startswith("spread")]  # 1..8 and the crowd, on one axis
    spread = next(s for s in sids if s.startswith("spread"))
    xs = [int(s.split("-")[1]) for s in hot]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    ax = axes[0]
    for name in CONTENDERS:
        good = [race_stats(results, s, name)["goodput"] for s in hot]
        thr = [race_stats(results, s, name)["throughput"] for s in hot]
        ax.plot(xs, good, marker="o", color=COLOURS[name], label=name, linewidth=2)
        if any(abs(t - g) > 0.02 * max(t, 1) for t, g in zip(thr, good, strict=True)):
            ax.plot(xs, thr, linestyle=":", color=COLOURS[name], linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("processes on one hot object")
    ax.set_ylabel("goodput (surviving deposits / s)")
    ax.set_title("Hot object: goodput vs processes\n(dotted: throughput incl. lost updates)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax = axes[1]
    vals = [race_stats(results, spread, n)["goodput"] for n in CONTENDERS]
    ax.bar(range(len(CONTENDERS)), vals, color=[COLOURS[n] for n in CONTENDERS])
    ax.set_xticks(range(len(CONTENDERS)), CONTENDERS, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"{_s_label(results, spread)}: goodput / s")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    vals = [1000 * _median(results["latency"][n]) for n in CONTENDERS]
    ax.bar(range(len(CONTENDERS)), vals, color=[COLOURS[n] for n in CONTENDERS])
    for i, n in enumerate(CONTENDERS):
        ax.text(i, vals[i], f"{latency_ratio(results, n, 'seed'):.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(CONTENDERS)), CONTENDERS, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("ms per transition (median)")
    ax.set_title("Uncontended latency (× seed)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- console and json -------------------------------------------------------------------------------


def summary(results: dict[str, Any]) -> str:
    sids = scenario_ids(results)
    lines = ["", "goodput/s (median)   " + "".join(f"{s:>11}" for s in sids) + "   latency ms  vs seed"]
    for name in CONTENDERS:
        cells = "".join(f"{race_stats(results, s, name)['goodput']:11.0f}" for s in sids)
        lines.append(
            f"{name:<21}{cells}   {_ms(_median(results['latency'][name])):>10}  {latency_ratio(results, name, 'seed'):6.2f}x"
        )
    for name in DSM:
        lines.append("")
        lines.append(name)
        for t in targets(results, name):
            lines.append(f"  {'met   ' if t['met'] else 'MISSED'}  {t['target']}: {t['measured']}")
    return "\n".join(lines)


def slim(results: dict[str, Any]) -> dict[str, Any]:
    """The results without per-call latencies (summarised instead), for bench/results.json."""
    out = dict(results)
    out["latency_pooled"] = {}
    for r in results["races"]:
        key = f"{r['scenario']}|{r['contender']}"
        if key not in out["latency_pooled"]:
            st = race_stats(results, r["scenario"], r["contender"])
            out["latency_pooled"][key] = {"p50": st["p50"], "p99": st["p99"], "max": st["max"]}
    races = []
    for r in results["races"]:
        lat = r.get("latencies", [])
        r = {k: v for k, v in r.items() if k not in ("latencies", "lease_waits")}
        if r.get("first_error"):  # the exception line only: tracebacks carry file paths
            r["first_error"] = r["first_error"].strip().splitlines()[-1]
        r["latency_summary"] = {
            "calls": len(lat),
            "p50": _pct(lat, 0.5),
            "p99": _pct(lat, 0.99),
            "max": max(lat, default=float("nan")),
        }
        races.append(r)
    out["races"] = races
    out["lease_waits_pooled"] = {}
    for r in results["races"]:
        key = f"{r['scenario']}|{r['contender']}"
        if key not in out["lease_waits_pooled"]:
            lw = lease_wait_stats(results, r["scenario"], r["contender"])
            if lw:
                out["lease_waits_pooled"][key] = lw
    return out
