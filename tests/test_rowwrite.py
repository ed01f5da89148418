"""The transition's UPDATE (``rowwrite.py``) behaves as ``save(update_fields=...)`` does: the same
SQL, signals, ``auto_now``, errors; and ``save()`` itself runs where a model needs it."""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest
from django.db import DatabaseError, connection, connections, models, transaction
from django.db.models import F
from django.db.models.signals import post_save, pre_save
from django.test.utils import CaptureQueriesContext, isolate_apps
from django.utils import timezone

from dsm_redis import rowwrite
from tests.testapp.models import Account, Cat, DecimalAccount, Lion, Order, ProxyCat, UuidAccount

pytestmark = pytest.mark.django_db(transaction=True)


def updates(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]


def test_the_compiled_update_is_the_orms_own(monkeypatch):
    account = Account.objects.create()
    with CaptureQueriesContext(connection) as compiled:
        account.machine.deposit()
    assert rowwrite._plan(Account) is not None and rowwrite._plan(Account).statements  # the fast path ran
    Account.objects.filter(pk=account.pk).update(balance=0, deposits=0)  # the same transition again
    monkeypatch.setattr(rowwrite, "_plan", lambda model: None)  # save() itself
    with CaptureQueriesContext(connection) as orm:
        account.machine.deposit()
    assert updates(compiled) == updates(orm) and len(updates(orm)) == 1
    assert Account.objects.get(pk=account.pk).balance == 1


def test_pre_and_post_save_fire_as_for_save():
    seen: list[tuple[str, Any, Any]] = []

    def before(sender: Any, instance: Any, update_fields: Any, raw: bool, using: str, **kw: Any) -> None:
        seen.append(("pre", sender, update_fields))

    def after(sender: Any, instance: Any, created: bool, update_fields: Any, **kw: Any) -> None:
        seen.append(("post", created, update_fields))

    pre_save.connect(before, sender=Account)
    post_save.connect(after, sender=Account)
    try:
        account = Account.objects.create()
        seen.clear()
        account.machine.deposit()
    finally:
        pre_save.disconnect(before, sender=Account)
        post_save.disconnect(after, sender=Account)
    fields = frozenset({"state", "balance", "deposits"})
    assert seen == [("pre", Account, fields), ("post", False, fields)]


def test_a_proxy_signals_with_the_proxy_as_sender():
    senders: list[Any] = []

    def before(sender: Any, **kw: Any) -> None:
        senders.append(sender)

    pre_save.connect(before)
    try:
        cat = ProxyCat.objects.create()
        senders.clear()
        cat.state_machine.survive()
    finally:
        pre_save.disconnect(before)
    assert senders == [ProxyCat]
    assert Cat.objects.get(pk=cat.pk).state == cat.state


def test_auto_now_moves_on_every_transition():
    order = Order.objects.create()
    before = Order.objects.get(pk=order.pk).updated
    order.machine.pay(amount=5)
    assert Order.objects.get(pk=order.pk).updated > before


def test_an_expression_written_by_a_side_effect_goes_through_the_orm():
    account = Account.objects.create(balance=10)
    with transaction.atomic():
        account.balance = F("balance") + 5
        rowwrite.save_fields(account, "default", ["balance"])
    assert Account.objects.get(pk=account.pk).balance == 15


def test_a_row_gone_is_refused_as_save_refuses_it():
    account = Account.objects.create()
    Account.objects.filter(pk=account.pk).delete()
    with pytest.raises(DatabaseError, match="did not affect any rows"), transaction.atomic():
        rowwrite.save_fields(account, "default", ["balance"])


def test_a_primary_key_in_update_fields_gets_saves_own_error():
    account = Account.objects.create()
    with pytest.raises(ValueError) as by_save, transaction.atomic():
        account.save(using="default", update_fields=["id", "balance"])
    # Django's own message (it differs between 4.2 and 5.x), not one of ours.
    with pytest.raises(ValueError, match=f"^{re.escape(str(by_save.value))}$"), transaction.atomic():
        rowwrite.save_fields(account, "default", ["id", "balance"])


def test_multi_table_inheritance_keeps_save():
    assert rowwrite._plan(Lion) is None
    lion = Lion.objects.create()
    lion.state_machine.survive()
    assert Lion.objects.get(pk=lion.pk).state == lion.state


@isolate_apps("tests.testapp", attr_name="apps")
def test_a_model_with_its_own_save_keeps_it(apps: Any = None):
    class Audited(models.Model):
        state = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

        def save(self, *args: Any, **kwargs: Any) -> None:
            super().save(*args, **kwargs)

    class Plain(models.Model):
        state = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"

    class Filtered(models.Model):
        state = models.CharField(max_length=10)
        payload = models.JSONField(default=dict)

        class Meta:
            app_label = "testapp"
            select_on_save = True

    assert rowwrite._plan(Audited) is None
    assert rowwrite._plan(Filtered) is None
    assert rowwrite._plan(Plain) is not None



def test_an_instance_without_primary_key_gets_saves_error():
    # After delete(), or a pre_save receiver that unset it: save() refuses to write, it does not
    # UPDATE "WHERE id IS NULL" (nor cache that statement's mismatch as "not compilable").
    account = Account.objects.create()
    account.pk = None
    with pytest.raises(ValueError, match="no primary key"), transaction.atomic():
        rowwrite.save_fields(account, "default", ["deposits"])
    plan = rowwrite._plan(Account)
    assert plan is not None and None not in plan.statements.values()


def test_an_instance_never_saved_is_written_as_save_writes_it():
    # save(update_fields=...) of an instance still being added, whose primary key has a default,
    # skips the UPDATE and inserts it: not an UPDATE that finds no row.
    account = UuidAccount(balance=3)
    rowwrite.save_fields(account, "default", ["balance"])
    assert UuidAccount.objects.get(pk=account.pk).balance == 3 and not account._state.adding


@pytest.mark.parametrize(("owner", "method"), [(Account, "save"), (models.Model, "save_base")])
def test_a_save_path_patched_after_the_first_transition_runs(monkeypatch, owner, method):
    account = Account.objects.create()
    account.machine.deposit()  # the model's plan is made, its statement compiled
    calls: list[Any] = []
    original = getattr(owner, method)

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(sorted(kwargs["update_fields"]))
        original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, patched)  # as mock.patch.object does in a test suite
    account.machine.deposit()
    assert calls == [["balance", "deposits", "state"]]
    assert Account.objects.get(pk=account.pk).balance == 2


@pytest.mark.parametrize("alias", ["default", "sqlite"])
@pytest.mark.django_db(transaction=True, databases=["default", "sqlite"])
def test_a_primary_key_beyond_64_bit_integers_fails_as_save_fails(monkeypatch, alias):
    # Django 5 compiles it to no query (no row can have it): "did not affect any rows"; Django 4.2
    # sends it, and SQLite's driver refuses it. The compiled statement must do as the ORM does,
    # whether this key is the one it is compiled with or it was compiled before.
    plan = rowwrite._plan(Account)
    assert plan is not None
    monkeypatch.setattr(plan, "statements", {})
    account = Account.objects.using(alias).create()
    account.pk = 2**64
    for _ in range(2):
        outcomes = []
        for write in (account.save, functools.partial(rowwrite.save_fields, account)):
            with pytest.raises((DatabaseError, OverflowError)) as raised, transaction.atomic(using=alias):
                write(using=alias, update_fields=["balance"])
            outcomes.append((type(raised.value), str(raised.value)))
        assert outcomes[0] == outcomes[1]
        account.pk = Account.objects.using(alias).get().pk
        rowwrite.save_fields(account, alias, ["balance"])  # now compiled with a key a row can have
        account.pk = 2**64


@pytest.mark.django_db(transaction=True, databases=["default", "sqlite"])
def test_what_the_database_layer_is_given_is_the_orms_own(db_alias):
    # What an execute wrapper (a tracer, a query logger) sees: the same SQL and the same
    # parameters, a tuple as the ORM passes it, for primary keys held in another form than stored,
    # and for a NULL (the ORM writes it into the SQL) after the statement was compiled with a value.
    account = Account.objects.using(db_alias).create()
    uuid_account = UuidAccount.objects.using(db_alias).create()
    decimal_account = DecimalAccount.objects.using(db_alias).create(number="7.5")
    cat = Cat.objects.using(db_alias).create(time_of_death=timezone.now())
    rowwrite.save_fields(cat, db_alias, ["time_of_death"])  # compiled with a value
    cases = [
        (account, account.pk, "balance", 5),
        (uuid_account, str(uuid_account.pk).upper(), "balance", 5),
        (decimal_account, "7.50", "balance", 5),
        (cat, cat.pk, "time_of_death", None),
    ]
    seen: list[tuple[str, Any]] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith("UPDATE"):
            seen.append((sql, params))
        return execute(sql, params, many, context)

    for obj, pk, name, value in cases:
        seen.clear()
        for write in (obj.save, functools.partial(rowwrite.save_fields, obj)):
            obj.pk = pk
            setattr(obj, name, value)
            with connections[db_alias].execute_wrapper(wrapper), transaction.atomic(using=db_alias):
                write(using=db_alias, update_fields=[name])
        assert len(seen) == 2 and seen[0] == seen[1] and type(seen[0][1]) is type(seen[1][1]), seen
        assert getattr(type(obj).objects.using(db_alias).get(), name) == value


@isolate_apps("tests.testapp", attr_name="apps")
def test_a_json_column_keeps_the_compiled_statement(apps: Any = None):
    # On PostgreSQL the driver's JSON wrapper has no equality: the check that the ORM binds the
    # same parameters must not take it for another statement (the ORM path for ever after).
    class Document(models.Model):
        state = models.CharField(max_length=10)
        payload = models.JSONField(default=dict)

        class Meta:
            app_label = "testapp"

    document = Document(pk=1, state="a", payload={"lines": [1, 2]})
    document._state.adding = False
    with pytest.raises(DatabaseError), transaction.atomic():  # no table: only the statement matters
        rowwrite.save_fields(document, "default", ["payload", "state"])
    plan = rowwrite._plan(Document)
    assert plan is not None and len(plan.statements) == 1 and None not in plan.statements.values()


def test_no_fields_to_write_is_no_save_as_for_save():
    # save(update_fields=[]) returns before signalling or writing anything.
    account = Account.objects.create()
    senders: list[Any] = []

    def receiver(sender: Any, **kw: Any) -> None:
        senders.append(sender)

    pre_save.connect(receiver, sender=Account)
    post_save.connect(receiver, sender=Account)
    try:
        with CaptureQueriesContext(connection) as ctx:
            rowwrite.save_fields(account, "default", [])
    finally:
        pre_save.disconnect(receiver, sender=Account)
        post_save.disconnect(receiver, sender=Account)
    assert senders == [] and ctx.captured_queries == []


def test_a_related_object_unsaved_or_saved_since_is_checked_as_save_checks_it():
    # save()'s related-object checks, on a model with a nullable foreign key (the admin's LogEntry):
    # an unsaved object is refused, one saved after it was assigned gives its key.
    from django.contrib.admin.models import LogEntry
    from django.contrib.auth.models import User
    from django.contrib.contenttypes.models import ContentType

    entry = LogEntry.objects.create(user=User.objects.create(username="u"), action_flag=1, object_repr="r")
    assert rowwrite._plan(LogEntry) is not None
    kind = ContentType(app_label="testapp", model="nothing")
    entry.content_type = kind
    with pytest.raises(ValueError, match="unsaved related object 'content_type'"), transaction.atomic():
        rowwrite.save_fields(entry, "default", ["action_flag"])
    entry.content_type = kind
    kind.save()
    rowwrite.save_fields(entry, "default", ["content_type"])
    assert LogEntry.objects.get(pk=entry.pk).content_type_id == kind.pk
