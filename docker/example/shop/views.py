"""A JSON API over the demo's subscriptions: every request runs in some gunicorn worker process,
and any number of them may hit the same subscription at once.

- ``POST /subscriptions`` ``{"count": n}``: create n subscriptions (due, period 1, balance 0).
- ``GET /subscriptions/<id>``: its state.
- ``POST /subscriptions/<id>/<edge>`` (``pay``, ``bill``, ``deposit``): the transition, now, under
  the object's lease. 200 with the new state; 409 when the machine refuses it from the state the
  row is in (read under the lock); 503 when the object stayed busy past ``ACQUIRE_TIMEOUT`` or
  Redis is unreachable (nothing was written).
- ``POST /subscriptions/<id>/<edge>/async``: the same in a Celery worker. ``deposit`` goes through
  ``shop.tasks.deposit`` (a ``locked_task``); ``pay`` and ``bill`` through ``as_task=True``. 202.
- ``GET /stats``: totals and the forbidden transitions found in the ledgers (duplicate charges or
  bills for one period).
"""

import json

from django.db.models import Count, Sum
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from dsm_redis import LockError, TransitionException
from dsm_redis.tools.demo.models import Bill, Charge, Subscription, create_subscriptions

from . import tasks

EDGES = ("pay", "bill", "deposit")


def _state(sub: Subscription) -> dict:
    return {"id": sub.pk, "status": sub.status, "period": sub.period, "balance": sub.balance}


def _body(request: HttpRequest) -> dict:
    try:
        data = json.loads(request.body or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    Subscription.objects.exists()  # the database answers
    return JsonResponse({"ok": True})


@csrf_exempt
@require_POST
def create(request: HttpRequest) -> JsonResponse:
    count = max(1, min(int(_body(request).get("count", 1)), 1000))
    return JsonResponse({"ids": create_subscriptions(count)}, status=201)


@require_GET
def detail(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse(_state(get_object_or_404(Subscription, pk=pk)))


@csrf_exempt
@require_POST
def transition(request: HttpRequest, pk: int, edge: str) -> JsonResponse:
    if edge not in EDGES:
        return JsonResponse({"error": f"no edge {edge!r}; edges: {', '.join(EDGES)}"}, status=404)
    sub = get_object_or_404(Subscription, pk=pk)
    try:
        getattr(sub.machine, edge)()
    except TransitionException as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    except LockError as exc:  # LockTimeout, LockBackendUnavailable, LockLost, StaleFencingToken
        return JsonResponse({"error": type(exc).__name__}, status=503)
    return JsonResponse(_state(sub))


@csrf_exempt
@require_POST
def enqueue(request: HttpRequest, pk: int, edge: str) -> JsonResponse:
    if edge not in EDGES:
        return JsonResponse({"error": f"no edge {edge!r}; edges: {', '.join(EDGES)}"}, status=404)
    sub = get_object_or_404(Subscription, pk=pk)
    if edge == "deposit":
        tasks.deposit.delay(subscription_id=sub.pk)
    else:
        try:
            # Checked now against the state read here; the worker checks again under the lease
            # and does nothing if the object has moved on (a duplicate or late delivery).
            getattr(sub.machine, edge)(as_task=True)
        except TransitionException as exc:
            return JsonResponse({"error": str(exc)}, status=409)
    return JsonResponse({"queued": edge, "id": sub.pk}, status=202)


@require_GET
def stats(request: HttpRequest) -> JsonResponse:
    def duplicates(ledger: type[Charge] | type[Bill]) -> int:
        per_period = ledger.objects.values("subscription_id", "period").annotate(n=Count("id"))
        return sum(row["n"] - 1 for row in per_period)

    return JsonResponse(
        {
            "subscriptions": Subscription.objects.count(),
            "balance": Subscription.objects.aggregate(total=Sum("balance"))["total"] or 0,
            "charges": Charge.objects.count(),
            "bills": Bill.objects.count(),
            "illegal": duplicates(Charge) + duplicates(Bill),
        }
    )
