"""``dsm_redis.admin.StateMachineAdminMixin`` through Django's test client: buttons by permission,
CSRF, a message (never a server error) for each refusal, the lease holder, the bulk actions."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
from django.apps import apps
from django.contrib.auth.management import create_permissions
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.test import Client

from dsm_redis import LockLost, StaleFencingToken, object_lock
from tests.testapp.models import Invoice

pytestmark = pytest.mark.django_db


def change_url(invoice: Invoice) -> str:
    return f"/admin/testapp/invoice/{invoice.pk}/change/"


def transition_url(invoice: Invoice) -> str:
    return f"/admin/testapp/invoice/{invoice.pk}/transition/"


def click(client: Client, invoice: Invoice, edge: str, **data: Any) -> Any:
    return client.post(transition_url(invoice), {"_machine": "machine", "_edge": edge, **data})


def texts(response: Any) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def buttons(response: Any) -> list[str]:
    return re.findall(r'name="_transition" value="([^"]+)"', response.content.decode())


@pytest.fixture
def staff(django_user_model: Any) -> Any:
    """A staff user who may change invoices, nothing more; ``grant(codename)`` adds one."""
    create_permissions(apps.get_app_config("testapp"), verbosity=0)  # not after a flush (conftest.py)
    user = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_invoice", "change_invoice"]))

    def grant(codename: str) -> Any:
        user.user_permissions.add(Permission.objects.get(codename=codename))
        return django_user_model.objects.get(pk=user.pk)  # a fresh permission cache

    user.grant = grant
    return user


def test_the_change_form_shows_the_state_read_only_and_one_button_per_allowed_edge(admin_client):
    invoice = Invoice.objects.create()
    response = admin_client.get(change_url(invoice))
    page = response.content.decode()
    assert response.status_code == 200
    assert buttons(response) == ["pay", "fail", "to Cancelled"]
    assert 'name="status"' not in page  # read-only
    assert 'name="amount"' in page and 'type="password" name="card"' in page  # the pay form; card redacted
    assert "(created)" in page  # the history table


def test_a_click_runs_the_edge_as_the_user_and_the_history_shows_it(admin_client, admin_user):
    invoice = Invoice.objects.create()
    response = click(admin_client, invoice, "pay", amount="5")
    assert response.status_code == 302 and response["Location"] == change_url(invoice)
    assert texts(response) == [f"{invoice}: pay: New → Paid."]
    invoice.refresh_from_db()
    assert (invoice.status, invoice.paid) == ("paid", 5)
    record = invoice.machine.history()[0]
    assert (record.edge, record.actor) == ("pay", admin_user)
    page = admin_client.get(change_url(invoice)).content.decode()
    assert f'<td class="dsm-record-token">{record.fencing_token}</td>' in page
    assert f'<td class="dsm-record-actor">{admin_user.username}</td>' in page


def test_an_edge_without_side_effect_and_a_diverted_edge(admin_client):
    cancelled, failed = Invoice.objects.create(), Invoice.objects.create()
    assert texts(click(admin_client, cancelled, 'to:"cancelled"')) == [f"{cancelled}: to Cancelled: New → Cancelled."]
    response = click(admin_client, failed, "pay", amount="0")
    assert texts(response)[-1] == f"{failed}: pay failed; it moved from New to Failed."
    assert [Invoice.objects.get(pk=i.pk).status for i in (cancelled, failed)] == ["cancelled", "failed"]


def test_a_transition_is_never_a_get(admin_client):
    invoice = Invoice.objects.create()
    assert admin_client.get(transition_url(invoice), {"_machine": "machine", "_edge": "pay"}).status_code == 405
    assert Invoice.objects.get(pk=invoice.pk).status == "new"


def test_csrf_is_enforced(staff):
    invoice = Invoice.objects.create()
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    assert click(client, invoice, "pay", amount="5").status_code == 403
    assert Invoice.objects.get(pk=invoice.pk).status == "new"
    page = client.get(change_url(invoice)).content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = click(client, invoice, "pay", amount="5", csrfmiddlewaretoken=token)
    assert response.status_code == 302
    assert Invoice.objects.get(pk=invoice.pk).status == "paid"


def test_buttons_and_clicks_follow_the_edge_permissions(client, staff):
    invoice = Invoice.objects.create(status="paid")
    client.force_login(staff)
    assert buttons(client.get(change_url(invoice))) == []  # ship needs its permission, refund a superuser
    assert click(client, invoice, "ship").status_code == 403
    assert click(client, invoice, "refund").status_code == 403
    client.force_login(staff.grant("ship_invoice"))
    assert buttons(client.get(change_url(invoice))) == ["ship"]
    assert click(client, invoice, "ship").status_code == 302
    assert Invoice.objects.get(pk=invoice.pk).status == "shipped"


def test_a_user_who_may_only_view_gets_no_button(client, django_user_model):
    create_permissions(apps.get_app_config("testapp"), verbosity=0)
    viewer = django_user_model.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_invoice"))
    invoice = Invoice.objects.create()
    client.force_login(viewer)
    assert buttons(client.get(change_url(invoice))) == []
    assert click(client, invoice, "pay", amount="1").status_code == 403


def test_a_refused_transition_is_a_message(admin_client):
    invoice = Invoice.objects.create()
    response = click(admin_client, invoice, "ship")  # from new: no such edge
    assert response.status_code == 302
    assert "ship refused" in texts(response)[-1] and "does not start from the current state" in texts(response)[-1]
    response = click(admin_client, invoice, "pay")  # its argument missing
    assert response.status_code == 302 and "amount: This field is required." in texts(response)[-1]
    response = click(admin_client, invoice, "pay", amount="ten")
    assert response.status_code == 302 and "amount: Enter a whole number." in texts(response)[-1]
    assert Invoice.objects.get(pk=invoice.pk).status == "new"


@pytest.mark.django_db(transaction=True)
def test_a_busy_object_is_a_message_and_its_lease_holder_is_shown(admin_client):
    invoice = Invoice.objects.create()
    held, done = threading.Event(), threading.Event()
    tokens: list[int] = []

    def holder() -> None:  # another holder of the lease (a thread holds it as a process would)
        from django.db import connections

        try:
            with object_lock(invoice) as lease:
                tokens.append(lease.fencing_token)
                held.set()
                done.wait(60)
        finally:
            connections.close_all()

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    try:
        assert held.wait(60)
        page = admin_client.get(change_url(invoice)).content.decode()
        assert "Locked by <code>" in page and f"fencing token {tokens[0]}" in page
        response = click(admin_client, invoice, "pay", amount="5")
        assert response.status_code == 302
        assert texts(response) == [
            f"{invoice}: pay not run: another process holds this object's lease; try again in a moment."
        ]
    finally:
        done.set()
        thread.join(60)
    assert Invoice.objects.get(pk=invoice.pk).status == "new"
    assert "Locked by" not in admin_client.get(change_url(invoice)).content.decode()


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (StaleFencingToken("stale", token=1, mark=2), "a newer holder of this object's lease has written it"),
        (LockLost("lease lost"), "LockLost: lease lost"),
    ],
)
def test_other_lock_errors_are_messages(admin_client, monkeypatch, error, message):
    invoice = Invoice.objects.create()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr("dsm_redis.protocol.save_judged", refuse)  # the fenced write refused
    response = click(admin_client, invoice, "pay", amount="5")
    assert response.status_code == 302 and message in texts(response)[0]
    assert Invoice.objects.get(pk=invoice.pk).status == "new"


def test_the_bulk_action_transitions_one_by_one_and_reports(admin_client):
    new = [Invoice.objects.create() for _ in range(2)]
    shipped = Invoice.objects.create(status="shipped")
    response = admin_client.post(
        "/admin/testapp/invoice/",
        {"action": "dsm_machine_to_cancelled", "_selected_action": [i.pk for i in [*new, shipped]]},
    )
    assert response.status_code == 302
    messages = texts(response)
    assert messages[-1] == "2 transitioned, 1 refused."
    assert f"{shipped}: no edge 'to:\"cancelled\"' from Shipped." in messages
    assert sorted(Invoice.objects.values_list("status", flat=True)) == ["cancelled", "cancelled", "shipped"]


def test_the_bulk_actions_offered(admin_client, client, staff):
    Invoice.objects.create(status="paid")
    page = admin_client.get("/admin/testapp/invoice/").content.decode()
    offered = re.findall(r'<option value="(dsm_[^"]+)"', page)
    assert offered == ["dsm_machine_fail", "dsm_machine_ship", "dsm_machine_refund", "dsm_machine_to_cancelled"]
    client.force_login(staff)
    response = client.post(
        "/admin/testapp/invoice/",
        {"action": "dsm_machine_ship", "_selected_action": list(Invoice.objects.values_list("pk", flat=True))},
    )
    assert "you may not take ship" in texts(response)[0]


def test_the_bulk_action_asks_the_object_level_change_permission_as_the_button_does(admin_client, monkeypatch):
    from tests.testapp.admin import InvoiceAdmin

    free, kept = Invoice.objects.create(), Invoice.objects.create()

    def may_change(self: Any, request: Any, obj: Any = None) -> bool:
        return obj is None or obj.pk != kept.pk  # a project's per-object rule

    monkeypatch.setattr(InvoiceAdmin, "has_change_permission", may_change)
    assert click(admin_client, kept, "to:\"cancelled\"").status_code == 403
    response = admin_client.post(
        "/admin/testapp/invoice/", {"action": "dsm_machine_to_cancelled", "_selected_action": [free.pk, kept.pk]}
    )
    assert texts(response)[-1] == "1 transitioned, 1 refused."
    assert Invoice.objects.get(pk=kept.pk).status == "new"
    assert Invoice.objects.get(pk=free.pk).status == "cancelled"


def test_an_edge_permission_is_judged_on_the_row_the_transition_runs_on(client, staff, monkeypatch):
    invoice = Invoice.objects.create(status="paid", paid=50)
    (refund,) = [t for t in Invoice.machine.machine.edges if t.name == "refund"]

    def small_refunds(user: Any, row: Invoice) -> bool:  # staff may refund invoices under 100
        allowed = row.paid < 100
        # Another holder raises the invoice after the view read it, before the click's lease.
        Invoice.objects.filter(pk=invoice.pk).update(paid=500)
        return allowed

    monkeypatch.setattr(refund.side_effect, "_permissions", (small_refunds,))
    client.force_login(staff)
    click(client, invoice, "refund")
    assert Invoice.objects.get(pk=invoice.pk).status == "paid"  # not refunded: 500 is not under 100


def test_saving_the_change_form_never_writes_back_a_state_a_transition_changed(admin_client, monkeypatch):
    from tests.testapp.admin import InvoiceAdmin

    invoice = Invoice.objects.create()
    save_form = InvoiceAdmin.save_form

    def meanwhile(self: Any, request: Any, form: Any, change: bool) -> Any:
        # The form holds the invoice as the POST read it (new); a transition commits now.
        Invoice.objects.get(pk=invoice.pk).machine.pay(amount=5)
        return save_form(self, request, form, change)

    monkeypatch.setattr(InvoiceAdmin, "save_form", meanwhile)
    response = admin_client.post(change_url(invoice), {"paid": "0", "failure": "checked", "_save": "Save"})
    assert response.status_code == 302
    saved = Invoice.objects.get(pk=invoice.pk)
    assert (saved.status, saved.paid, saved.failure) == ("paid", 5, "checked")  # the edit, and the transition
