"""The test suite's URLs: the admin (``tests/testapp/admin.py``), a view that transitions as its user,
and async views (``tests/testapp/views.py``, served by uvicorn in ``test_asyncio.py``)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import path

from tests.testapp import views


def pay_invoice(request: HttpRequest, pk: int) -> HttpResponse:
    """A plain view: ``ActorMiddleware`` makes its user the actor of the transition it runs."""
    from tests.testapp.models import Invoice

    invoice = Invoice.objects.get(pk=pk)
    invoice.machine.pay(amount=int(request.POST.get("amount", "1")))
    return HttpResponse(invoice.status)


urlpatterns = [
    path("admin/", admin.site.urls),
    path("invoices/<int:pk>/pay/", pay_invoice),
    path("ping", views.ping),
    path("deposit/<int:pk>", views.deposit),
]
