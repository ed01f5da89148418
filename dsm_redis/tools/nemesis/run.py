"""Runs the nemesis end to end: hosts, servers, a fresh database, workers, faults, the verdict.

1. Hosts: ``--hosts`` network namespaces (``netns``), or none, with the reason printed, when this
   machine cannot make them (not root, no ``ip``).
2. Servers: the caller's (``--redis-url``/``--database-url``) or embedded ones. The embedded Redis
   is persistent in a directory of the run's own (so it can be restarted from its AOF or an older
   copy) and also listens on the hosts' Redis addresses; PostgreSQL is reached from the hosts
   through a relay (``proxy``) listening on their PostgreSQL addresses. With ``--redis sentinel``
   the embedded Redis is a Sentinel group instead, reached through its ``redis+sentinel://`` URL
   from this host only (its sentinels announce loopback addresses, which a host cannot reach).
3. A database of the run's own (created, migrated, dropped at the end), ``--objects`` accounts.
4. ``--workers`` worker processes, spread over the hosts, loop seed-scheduled operations until the
   deadline while the main thread injects the seed-scheduled faults and restarts killed workers.
5. Everything is healed and stopped; the journal and the final rows are read; the merged history
   is written (``--history``) and checked.

Everything started here is undone on the way out, on errors, Ctrl-C and SIGTERM too (``finally``;
namespaces also from an ``atexit`` hook). Every loop is bounded by the deadline and by counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..servers.process import ignoring_signals
from . import faults as fault_kinds
from .checker import Verdict, check
from .faults import Fault, RedisControl, SentinelControl, fault_schedule
from .history import INFO, assemble, read_events, write_history
from .netns import Host, Hosts, unavailable
from .proxy import Relay
from .workers import UNFENCED_ENV

CONTENDERS = ("dsm_redis", "cowboy")
TOPOLOGIES = ("single", "sentinel")
_POLL = 0.2
_STOP_GRACE = 40.0  # seconds for workers to finish their last operation after the deadline
_MAX_CRASHES = 5  # worker exits with a Python error, per slot, before the run gives up
_MAX_RESTARTS = 500  # per slot


class NemesisError(Exception):
    """The nemesis could not run; the message is meant for the user, as is."""


@dataclass(frozen=True)
class Options:
    seconds: float = 60.0
    seed: int | None = None
    hosts: int = 3
    workers: int = 6
    objects: int = 3
    faults: tuple[str, ...] = fault_kinds.KINDS
    redis_url: str | None = None
    database_url: str | None = None
    history: str | None = None
    contender: str = "dsm_redis"
    ttl: float = 2.0
    think: float = 0.05
    redis: str = "single"  # the embedded Redis: one persistent server, or a Sentinel group
    replica_acks: int = 0  # REPLICA_ACKS of the workers (a Sentinel group has one replica)


@dataclass
class Report:
    options: Options
    seed: int
    verdict: Verdict
    outcomes: Counter[str]
    by_kind: dict[str, Counter[str]]
    faults: Counter[str]
    skipped: dict[str, str]
    hosts_note: str
    history_path: str
    unfenced: bool
    elapsed: float
    restarts: int
    violations: list[str] = field(default_factory=list)


def run(options: Options, err: TextIO) -> Report:
    resources = contextlib.ExitStack()
    try:
        return _Run(options, resources, err).run()
    finally:
        with ignoring_signals(signal.SIGINT, signal.SIGTERM):
            resources.close()


def status(err: TextIO, text: str) -> None:
    print(f"nemesis: {text}", file=err, flush=True)


class _Worker:
    def __init__(self, slot: int, host: Host | None) -> None:
        self.slot = slot
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.crashes = 0


class _Run:
    def __init__(self, options: Options, resources: contextlib.ExitStack, err: TextIO) -> None:
        if options.contender not in CONTENDERS:
            raise NemesisError(f"unknown contender {options.contender!r}: one of {', '.join(CONTENDERS)}")
        if options.redis not in TOPOLOGIES:
            raise NemesisError(f"unknown Redis topology {options.redis!r}: one of {', '.join(TOPOLOGIES)}")
        if options.redis == "sentinel" and options.redis_url:
            raise NemesisError("--redis sentinel starts a Sentinel group of its own: leave out --redis-url")
        if options.replica_acks and options.redis != "sentinel":
            raise NemesisError("--replica-acks needs replicas: with --redis sentinel")
        self.o = options
        self.resources = resources
        self.err = err
        self.seed = options.seed if options.seed is not None else random.randrange(1, 1_000_000)
        self.run_id = uuid.uuid4().hex[:10]
        self.skipped: dict[str, str] = {}
        self.hosts: Hosts | None = None
        self.redis: RedisControl | None = None
        self.sentinel: SentinelControl | None = None
        self.relays: list[Relay] = []
        self.workers: list[_Worker] = []
        self.fault_events: list[dict[str, Any]] = []
        self.fault_counts: Counter[str] = Counter()
        self.unfenced = os.environ.get(UNFENCED_ENV) == "1"
        self.directory = Path(tempfile.mkdtemp(prefix="dsm_redis-nemesis-"))
        resources.callback(shutil.rmtree, self.directory, True)
        self.history_dir = self.directory / "history"
        self.history_dir.mkdir()
        self._tail_offsets: dict[Path, int] = {}
        self._tail_counts: Counter[str] = Counter()
        self._last_progress = -1e9

    # -- set-up -------------------------------------------------------------------------------------

    def run(self) -> Report:
        started = time.monotonic()
        status(
            self.err,
            f"seed {self.seed}; contender {self.o.contender}" + (" with fencing DISABLED" if self.unfenced else ""),
        )
        host_list = self._hosts()
        redis_url, database_url = self._servers(host_list)
        settings = self._settings(database_url, redis_url)
        objects = self._database(settings)
        places: list[Host | None] = [*host_list] if host_list else [None]
        worker_settings = {h: self._worker_settings(settings, h, redis_url) for h in places}
        kinds = tuple(k for k in self.o.faults if k not in self.skipped)
        schedule = fault_schedule(self.seed, self.o.seconds, kinds, self.o.ttl)
        t0 = time.monotonic()
        deadline_ns = time.monotonic_ns() + int(self.o.seconds * 1e9)
        configs: dict[Host | None, Path] = {}
        for host, s in worker_settings.items():
            path = self.directory / f"config-{host.name if host else 'local'}.json"
            path.write_text(json.dumps({
                "settings": s, "objects": objects, "seed": self.seed, "contender": self.o.contender,
                "history_dir": str(self.history_dir), "deadline_ns": deadline_ns, "think": self.o.think,
            }))  # fmt: skip
            configs[host] = path
        self.configs = configs
        for slot in range(self.o.workers):
            self.workers.append(_Worker(slot, places[slot % len(places)]))
        self.resources.callback(self._kill_workers)
        initial = self._rows()
        for worker in self.workers:
            self._start(worker)
        status(self.err, f"{len(self.workers)} workers, {len(schedule)} faults scheduled over {self.o.seconds:g}s")
        self._loop(t0, schedule)
        self._wind_down()
        return self._finish(initial, started)

    def _hosts(self) -> list[Host]:
        if self.o.redis == "sentinel":
            why = "--redis sentinel: its sentinels announce loopback addresses, which a host cannot reach"
            self.hosts_note = f"no hosts ({why}): workers run in this network namespace"
            self.skipped["partition"] = why
            return []
        if self.o.hosts < 1:
            self.hosts_note = "no hosts requested: workers run in this network namespace"
            self.skipped["partition"] = "no hosts (--hosts 0)"
            return []
        reason = unavailable()
        if reason is not None:
            self.hosts_note = f"hosts skipped ({reason}): all workers run in this network namespace"
            self.skipped["partition"] = reason
            status(self.err, f"partition fault and extra hosts skipped: {reason}")
            return []
        self.hosts = Hosts(self.o.hosts, self.run_id)
        self.resources.callback(self.hosts.destroy)
        try:
            host_list = self.hosts.create()
        except Exception as exc:
            raise NemesisError(f"could not create the hosts' network namespaces: {exc}") from exc
        self.hosts_note = (
            f"{len(host_list)} hosts (network namespaces, veth links in {host_list[0].addr.rsplit('.', 2)[0]}.x)"
        )
        return host_list

    def _servers(self, hosts: list[Host]) -> tuple[str, str]:
        from dsm_redis.tools.demo.environment import DemoError, check_redis
        from dsm_redis.tools.servers import PostgresServer, ServerUnavailable

        redis_url, database_url = self.o.redis_url, self.o.database_url
        try:
            if self.o.redis == "sentinel":
                status(self.err, "starting a Redis Sentinel group (embedded: a primary, a replica, 3 sentinels)...")
                self.sentinel = SentinelControl()
                self.resources.callback(self.sentinel.stop)
                redis_url = self.sentinel.start()
                for kind in fault_kinds.REDIS_KINDS:
                    self.skipped[kind] = "--redis sentinel: its Redis faults are failovers"
            elif not redis_url:
                status(self.err, "starting Redis (embedded, persistent)...")
                self.redis = RedisControl(self.directory / "redis", [h.redis_addr for h in hosts])
                redis_url = self.redis.start()
                self.resources.callback(self.redis.stop)
            else:
                for kind in fault_kinds.REDIS_KINDS:
                    self.skipped[kind] = "--redis-url given: the nemesis restarts only the Redis it starts"
            if self.sentinel is None:
                self.skipped["failover"] = "needs the nemesis's own Sentinel group (--redis sentinel)"
            if not database_url:
                status(self.err, "starting PostgreSQL (embedded)...")
                database_url = self.resources.enter_context(PostgresServer()).url
        except ServerUnavailable:
            raise
        except RuntimeError as exc:
            raise NemesisError(f"could not start the embedded servers: {exc}") from exc
        try:
            check_redis(redis_url)
        except DemoError as exc:
            raise NemesisError(str(exc)) from None
        return redis_url, database_url

    def _settings(self, database_url: str, redis_url: str) -> dict[str, Any]:
        from dsm_redis.tools.demo.environment import SERVER_ALIAS
        from dsm_redis.tools.servers import database_settings_from_url

        try:
            server = database_settings_from_url(database_url)
        except ValueError as exc:
            raise NemesisError(str(exc)) from None
        if server["ENGINE"] != "django.db.backends.postgresql":
            raise NemesisError("the nemesis needs PostgreSQL (pg_terminate_backend, row locks across processes)")
        self.key_prefix = f"dsm-nemesis-{self.run_id}"
        return {
            "INSTALLED_APPS": ["django.contrib.contenttypes", "dsm_redis", "dsm_redis.tools.nemesis"],
            "DATABASES": {"default": {**server, "NAME": f"dsm_redis_nemesis_{self.run_id}"}, SERVER_ALIAS: server},
            "DSM_REDIS": {
                "LOCATION": redis_url,
                "OPTIONS": {
                    "TTL": self.o.ttl,
                    "ACQUIRE_TIMEOUT": self.o.ttl,
                    "ROW_LOCK_TIMEOUT": self.o.ttl,
                    "KEY_PREFIX": self.key_prefix,
                    "SOCKET_TIMEOUT": 1.0,
                    "SOCKET_CONNECT_TIMEOUT": 1.0,
                    "REPLICA_ACKS": self.o.replica_acks,
                    "REPLICA_ACK_TIMEOUT": 0.5,  # under SOCKET_TIMEOUT
                },
            },
            "USE_TZ": True,
            "TIME_ZONE": "UTC",
            "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
            "LOGGING": {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"console": {"class": "logging.StreamHandler"}},
                "loggers": {"dsm_redis": {"handlers": ["console"], "level": "ERROR"}},
            },
        }

    def _database(self, settings_dict: dict[str, Any]) -> list[int]:
        import django
        from django.conf import settings
        from django.core.management import call_command

        from dsm_redis.tools.demo.environment import DemoError, _create_database, _drop_database, forget_redis_keys

        if settings.configured:
            raise NemesisError("the nemesis configures Django itself: run it in a fresh process")
        settings.configure(**settings_dict)
        django.setup()
        if self.o.redis_url:
            self.resources.callback(forget_redis_keys, self.o.redis_url, self.key_prefix)
        try:
            _create_database()
        except DemoError as exc:
            raise NemesisError(str(exc).replace("demo", "nemesis")) from None
        self.resources.callback(_drop_database)
        call_command("migrate", verbosity=0, interactive=False)
        from .models import Account

        return [a.pk for a in Account.objects.bulk_create(Account() for _ in range(self.o.objects))]

    def _worker_settings(self, settings_dict: dict[str, Any], host: Host | None, redis_url: str) -> dict[str, Any]:
        s = json.loads(json.dumps(settings_dict))
        db = s["DATABASES"]["default"]
        s["DATABASES"] = {"default": db}
        db["OPTIONS"] = {
            **db.get("OPTIONS", {}),
            "connect_timeout": 3, "keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1,
            "keepalives_count": 3, "tcp_user_timeout": 5000,
        }  # fmt: skip
        s["LOGGING"]["loggers"]["dsm_redis"]["level"] = "WARNING"
        if host is None:
            return s
        # PostgreSQL through the relay on the host's PostgreSQL address.
        relay = self._relay("postgres", db)
        db["HOST"], db["PORT"] = host.postgres_addr, str(relay.port)
        port = self.redis.server.port if self.redis is not None else self._relay("redis", redis_url).port
        s["DSM_REDIS"]["LOCATION"] = f"redis://{host.redis_addr}:{port}/0"
        return s

    def _relay(self, kind: str, target_spec: Any) -> Relay:
        existing = getattr(self, f"_relay_{kind}", None)
        if existing is not None:
            return existing  # type: ignore[no-any-return]
        assert self.hosts is not None
        if kind == "postgres":
            host, port = target_spec.get("HOST") or "", target_spec.get("PORT") or "5432"
            target: str | tuple[str, int] = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, int(port))
            addrs = [h.postgres_addr for h in self.hosts.hosts]
        else:
            from urllib.parse import urlsplit

            parts = urlsplit(target_spec)
            target = (parts.hostname or "127.0.0.1", parts.port or 6379)
            addrs = [h.redis_addr for h in self.hosts.hosts]
        relay = Relay(target, addrs).start()
        self.relays.append(relay)
        self.resources.callback(relay.stop)
        setattr(self, f"_relay_{kind}", relay)
        return relay

    # -- workers ------------------------------------------------------------------------------------

    def _start(self, worker: _Worker) -> None:
        argv = [sys.executable, "-m", "dsm_redis.tools.nemesis.workers", str(self.configs[worker.host]), str(worker.slot)]
        if worker.host is not None:
            assert self.hosts is not None
            argv = self.hosts.command(worker.host, argv)
        env = {**os.environ, "PGAPPNAME": f"dsm-nemesis-w{worker.slot}"}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        log = self.directory / f"w{worker.slot}.log"
        with open(log, "ab") as out:
            worker.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def _supervise(self, deadline: float) -> None:
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.poll() is None:
                continue
            if proc.returncode == 0 or time.monotonic() > deadline - 1.0:
                continue
            if proc.returncode == 3:
                worker.crashes += 1
                if worker.crashes > _MAX_CRASHES:
                    log = (self.directory / f"w{worker.slot}.log").read_text(errors="replace")[-3000:]
                    raise NemesisError(f"worker {worker.slot} keeps failing; its log ends with:\n{log}")
            if worker.restarts >= _MAX_RESTARTS:
                continue
            worker.restarts += 1
            self._start(worker)

    def _kill_workers(self) -> None:
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)

    # -- the run ------------------------------------------------------------------------------------

    def _loop(self, t0: float, schedule: list[Fault]) -> None:
        deadline = t0 + self.o.seconds
        pending = list(schedule)
        for _ in range(int(self.o.seconds / _POLL) + len(schedule) + 10):  # bounded: one pass per poll
            now = time.monotonic()
            if now >= deadline:
                break
            if pending and now - t0 >= pending[0].at:
                self._apply(pending.pop(0), t0, deadline)
                continue
            self._supervise(deadline)
            self._progress(now - t0)
            time.sleep(_POLL)
        if self.err.isatty():
            print(file=self.err)

    def _wait(self, seconds: float, t0: float, deadline: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._supervise(deadline)
            self._progress(time.monotonic() - t0)
            time.sleep(min(_POLL, max(0.0, end - time.monotonic())))

    def _event(self, fault: Fault, phase: str, detail: str) -> None:
        self.fault_events.append(
            {"type": "fault", "kind": fault.kind, "phase": phase, "detail": detail, "t": time.monotonic_ns()}
        )

    def _apply(self, fault: Fault, t0: float, deadline: float) -> None:
        if self.redis is not None:
            self.redis.snapshot()  # the copies redis-rollback goes back to
        kind = fault.kind
        alive = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        if kind in ("pause", "kill"):
            if not alive:
                return
            worker = alive[fault.victim % len(alive)]
            assert worker.proc is not None
            pid = worker.proc.pid
            if kind == "pause":
                self._event(fault, "start", f"SIGSTOP worker {worker.slot} (pid {pid}) for {fault.duration:.1f}s")
                fault_kinds.stop_process(pid)
                try:
                    self._wait(fault.duration, t0, deadline)
                finally:
                    fault_kinds.continue_process(pid)
                self._event(fault, "end", f"SIGCONT worker {worker.slot}")
            else:
                fault_kinds.kill_process(pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(timeout=5)
                self._event(fault, "start", f"SIGKILL worker {worker.slot} (pid {pid}); restarted")
                self._supervise(deadline)
        elif kind in fault_kinds.REDIS_KINDS:
            assert self.redis is not None
            mode = {"redis-restart": "empty", "redis-aof": "aof", "redis-rollback": "rollback"}[kind]
            detail = self.redis.restart(mode)
            self._event(fault, "start", f"Redis restarted {detail}")
        elif kind == "failover":
            assert self.sentinel is not None
            self._event(fault, "start", f"Sentinel failover ({fault.variant})")
            try:
                detail = self.sentinel.failover(fault.variant)
            except RuntimeError as exc:
                raise NemesisError(f"the Sentinel group did not recover from a failover: {exc}") from exc
            self._event(fault, "end", detail)
        elif kind == "pg-terminate":
            slots = sorted({(fault.victim >> i) % len(self.workers) for i in range(1 + fault.victim % 2)})
            try:
                n = fault_kinds.terminate_backends([f"dsm-nemesis-w{s}" for s in slots])
            finally:
                from django.db import connection

                connection.close()
            self._event(fault, "start", f"pg_terminate_backend: {n} connections of workers {slots}")
        elif kind == "partition":
            assert self.hosts is not None
            host = self.hosts.hosts[fault.victim % len(self.hosts.hosts)]
            self.hosts.partition(host, fault.variant)
            self._event(fault, "start", f"host {host.name} cut from {fault.variant} for {fault.duration:.1f}s")
            try:
                self._wait(fault.duration, t0, deadline)
            finally:
                self.hosts.heal(host)
            self._event(fault, "end", f"host {host.name} healed")
        self.fault_counts[kind] += 1

    def _progress(self, elapsed: float) -> None:
        """A progress line: redrawn in place on a terminal, a line every 10 s otherwise."""
        tty = self.err.isatty()
        every = 1.0 if tty else 10.0
        if elapsed - self._last_progress < every:
            return
        self._last_progress = elapsed
        counts = self._tail()
        total = sum(counts.values())
        faults = sum(self.fault_counts.values())
        line = (
            f"\r  {elapsed:5.1f}s/{self.o.seconds:g}s  ops {total} (ok {counts['ok']}, fail {counts['fail']}, "
            f"info {counts['info']})  faults {faults}"
        )
        print(line if tty else line[1:], end="" if tty else "\n", file=self.err, flush=True)

    def _tail(self) -> Counter[str]:
        for path in self.history_dir.glob("w*.jsonl"):
            offset = self._tail_offsets.get(path, 0)
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                if b'"complete"' in line:
                    with contextlib.suppress(ValueError):
                        self._tail_counts[json.loads(line)["outcome"]] += 1
            self._tail_offsets[path] = offset + end
        return self._tail_counts

    def _wind_down(self) -> None:
        """Heal, resume, let the workers finish their last operation, then make sure nothing of
        theirs is still open at the database before the journal is read."""
        if self.hosts is not None:
            self.hosts.heal_all()
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                fault_kinds.continue_process(worker.proc.pid)
        if self.redis is not None:
            self.redis.ensure_running()
        if self.sentinel is not None:
            self.sentinel.ensure_whole()
        end = time.monotonic() + _STOP_GRACE
        for worker in self.workers:
            if worker.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(timeout=max(0.1, end - time.monotonic()))
        self._kill_workers()
        for relay in self.relays:
            relay.stop()
        from django.db import connection

        with contextlib.suppress(Exception):
            fault_kinds.terminate_backends([f"dsm-nemesis-w{w.slot}" for w in self.workers])
        connection.close()

    # -- the verdict ----------------------------------------------------------------------------------

    def _rows(self) -> dict[str, list[Any]]:
        from .models import Account

        return {str(a.pk): [a.state, a.balance] for a in Account.objects.order_by("pk")}

    def _finish(self, initial: dict[str, list[Any]], started: float) -> Report:
        from .models import EDGES, Entry

        header = {
            "type": "header", "seed": self.seed, "contender": self.o.contender, "unfenced": self.unfenced,
            "options": {**asdict(self.o), "seed": self.seed}, "initial": initial,
            "edges": [list(e) for e in EDGES], "t": 0,
        }  # fmt: skip
        events: list[dict[str, Any]] = []
        for path in sorted(self.history_dir.glob("w*.jsonl")):
            events.extend(read_events(path))
        events.extend(self.fault_events)
        events.sort(key=lambda e: int(e.get("t", 0)))
        journal = [
            {"type": "journal", "id": e.pk, "obj": e.account_id, "op": e.op, "step": e.step,
             "from": [e.from_state, e.from_balance], "to": [e.to_state, e.to_balance],
             "token": e.token, "owner": e.owner}
            for e in Entry.objects.order_by("id")
        ]  # fmt: skip
        final = [{"type": "final", "obj": int(pk), "value": value} for pk, value in self._rows().items()]
        everything = [header, *events, *journal, *final]
        default = Path(tempfile.gettempdir()) / f"dsm-nemesis-{self.seed}-{self.run_id}.jsonl"
        history_path = self.o.history or str(default)
        write_history(history_path, everything)
        history = assemble(everything)
        status(self.err, "checking the history...")
        verdict = check(history)
        by_kind: dict[str, Counter[str]] = {}
        for op, outcome in history.outcomes.items():
            by_kind.setdefault(history.functions.get(op, "?"), Counter())[outcome] += 1
        outcomes = Counter(history.outcomes.values())
        for key in ("ok", "fail", INFO):
            outcomes.setdefault(key, 0)
        return Report(
            options=self.o, seed=self.seed, verdict=verdict, outcomes=outcomes, by_kind=by_kind,
            faults=self.fault_counts, skipped=self.skipped, hosts_note=self.hosts_note, history_path=history_path,
            unfenced=self.unfenced, elapsed=time.monotonic() - started,
            restarts=sum(w.restarts for w in self.workers),
        )  # fmt: skip


def format_report(report: Report, limit: int = 20) -> str:
    o = report.options
    lines = [
        f"nemesis: seed {report.seed}, {o.seconds:g}s, {o.workers} workers, {o.objects} objects, "
        f"contender {o.contender}{' (fencing DISABLED: negative control)' if report.unfenced else ''}",
        f"hosts: {report.hosts_note}",
        "operations: "
        + ", ".join(f"{k} {report.outcomes[k]}" for k in ("ok", "fail", "info"))
        + f" (total {sum(report.outcomes.values())})",
    ]
    for kind in sorted(report.by_kind):
        c = report.by_kind[kind]
        lines.append(f"  {kind:22} ok {c['ok']:5}  fail {c['fail']:5}  info {c['info']:4}")
    lines.append(
        "faults: " + (", ".join(f"{k} {n}" for k, n in sorted(report.faults.items())) or "none")
        + f"; worker restarts {report.restarts}"
    )  # fmt: skip
    for kind, reason in sorted(report.skipped.items()):
        lines.append(f"  skipped {kind}: {reason}")
    lines.append(f"history: {report.history_path} (run took {report.elapsed:.0f}s)")
    for v in report.verdict.violations[:limit]:
        lines.append(f"  VIOLATION {v}")
    if len(report.verdict.violations) > limit:
        lines.append(
            f"  ... and {len(report.verdict.violations) - limit} more (python -m dsm_redis.tools.nemesis.checker HISTORY)"
        )
    lines.append(f"verdict: {report.verdict.summary()}")
    return "\n".join(lines)
