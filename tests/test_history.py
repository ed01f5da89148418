"""Transition history (``dsm_redis.history``): one record per committed transition, written in its
own transaction; none for a rolled-back one; the actor from the context, a request or a task."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import transaction

import dsm_redis
from dsm_redis.keys import object_key
from dsm_redis.models import FencingMark, TransitionRecord
from tests.celery_worker import run_transition
from tests.helpers import WAIT
from tests.procs import committed_per_account, run_workers
from tests.testapp.models import HistoryAccount, Invoice, Order

both = pytest.mark.django_db(databases=["default", "sqlite"])


def records(obj):
    return list(obj.machine.history())


@both
def test_a_transition_and_the_creation_are_recorded(db_alias):
    invoice = Invoice.objects.using(db_alias).create()
    (created,) = records(invoice)
    assert (created.source, created.target, created.edge, created.fencing_token) == (None, "new", "", None)
    assert (created.model, created.object_id, created.field) == ("testapp.invoice", str(invoice.pk), "machine")

    invoice.machine.pay(amount=5, card="4111 1111")
    paid, first = records(invoice)  # newest first
    assert first == created
    assert (paid.edge, paid.source, paid.target) == ("pay", "new", "paid")
    assert paid.kwargs == {"amount": 5, "card": "[redacted]"}  # InvoiceMachine.history_redact
    mark = FencingMark.objects.using(db_alias).get(pk=object_key(invoice))
    assert paid.fencing_token == mark.token and paid.lease_owner == mark.owner


@pytest.mark.django_db(transaction=True)
def test_positional_arguments_are_recorded_by_name_and_redacted_as_keywords_are():
    invoice = Invoice.objects.create()
    invoice.machine.pay(5, "4111 1111")  # card passed positionally: still the card the redaction names
    paid = records(invoice)[0]
    assert paid.kwargs == {"amount": 5, "card": "[redacted]"}


@pytest.mark.django_db
def test_a_rolled_back_transition_or_creation_leaves_no_record():
    invoice = Invoice.objects.create()
    with pytest.raises(RuntimeError), transaction.atomic():
        invoice.machine.pay(amount=5)
        raise RuntimeError("the caller's transaction rolls back")
    with pytest.raises(RuntimeError), transaction.atomic():
        Invoice.objects.create()
        raise RuntimeError("so does the insert")
    assert [r.edge for r in TransitionRecord.objects.all()] == [""]  # the first creation only
    invoice.refresh_from_db()
    assert invoice.status == "new"


@pytest.mark.django_db
def test_transition_failed_records_the_edge_to_the_error_state_naming_the_failed_edge():
    invoice = Invoice.objects.create()
    assert invoice.machine.pay(amount=0) == "failed"
    failed = records(invoice)[0]
    assert (failed.edge, failed.failed_edge, failed.source, failed.target) == ("fail", "pay", "new", "failed")
    assert failed.kwargs == {"reason": "bad amount 0"}
    assert len(records(invoice)) == 2  # the creation, then the diverted edge: nothing of pay itself


@pytest.mark.django_db
def test_an_unsaved_object_inserted_by_its_transition_has_that_one_record():
    invoice = Invoice()
    invoice.machine.pay(amount=3)
    (record,) = records(invoice)
    assert (record.edge, record.source, record.target, record.fencing_token) == ("pay", "new", "paid", None)


@pytest.mark.django_db
def test_machines_without_history_write_nothing():
    Order.objects.create().machine.pay(amount=1)
    assert not TransitionRecord.objects.exists()


@pytest.mark.django_db
def test_the_actor_of_the_context(django_user_model):
    user = django_user_model.objects.create_user("ada")
    invoice = Invoice.objects.create()
    with dsm_redis.actor(user):
        invoice.machine.pay(amount=1)
    with dsm_redis.actor("cron:nightly"):
        invoice.machine.ship()
    shipped, paid, created = records(invoice)
    assert (paid.actor_model, paid.actor_id, paid.actor_label) == ("auth.user", str(user.pk), "ada")
    assert paid.actor == user
    assert (shipped.actor_model, shipped.actor_id, shipped.actor) == ("", "cron:nightly", "cron:nightly")
    assert created.actor is None and created.actor_label == ""


@pytest.mark.django_db
def test_the_actor_of_a_request(client, django_user_model):
    user = django_user_model.objects.create_user("grace")
    invoices = [Invoice.objects.create() for _ in range(2)]
    client.force_login(user)
    assert client.post(f"/invoices/{invoices[0].pk}/pay/", {"amount": "2"}).content == b"paid"
    client.logout()
    assert client.post(f"/invoices/{invoices[1].pk}/pay/").content == b"paid"
    assert records(invoices[0])[0].actor == user
    assert records(invoices[1])[0].actor is None  # anonymous: no actor


@pytest.mark.django_db(transaction=True)  # the task is sent when the transaction commits
def test_a_task_records_the_actor_who_enqueued_it_and_its_id(captured, django_user_model):
    user = django_user_model.objects.create_user("linus")
    invoice = Invoice.objects.create()
    with dsm_redis.actor(user):
        invoice.machine.pay(amount=7, as_task=True)
    ((task_id, payload),) = captured
    assert payload["actor"] == ["auth.user", str(user.pk), "linus"]  # a reference, never the object
    assert json.loads(json.dumps(payload)) == payload
    assert run_transition(payload, task_id) == "paid"  # what a worker does with the message
    paid = records(invoice)[0]
    assert (paid.edge, paid.task_id, paid.actor) == ("pay", task_id, user)


@pytest.mark.django_db(transaction=True)
def test_a_worker_records_the_actor_who_enqueued_the_task(worker, django_user_model):
    user = django_user_model.objects.create_user("barbara")
    invoice = Invoice.objects.create()
    with dsm_redis.actor(user):
        result = invoice.machine.pay(amount=3, as_task=True)  # autocommit: sent at once
    assert result.get(timeout=WAIT) == "paid"
    paid = records(invoice)[0]
    assert (paid.edge, paid.task_id, paid.actor, paid.actor_label) == ("pay", result.id, user, "barbara")


@pytest.mark.django_db(transaction=True)
def test_a_forged_actor_reference_is_stored_as_nothing(captured):
    invoice = Invoice.objects.create()
    invoice.machine.pay(amount=7, as_task=True)
    ((task_id, payload),) = captured
    assert "actor" not in payload  # no actor: the payload is as it was
    run_transition({**payload, "actor": {"__class__": "os.system"}}, task_id)
    assert records(invoice)[0].actor_label == ""


@pytest.mark.django_db(transaction=True)
def test_records_match_committed_transitions_one_to_one_under_a_multi_process_race():
    accounts = [HistoryAccount.objects.create() for _ in range(2)]
    ids = [a.pk for a in accounts]
    results = run_workers("tests.workers:dsm_deposit", 4, ids, 6, 0.002, "testapp.HistoryAccount")
    per_account = committed_per_account(results, ids)
    for account in HistoryAccount.objects.filter(pk__in=ids):
        deposits = [r for r in reversed(records(account)) if r.edge == "deposit"]
        assert len(deposits) == account.deposits == per_account[account.pk]
        tokens = [r.fencing_token for r in deposits]
        assert tokens == sorted(set(tokens)), "one record per lease, in the order the leases committed"
        assert deposits[-1].fencing_token == FencingMark.objects.get(pk=object_key(account)).token
        assert {r.kwargs["effect"].startswith("<function") for r in deposits} == {True}  # not JSON: its repr
    assert sum(per_account.values()) == 4 * 6


@pytest.mark.django_db
def test_the_dsm_history_command(django_user_model):
    invoice = Invoice.objects.create()
    with dsm_redis.actor(django_user_model.objects.create_user("ken")):
        invoice.machine.pay(amount=0)
    out = StringIO()
    call_command("dsm_history", "testapp.Invoice", str(invoice.pk), stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["TIME", "FIELD", "EDGE", "SOURCE", "TARGET", "TOKEN", "ACTOR", "TASK"]
    assert "fail (failed: pay)" in lines[1] and "ken" in lines[1] and "(created)" in lines[2]
    out = StringIO()
    call_command("dsm_history", "testapp.Invoice", str(invoice.pk), "--json", stdout=out)
    data = json.loads(out.getvalue())
    assert [(r["edge"], r["target"], r["actor"]) for r in data] == [("fail", "failed", "ken"), ("", "new", "")]
    assert data[0]["fencing_token"] == records(invoice)[0].fencing_token


def test_allowed_transitions_apply_permissions(django_user_model):
    from django.contrib.auth.models import AnonymousUser

    paid = Invoice(status="paid")

    class Staff:
        is_superuser = False

        def __init__(self, *perms):
            self.perms = set(perms)

        def has_perm(self, perm, obj=None):
            return perm in self.perms

    assert [t.name for t in paid.machine.allowed_transitions(Staff())] == []
    assert [t.name for t in paid.machine.allowed_transitions(Staff("testapp.ship_invoice"))] == ["ship"]
    assert [t.name for t in paid.machine.allowed_transitions(AnonymousUser())] == []
    new = Invoice(status="new")
    assert [t.name for t in new.machine.allowed_transitions(Staff())] == ["pay", "fail", None]


def test_the_redaction_hook_and_values_that_are_not_json():
    from dsm_redis.history import redact
    from tests.testapp.models import InvoiceMachine

    options = Invoice._meta  # not JSON: stored as its repr
    machine = Invoice.machine.machine
    edge = machine.edge_named("new", "pay", model=Invoice)
    assert redact(machine, edge, {"amount": 1, "card": "4111", "meta": options}) == {
        "amount": 1,
        "card": "[redacted]",  # InvoiceMachine.history_redact
        "meta": repr(options),
    }

    class Masking(InvoiceMachine):
        def redact_history(self, transition, kwargs):
            return {name: "***" for name in kwargs}

    assert redact(Masking("machine", "status"), edge, {"amount": 1}) == {"amount": "***"}


def history_on(monkeypatch, field):
    """Turn history on for a model's machine (as ``history=True`` does, less the creation record)."""
    monkeypatch.setattr(field.machine, "history", True)


@pytest.mark.django_db
def test_one_row_has_one_history_whichever_instance_or_model_reaches_it(monkeypatch):
    from tests.testapp.models import DEAD, Cat, DecimalAccount, Lion

    history_on(monkeypatch, Cat.state_machine)
    lion = Lion.objects.create()
    lion.state_machine.survive()  # through the child
    cat = Cat.objects.get(pk=lion.pk)
    cat.state_machine.transition_to(DEAD)  # the same row, through its parent (one lease, one mark)
    assert [r.edge for r in lion.state_machine.history()] == ["", "survive"]
    assert [r.edge for r in cat.state_machine.history()] == ["", "survive"]

    history_on(monkeypatch, DecimalAccount.machine)
    given = DecimalAccount.objects.create(number="7.5")  # the instance keeps "7.5"; the row holds 7.50
    given.machine.deposit()
    read = DecimalAccount.objects.get(pk="7.50")
    read.machine.deposit()
    assert len(given.machine.history()) == len(read.machine.history()) == 2


@pytest.mark.django_db(transaction=True)  # the task is sent when the transaction commits
def test_a_primary_key_or_task_id_longer_than_the_record_columns_still_commits(monkeypatch, captured):
    from dsm_redis.keys import stored_key
    from tests.testapp.models import KeyedAccount

    history_on(monkeypatch, KeyedAccount.machine)
    account = KeyedAccount.objects.create(key="k" * 300)
    account.machine.deposit()
    (deposit,) = account.machine.history()
    assert (deposit.edge, deposit.object_id) == ("deposit", stored_key("k" * 300))

    invoice = Invoice.objects.create()
    invoice.machine.pay(amount=7, as_task=True)
    ((_, payload),) = captured
    long_id = "t" * 300  # apply_async(task_id=...) with an id of the caller's own
    assert run_transition(payload, long_id) == "paid"
    paid = records(invoice)[0]
    assert (paid.edge, paid.task_id) == ("pay", stored_key(long_id))


@pytest.mark.django_db
def test_a_transition_run_by_any_celery_task_records_its_id():
    from celery import shared_task

    @shared_task(bind=True, name="tests.test_history.pay")
    def pay(self: Any, pk: int) -> None:  # a project's own task, not dsm_redis's
        Invoice.objects.get(pk=pk).machine.pay(amount=1)

    invoice = Invoice.objects.create()
    pay.apply(args=[invoice.pk], task_id="a-task-of-the-project", throw=True)
    assert records(invoice)[0].task_id == "a-task-of-the-project"
    invoice.machine.refund()  # outside any task
    assert records(invoice)[0].task_id == ""
