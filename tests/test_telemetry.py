"""Telemetry: the spans and metric points a contended run, a lost lease, a refused token and a locked
task yield (the SDK's in-memory exporters, in this process), the Prometheus endpoint the README's
lines serve (scraped over HTTP from a worker process), and nothing of OpenTelemetry without it.

This process's global providers are set once, here, for the rest of the run: a switch stops the
span exporter when the module is done (metrics only aggregate in memory). Metric values are
cumulative, so every test compares a point before and after.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import shared_task
from django.db import connections
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dsm_redis import LockLost, LockTimeout, StaleFencingToken, TransitionException, object_lock, telemetry
from dsm_redis.backends import get_backend
from dsm_redis.celery import locked_task
from dsm_redis.keys import counter_key, object_key
from tests.celery_app import app
from tests.helpers import WAIT, dsm_options, key_prefix, run_async
from tests.procs import in_background, start_worker
from tests.test_fencing import expire
from tests.testapp import tasks
from tests.testapp.models import Account, Order, OrderStatus

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# What a metric point may carry: values from code, never an object id (telemetry.py's rule).
METRIC_ATTRIBUTES = {
    telemetry.MODEL,
    telemetry.MACHINE,
    telemetry.OUTCOME,
    telemetry.CAUSE,
    telemetry.REASON,
    telemetry.TASK,
}


class Switch(SpanProcessor):
    """Keeps finished spans in memory while the module runs; drops them afterwards."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.on = True

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            self.exporter.export([span])


class Otel:
    def __init__(self) -> None:
        self.switch = Switch()
        self.reader = InMemoryMetricReader()
        provider = TracerProvider()
        provider.add_span_processor(self.switch)
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.switch.exporter.get_finished_spans() if name is None or s.name == name]

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """The metric's points by attribute set: a histogram's (count, sum, bucket counts), a counter's value."""
        data = self.reader.get_metrics_data()
        found: dict[frozenset[tuple[str, Any]], Any] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name != name:
                        continue
                    for p in metric.data.data_points:
                        assert set(p.attributes) <= METRIC_ATTRIBUTES, p.attributes
                        key = frozenset(p.attributes.items())
                        found[key] = (p.count, p.sum, tuple(p.bucket_counts)) if hasattr(p, "count") else p.value
        return found

    def delta(self, name: str, before: dict[frozenset[tuple[str, Any]], Any], **attributes: Any) -> Any:
        """How much the point with ``attributes`` (short keys: outcome=..., model=...) grew since ``before``."""
        key = frozenset((f"dsm_redis.{k}", v) for k, v in attributes.items())
        now, then = self.points(name).get(key), before.get(key)
        if now is None:
            return 0
        if isinstance(now, tuple):
            then = then or (0, 0.0, ())
            return now[0] - then[0], now[1] - then[1]
        return now - (then or 0)


_OTEL: Otel | None = None


@pytest.fixture(scope="module")
def otel() -> Iterator[Otel]:
    global _OTEL
    if _OTEL is None:
        _OTEL = Otel()
    _OTEL.switch.on = True
    yield _OTEL
    _OTEL.switch.on = False
    _OTEL.switch.exporter.clear()


@pytest.fixture(autouse=True)
def _fresh_spans(otel: Otel) -> None:
    otel.switch.exporter.clear()


def children(otel: Otel, parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in otel.spans() if s.parent is not None and s.parent.span_id == parent.context.span_id]


def deposit_from_threads(account_id: int, threads: int, rounds: int) -> None:
    """``threads`` holders depositing ``rounds`` times each on one account, all at once."""
    start = threading.Barrier(threads)

    def holder() -> None:
        start.wait(WAIT)
        for _ in range(rounds):
            Account.objects.get(pk=account_id).machine.deposit(work=0.005)

    joins = [in_background(holder) for _ in range(threads)]
    for join in joins:
        join()


# -- spans and metric points, in this process --------------------------------------------------------


def test_a_contended_run_yields_a_span_per_transition_and_the_wait_histogram(otel):
    account = Account.objects.create()
    waits, durations = otel.points(telemetry.LEASE_WAIT), otel.points(telemetry.TRANSITION_DURATION)
    deposit_from_threads(account.pk, threads=4, rounds=4)
    assert Account.objects.get(pk=account.pk).balance == 16

    transitions = otel.spans(telemetry.SPAN_TRANSITION)
    assert len(transitions) == 16
    for span in transitions:
        assert dict(span.attributes) == {
            "dsm_redis.model": "testapp.account",
            "dsm_redis.machine": "machine",
            "dsm_redis.object": f"testapp.account:{account.pk}",
            "dsm_redis.outcome": "committed",
            "dsm_redis.steps": 1,
            "dsm_redis.edge": "deposit",
            "dsm_redis.source": "open",
            "dsm_redis.target": "open",
        }
        wait, step = sorted(children(otel, span), key=lambda s: s.start_time)
        assert (wait.name, step.name) == (telemetry.SPAN_LEASE_WAIT, telemetry.SPAN_STEP)
        assert wait.attributes["dsm_redis.outcome"] == "acquired"
        assert step.attributes["dsm_redis.edge"] == "deposit" and step.attributes["dsm_redis.database"] == "default"
        assert step.attributes["dsm_redis.fencing_token"] > 0
    tokens = [
        c.attributes["dsm_redis.fencing_token"]
        for t in transitions
        for c in children(otel, t)
        if c.name == telemetry.SPAN_STEP
    ]
    assert len(set(tokens)) == 16  # one lease each

    count, total = otel.delta(telemetry.LEASE_WAIT, waits, model="testapp.account", outcome="acquired")
    assert count == 16 and total > 0
    count, total = otel.delta(
        telemetry.TRANSITION_DURATION, durations, model="testapp.account", machine="machine", outcome="committed"
    )
    assert count == 16 and total > 0


def test_asyncio_transitions_yield_the_same_spans_and_points(otel):
    """The async path: the transition span on the loop, the lease wait under it, and the database
    step, run in a worker thread, under it too (the context travels with ``sync_to_async``)."""
    import asyncio

    account = Account.objects.create()
    copies = [Account.objects.get(pk=account.pk) for _ in range(4)]
    durations = otel.points(telemetry.TRANSITION_DURATION)

    async def main() -> None:
        await asyncio.gather(*(copy.machine.adeposit() for copy in copies))

    run_async(main)
    transitions = otel.spans(telemetry.SPAN_TRANSITION)
    assert len(transitions) == 4  # one each: not one more for the blocking run inside
    for span in transitions:
        assert span.attributes["dsm_redis.outcome"] == "committed"
        assert sorted(c.name for c in children(otel, span)) == sorted([telemetry.SPAN_LEASE_WAIT, telemetry.SPAN_STEP])
    count, _ = otel.delta(
        telemetry.TRANSITION_DURATION, durations, model="testapp.account", machine="machine", outcome="committed"
    )
    assert count == 4


def test_each_outcome_of_a_transition(otel, settings):
    durations, waits = otel.points(telemetry.TRANSITION_DURATION), otel.points(telemetry.LEASE_WAIT)
    order = Order.objects.create()
    assert order.machine.pay(amount=0) == OrderStatus.FAILED  # TransitionFailed: the error edge commits
    with pytest.raises(TransitionException):
        order.machine.pay(amount=1)  # no such edge from failed
    paid = Order.objects.create()
    paid.machine.pay(amount=5)
    with pytest.raises(RuntimeError):
        paid.machine.explode()
    assert paid.machine.transition_through(OrderStatus.CANCELLED) == OrderStatus.CANCELLED

    dsm_options(settings, ACQUIRE_TIMEOUT=0)
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:
        with object_lock(paid):
            holding.set()
            done.wait(WAIT)

    join = in_background(holder)
    try:
        assert holding.wait(WAIT)
        with pytest.raises(LockTimeout):
            paid.machine.transition_to(OrderStatus.CANCELLED)
    finally:
        done.set()
        join()

    spans = [s for s in otel.spans(telemetry.SPAN_TRANSITION) if s.attributes["dsm_redis.model"] == "testapp.order"]
    assert [
        (s.attributes["dsm_redis.outcome"], s.attributes.get("dsm_redis.edge"), s.attributes.get("dsm_redis.target"))
        for s in spans
    ] == [
        ("failed", "pay", "failed"),
        ("refused", None, None),
        ("committed", "pay", "paid"),
        ("failed", "explode", "shipped"),
        ("committed", None, "cancelled"),  # a walk: its edges are on its steps
        ("lock_error", None, None),
    ]
    diverted = spans[0]
    steps = [c for c in children(otel, diverted) if c.name == telemetry.SPAN_STEP]
    assert [c.attributes["dsm_redis.edge"] for c in steps] == ["pay", "fail"]
    statuses = [s.status.status_code.name for s in spans]
    assert statuses == ["UNSET", "UNSET", "UNSET", "ERROR", "UNSET", "ERROR"]  # the machine working is no error

    def grew(outcome: str) -> int:
        return otel.delta(
            telemetry.TRANSITION_DURATION, durations, model="testapp.order", machine="machine", outcome=outcome
        )[0]

    assert {o: grew(o) for o in ("committed", "refused", "failed", "lock_error")} == {
        "committed": 2, "refused": 1, "failed": 2, "lock_error": 1,
    }  # fmt: skip
    assert otel.delta(telemetry.LEASE_WAIT, waits, model="testapp.order", outcome="timeout")[0] == 1


def test_a_lost_lease_a_refused_token_and_a_reanchored_counter_are_counted(otel, settings):
    lost, refused = otel.points(telemetry.LEASE_LOST), otel.points(telemetry.TOKEN_REFUSED)
    reanchored = otel.points(telemetry.TOKEN_REANCHORED)

    account = Account.objects.create()
    with object_lock(account) as lease:  # test_fencing's stale holder: our lease runs out, another commits
        account.machine.deposit()
        expire(lease)
        in_background(lambda: Account.objects.get(pk=account.pk).machine.deposit())()
        with pytest.raises(StaleFencingToken):
            account.machine.deposit()
    assert otel.delta(telemetry.TOKEN_REFUSED, refused, model="testapp.account") == 1
    assert otel.spans(telemetry.SPAN_TRANSITION)[-1].attributes["dsm_redis.outcome"] == "lock_error"

    # Redis lost the counter: the next lease's token is re-anchored above the database's mark.
    get_backend().client.delete(counter_key(key_prefix(), object_key(account)))
    account.machine.deposit()
    assert otel.delta(telemetry.TOKEN_REANCHORED, reanchored, model="testapp.account") == 1

    dsm_options(settings, TTL=0.3, AUTO_RENEW=False)  # test_leases: the side effect outlives the lease
    with pytest.raises(LockLost):
        Account.objects.get(pk=account.pk).machine.deposit(work=0.4)
    assert otel.delta(telemetry.LEASE_LOST, lost, model="testapp.account", cause="expired") == 1


def test_telemetry_off_records_nothing(otel, settings):
    dsm_options(settings, TELEMETRY=False)
    waits = otel.points(telemetry.LEASE_WAIT)
    Account.objects.create().machine.deposit()
    assert otel.spans() == []
    assert otel.points(telemetry.LEASE_WAIT) == waits


# -- Celery ------------------------------------------------------------------------------------------


@shared_task(bind=True, name="tests.test_telemetry.two_deposits")
@locked_task("testapp.Account", pk_arg="account_id")
def two_deposits(self: Any, account_id: int) -> int:
    account = Account.objects.get(pk=account_id)
    account.machine.deposit()
    account.machine.deposit()
    return account.balance


@pytest.fixture
def eager() -> Iterator[None]:
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    yield
    app.conf.update(task_always_eager=False, task_eager_propagates=False)


def test_a_locked_task_span_links_to_its_transitions_beside_the_celery_instrumentation(otel, eager):
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    account = Account.objects.create()
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument()
    try:
        assert two_deposits.apply(kwargs={"account_id": account.pk}, throw=True).get() == 2
    finally:
        instrumentor.uninstrument()

    (task,) = otel.spans(telemetry.SPAN_TASK)
    (run,) = [s for s in otel.spans() if s.name.startswith("run/")]  # the Celery instrumentation's span
    assert task.parent is not None and task.parent.span_id == run.context.span_id
    assert task.attributes["dsm_redis.task"] == "tests.test_telemetry.two_deposits"
    assert task.attributes["dsm_redis.outcome"] == "done"
    inside = children(otel, task)
    assert sorted(s.name for s in inside) == [
        telemetry.SPAN_LEASE_WAIT,
        telemetry.SPAN_TRANSITION,
        telemetry.SPAN_TRANSITION,
    ]
    transitions = {s.context.span_id for s in inside if s.name == telemetry.SPAN_TRANSITION}
    assert {link.context.span_id for link in task.links} == transitions
    # The transitions re-entered the task's lease: no wait of their own.
    assert not any(c.name == telemetry.SPAN_LEASE_WAIT for s in inside for c in children(otel, s))


def test_skipped_and_retried_locked_tasks_are_counted(otel, eager, monkeypatch, settings):
    from celery.canvas import Signature
    from celery.exceptions import Retry

    skipped, retried = otel.points(telemetry.TASK_SKIPPED), otel.points(telemetry.TASK_RETRIED)
    account = Account.objects.create()
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:
        with object_lock(account):
            holding.set()
            done.wait(WAIT)

    join = in_background(holder)
    try:
        assert holding.wait(WAIT)
        assert tasks.unbound_skip.apply((account.pk,)).state == "IGNORED"
        # As a worker runs it, from a message (so it can be re-sent): the re-send is kept, not sent.
        sent: list[Any] = []
        monkeypatch.setattr(Signature, "apply_async", lambda self, *a, **k: sent.append(self))
        dsm_options(settings, ACQUIRE_TIMEOUT=0.05)
        kwargs = {"account_id": account.pk, "tag": "otel"}
        tasks.locked_deposit.push_request(id="otel", args=[], kwargs=kwargs, called_directly=False, is_eager=False)
        try:
            with pytest.raises(Retry):
                tasks.locked_deposit.run(**kwargs)
        finally:
            tasks.locked_deposit.pop_request()
        assert len(sent) == 1
    finally:
        done.set()
        join()
    assert otel.delta(telemetry.TASK_SKIPPED, skipped, model="testapp.account", task=tasks.unbound_skip.name) == 1
    retry = {"model": "testapp.account", "task": tasks.locked_deposit.name, "reason": "contention"}
    assert otel.delta(telemetry.TASK_RETRIED, retried, **retry) == 1
    outcomes = [s.attributes["dsm_redis.outcome"] for s in otel.spans(telemetry.SPAN_TASK)]
    assert outcomes == ["skipped", "retried"]


# -- Prometheus: the README's lines, scraped over HTTP -----------------------------------------------


def readme_prometheus_snippet() -> str:
    section = README.split("\n## Observability", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section.split("Prometheus", 1)[1], re.S)[:1]
    return snippet


def serve_prometheus(inbox: Any, outbox: Any, snippet: str, port: int, account_id: int) -> None:
    """A worker process (tests.procs): the README's lines, then a contended run, a lost lease and a
    refused token; it serves its metrics until told to stop."""
    from django.test import override_settings

    exec(snippet.replace("9464", str(port)), {})
    deposit_from_threads(account_id, threads=4, rounds=5)
    account = Account.objects.get(pk=account_id)
    with object_lock(account) as lease:
        account.machine.deposit()
        expire(lease)
        in_background(lambda: Account.objects.get(pk=account_id).machine.deposit())()
        try:
            account.machine.deposit()
        except StaleFencingToken:
            pass
    from django.conf import settings

    options = {**settings.DSM_REDIS["OPTIONS"], "TTL": 0.3, "AUTO_RENEW": False}
    with override_settings(DSM_REDIS={**settings.DSM_REDIS, "OPTIONS": options}):
        try:
            account.machine.deposit(work=0.4)
        except LockLost:
            pass
    connections.close_all()
    outbox.put(("ok", "serving"))
    inbox.get(timeout=WAIT)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prometheus_scrapes_the_wait_histogram_and_the_counters():
    from prometheus_client.parser import text_string_to_metric_families

    account = Account.objects.create()
    port = free_port()
    worker = start_worker("tests.test_telemetry:serve_prometheus", readme_prometheus_snippet(), port, account.pk)
    try:
        assert worker.expect() == "serving"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
            text = response.read().decode()
    finally:
        worker.send("stop")
        worker.stop()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if not k.startswith("otel_scope_")}  # the exporter's own
            samples[(s.name, json.dumps(labels, sort_keys=True))] = s.value

    def sample(name: str, **labels: str) -> float:
        return samples[(name, json.dumps({f"dsm_redis_{k}": v for k, v in labels.items()}, sort_keys=True))]

    acquired = {"model": "testapp.account", "outcome": "acquired"}
    count = sample("dsm_redis_lease_wait_seconds_count", **acquired)
    assert count >= 20 + 3  # the contended run, the stale holder's lease, the other holder's, the lost one's
    assert 0 < sample("dsm_redis_lease_wait_seconds_sum", **acquired) < count * WAIT
    buckets = sorted(
        (float(json.loads(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "dsm_redis_lease_wait_seconds_bucket" and json.loads(labels)["dsm_redis_outcome"] == "acquired"
    )
    assert [le for le, _ in buckets[:3]] == list(telemetry.BUCKETS[:3])  # seconds, not the default's
    assert buckets[-1] == (float("inf"), count) and [v for _, v in buckets] == sorted(v for _, v in buckets)
    duration = {"model": "testapp.account", "machine": "machine"}
    assert sample("dsm_redis_transition_duration_seconds_count", **duration, outcome="committed") >= 20
    assert sample("dsm_redis_transition_duration_seconds_count", **duration, outcome="lock_error") == 2
    assert sample("dsm_redis_token_refused_total", model="testapp.account") == 1
    assert sample("dsm_redis_lease_lost_total", model="testapp.account", cause="expired") == 1


# -- without OpenTelemetry -------------------------------------------------------------------------

BLOCKED = """
import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

if sys.argv[3] == "absent":
    sys.meta_path.insert(0, Absent())
import django
from django.conf import settings

settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "dsm_redis", "tests.testapp"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    DSM_REDIS={"LOCATION": sys.argv[1], "OPTIONS": {"KEY_PREFIX": sys.argv[2]}},
    USE_TZ=True,
)
django.setup()
from django.core.management import call_command
call_command("migrate", run_syncdb=True, verbosity=0)
from dsm_redis import protocol, telemetry
from tests.testapp.models import Account
account = Account.objects.create()
account.machine.deposit()
print(Account.objects.get(pk=account.pk).balance, telemetry.AVAILABLE, hasattr(protocol.run, "__wrapped__"))
print(telemetry.enabled())
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")) == [])
"""


@pytest.mark.parametrize(
    "package, expected",
    [
        ("absent", ["1 False False", "False", "True"]),  # nothing imported, run() not even wrapped
        ("present", ["1 True True", "False", "False"]),  # no provider set: the hooks skip
    ],
)
def test_without_opentelemetry_nothing_of_it_is_imported_and_transitions_run(dsm_redis_url, package, expected):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    out = subprocess.run(
        [sys.executable, "-c", BLOCKED, dsm_redis_url, f"{key_prefix()}-{package}", package],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected
