"""``python -m bench.otel``: what telemetry costs an uncontended transition (dsm_redis.telemetry).

One process, the bench's own servers and rows (``bench.run``). Two phases, because OpenTelemetry's
global providers can be set once per process:

1. ``api``: ``opentelemetry-api`` installed, no SDK configured (the API's no-ops), against ``off``
   (``DSM_REDIS['OPTIONS']['TELEMETRY'] = False``, every hook skipped);
2. ``sdk``: the SDK recording every span (a batch processor whose exporter drops them, as an OTLP
   exporter's thread would send them off the hot path) and every metric point (an in-memory
   reader: the aggregation is what a transition pays), against ``off`` again.

Each round times ``--calls`` transitions per mode, alternating call by call, the first mode
rotated per round, so the machine's load lands on both alike; the figure is the median over rounds
of each round's median, and the ratio is taken per round, then its median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

from bench.contenders import CALLS, model_for
from bench.run import Servers, prepare


def _configs() -> dict[str, Any]:
    from django.conf import settings

    base = settings.DSM_REDIS
    return {
        mode: {**base, "OPTIONS": {**base["OPTIONS"], "TELEMETRY": mode != "off"}} for mode in ("off", "api", "sdk")
    }


def _rounds(modes: Sequence[str], rounds: int, calls: int, pk: int) -> dict[str, list[float]]:
    """Per mode, each round's median seconds per transition."""
    from django.conf import settings

    configs = _configs()
    model, call = model_for("dsm_redis"), CALLS["dsm_redis"]
    medians: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(rounds):
        order = list(modes[r % len(modes) :]) + list(modes[: r % len(modes)])
        times: dict[str, list[float]] = {mode: [] for mode in order}
        for _ in range(calls):
            for mode in order:
                settings.DSM_REDIS = configs[mode]
                obj = model.objects.get(pk=pk)
                t0 = time.perf_counter()
                call(obj, pk, time.monotonic() + 60)
                times[mode].append(time.perf_counter() - t0)
        for mode in order:
            medians[mode].append(statistics.median(times[mode]))
    return medians


def _install_sdk() -> Any:
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        exported = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            Dropping.exported += len(spans)
            return SpanExportResult.SUCCESS

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(Dropping()))
    trace.set_tracer_provider(tracer_provider)
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return tracer_provider, reader, Dropping


def _report(medians: dict[str, list[float]], mode: str) -> str:
    on, off = medians[mode], medians["off"]
    ratio = statistics.median(a / b for a, b in zip(on, off))
    return (
        f"{mode:<4} {statistics.median(on) * 1e6:.0f}us  off {statistics.median(off) * 1e6:.0f}us  "
        f"{mode}/off {ratio:.3f} (per-round ratios {min(a / b for a, b in zip(on, off)):.3f}"
        f"..{max(a / b for a, b in zip(on, off)):.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.otel", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=300, help="calls per mode per round")
    p.add_argument("--redis-url")
    p.add_argument("--database-url")
    args = p.parse_args(argv)
    from dsm_redis import telemetry

    if not telemetry.AVAILABLE:
        p.error("needs opentelemetry-api and opentelemetry-sdk: pip install -e '.[test,bench]'")
    servers = Servers(args.redis_url, args.database_url)
    try:
        _, layout = prepare(servers, 8)
        pk = layout["dsm_redis"]["probe"]
        _rounds(("off", "api"), 1, 100, pk)  # warm
        api = _rounds(("off", "api"), args.rounds, args.calls, pk)
        print(_report(api, "api"), flush=True)
        tracer_provider, reader, exporter = _install_sdk()
        _rounds(("off", "sdk"), 1, 100, pk)  # warm
        sdk = _rounds(("off", "sdk"), args.rounds, args.calls, pk)
        tracer_provider.force_flush()
        print(_report(sdk, "sdk"), flush=True)
        points = sum(
            p.count
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == telemetry.TRANSITION_DURATION
            for p in m.data.data_points
        )
        print(f"recorded: {exporter.exported} spans, {points} transition.duration points")
    finally:
        servers.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
