"""The compiled row-lock statement (``rowlock.py``) against the ORM's own, on PostgreSQL, where the
fence runs inside it: every kind of column, a statement compiled by another thread's connection, and
the row a waiting transition reads when the object has no fencing mark yet; a ``FencingTokenField``
model's row lock (the ORM's statement, its wait bounded, the mark committed last judged, no queryset
built per transition); and the row read under the lock adopted by a caller's instance with deferred
fields, on both databases.

The basic shapes (UUID, Decimal and string keys, a missing row) are in ``test_fencing.py``.
"""

from __future__ import annotations

import datetime
import decimal
from typing import Any

import pytest
from django.db import connections, models, transaction
from django.db.models.query import QuerySet
from django.test.utils import CaptureQueriesContext, isolate_apps

from dsm_redis.fence import MARK
from dsm_redis.keys import object_key
from dsm_redis.marks import mark_table
from dsm_redis.models import FencingMark
from dsm_redis.rowlock import _STATEMENTS, locked_row
from dsm_redis.token import Token
from tests.helpers import dsm_options, fresh, pg_connect, wait_for
from tests.procs import in_background
from tests.testapp.models import DEAD, Account, Cat, FencedAccount, Lion

pytestmark = pytest.mark.django_db(databases=["default", "sqlite"], transaction=True)
postgresql = pytest.mark.skipif(
    "connections['default'].vendor != 'postgresql'", reason="the fence runs in the scan on PostgreSQL"
)


class Shouting(models.CharField):
    """A column with a converter of its own (``from_db_value``)."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        return None if value is None else value.upper()


def _both_ways(model: type[models.Model], pk: Any) -> list[tuple[list[str], models.Model]]:
    """The row read by the ORM's ``.annotate(...).get()``, then by the compiled statement."""
    token = Token(object_key(model, pk), 5, "owner")
    found = []
    for compiled in (False, True):
        _STATEMENTS.clear()
        with transaction.atomic(), CaptureQueriesContext(connections["default"]) as queries:
            in_scan = mark_table("default").judge_in_scan(token, "1000ms")
            rows = model._base_manager.db_manager("default").select_for_update().filter(pk=pk)
            row = (
                locked_row(model, "default", pk, MARK, in_scan) if compiled else rows.annotate(**{MARK: in_scan}).get()
            )
        assert not compiled or _STATEMENTS[(model, "default", "postgresql", in_scan.sql)] is not None
        found.append(([q["sql"] for q in queries], row))
    return found


def _values(model: type[models.Model], row: models.Model) -> dict[str, tuple[type, Any]]:
    return {f.attname: (type(getattr(row, f.attname)), getattr(row, f.attname)) for f in model._meta.concrete_fields}


@postgresql
@isolate_apps("tests.testapp")
def test_compiled_row_lock_reads_every_kind_of_column_as_the_orm_does():
    class Ledger(models.Model):
        code = models.CharField(primary_key=True, max_length=20, db_column="The Code")
        state = models.CharField(max_length=10, default="open", db_column="St")
        data = models.JSONField(default=dict)
        at = models.DateTimeField(null=True)
        day = models.DateField(null=True)
        took = models.DurationField(null=True)
        amount = models.DecimalField(max_digits=10, decimal_places=3, default=decimal.Decimal("1.5"))
        label = Shouting(max_length=10, default="abc")

        class Meta:
            app_label = "testapp"
            db_table = "Mixed Case Ledger"

    with connections["default"].schema_editor() as editor:
        editor.create_model(Ledger)
    try:
        at = datetime.datetime(2020, 1, 1, 12, tzinfo=datetime.timezone.utc)
        Ledger.objects.create(code="k1", data={"a": [1, {"b": None}]}, at=at, day=at.date(), took=datetime.timedelta(3))
        (orm_sql, orm_row), (sql, row) = _both_ways(Ledger, "k1")
        assert sql == orm_sql
        assert _values(Ledger, row) == _values(Ledger, orm_row)
        assert row.label == "ABC" and row.amount == decimal.Decimal("1.500") and row.at == at
        assert getattr(row, MARK) == getattr(orm_row, MARK) == 5
    finally:
        _STATEMENTS.clear()
        with connections["default"].schema_editor() as editor:
            editor.delete_model(Ledger)


@postgresql
@isolate_apps("tests.testapp")
def test_a_fencing_column_models_compiled_row_lock_reads_and_judges_as_the_orm_does():
    """A ``FencingTokenField`` model of another shape (a UUID key, renamed columns, a converter of
    its own): ``lock_row`` sends the ORM's ``_bounded(rows, timeout).get()``, builds the same
    instance, judges the mark on its column (a newer token accepted, an older one refused)."""
    import uuid

    from dsm_redis import StaleFencingToken
    from dsm_redis.fence import FencingTokenField, _bounded, lock_row
    from dsm_redis.rowlock import row_for_update

    class Vault(models.Model):
        key = models.UUIDField(primary_key=True, default=uuid.uuid4, db_column="Vault Key")
        label = Shouting(max_length=10, default="abc", db_column="Label")
        fence = FencingTokenField(db_column="Fence Mark")

        class Meta:
            app_label = "testapp"

    with connections["default"].schema_editor() as editor:
        editor.create_model(Vault)
    try:
        obj = Vault.objects.create(fence="3:old")
        with transaction.atomic(), CaptureQueriesContext(connections["default"]) as queries:
            orm = _bounded(row_for_update(Vault, "default", obj.pk), "1000ms").get()
        _STATEMENTS.clear()
        with transaction.atomic(), CaptureQueriesContext(connections["default"]) as compiled_queries:
            row, accepted = lock_row(obj, "default", Token(object_key(obj), 5, "me"), 1.0, in_caller_transaction=False)
        (statement,) = [s for (model, *_), s in _STATEMENTS.items() if model is Vault]
        assert statement is not None  # lock_row ran the compiled statement
        assert [q["sql"] for q in compiled_queries] == [q["sql"] for q in queries]
        assert _values(Vault, row) == {**_values(Vault, orm), "fence": (str, "5:me")}
        assert (row.label, getattr(row, MARK), accepted.number) == ("ABC", getattr(orm, MARK), 5)
        Vault.objects.filter(pk=obj.pk).update(fence="7:newer")
        with transaction.atomic(), pytest.raises(StaleFencingToken):
            lock_row(obj, "default", Token(object_key(obj), 6, "me"), 1.0, in_caller_transaction=False)
    finally:
        _STATEMENTS.clear()
        with connections["default"].schema_editor() as editor:
            editor.delete_model(Vault)


@postgresql
def test_a_statement_compiled_on_another_threads_connection_reads_on_this_one():
    obj = Account.objects.create(balance=3)
    _STATEMENTS.clear()
    in_background(lambda: Account.objects.get(pk=obj.pk).machine.deposit())()  # compiled there, connection closed
    assert [statement is not None for (model, *_), statement in _STATEMENTS.items() if model is Account] == [True]
    obj.machine.deposit()
    assert (fresh(obj).balance, fresh(obj).deposits) == (5, 2)


@postgresql
def test_a_fencing_column_models_row_lock_is_the_orms_statement_compiled_with_its_wait_bounded(settings):
    """With ``FencingTokenField`` the mark is judged in Python on the row's column; the statement only
    bounds the row-lock wait in its scan (``set_config('lock_timeout', ...)``) and locks the row. The
    compiled statement must be the ORM's, and its wait bounded: a row held by another transaction
    is a ``LockTimeout`` after ``ROW_LOCK_TIMEOUT``, not a wait as long as the holder's."""
    from django.db.models.query import MAX_GET_RESULTS

    from dsm_redis import LockTimeout
    from dsm_redis.fence import _bounded

    dsm_options(settings, ROW_LOCK_TIMEOUT=0.2)
    obj = FencedAccount.objects.create(balance=3)
    _STATEMENTS.clear()
    obj.machine.deposit(amount=1)
    (statement,) = [s for (model, *_), s in _STATEMENTS.items() if model is FencedAccount]
    assert statement is not None  # the transition ran the compiled statement
    rows = FencedAccount._base_manager.db_manager("default").select_for_update().filter(pk=obj.pk)
    orm = _bounded(rows, "200ms").order_by()  # as QuerySet.get() sends it
    orm.query.set_limits(high=MAX_GET_RESULTS)
    with transaction.atomic():
        assert statement.sql == orm.query.sql_with_params()[0]
    with connections["default"].cursor() as cursor:
        cursor.execute("SET statement_timeout = '30s'")  # without the bound: a failure, not a hang
    with pg_connect() as other:
        with other.transaction():
            other.execute("SELECT 1 FROM testapp_fencedaccount WHERE id = %s FOR UPDATE", [obj.pk])
            with pytest.raises(LockTimeout, match="row lock"):
                fresh(obj).machine.deposit(amount=1)
    assert (fresh(obj).balance, fresh(obj).deposits) == (4, 1)  # the refused one changed nothing


@postgresql
@pytest.mark.parametrize("model", [Account, FencedAccount], ids=["mark-table", "own-column"])
def test_a_transition_builds_no_queryset_once_its_row_lock_is_compiled(model, monkeypatch):
    """The compiled statement replaces the queryset, for the mark table and the row's own column
    alike: once compiled, a transition builds none (``fence`` must not build one it does not send)."""
    obj = model.objects.create(balance=3)
    obj.machine.deposit()  # compiles the row lock (and the UPDATE)
    built: list[type[models.Model]] = []
    init = QuerySet.__init__

    def counted(self: QuerySet, model: Any = None, *args: Any, **kwargs: Any) -> None:
        built.append(model)
        init(self, model, *args, **kwargs)

    monkeypatch.setattr(QuerySet, "__init__", counted)
    obj.machine.deposit()
    monkeypatch.undo()
    assert built == []
    assert (fresh(obj).balance, fresh(obj).deposits) == (5, 2)


@postgresql
def test_a_transition_waiting_for_the_row_with_no_mark_yet_reads_the_row_committed_meanwhile():
    """The fence raises (here: inserts) the mark in the scan, then FOR UPDATE waits for the row; the
    row it returns is the one committed while it waited, not the one its scan first saw."""
    obj = Account.objects.create()
    FencingMark.objects.filter(pk=object_key(obj)).delete()
    with pg_connect() as other, pg_connect() as watcher:
        other.autocommit = False
        other.execute("UPDATE testapp_account SET balance = balance + 100 WHERE id = %s", [obj.pk])
        join = in_background(lambda: Account.objects.get(pk=obj.pk).machine.deposit(amount=1))
        wait_for(
            lambda: watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                ["%dsm_redis_fence%"],
            ).fetchone(),
            "the transition to wait for the row lock",
        )
        other.commit()
        join()
    assert (fresh(obj).balance, fresh(obj).deposits) == (101, 1)
    assert FencingMark.objects.filter(pk=object_key(obj)).exists()


@postgresql
@pytest.mark.parametrize("committed_mark", [None, "999999:newer"], ids=["row-only", "newer-mark"])
def test_a_fencing_column_transition_waiting_for_the_row_judges_the_mark_committed_meanwhile(committed_mark):
    """The compiled statement waits for the row (FOR UPDATE) and judges the mark on the row it then
    returns: the one committed while it waited. A newer holder's mark refuses it (its lease was
    judged at ``object_lock``'s door: no re-anchoring); a write that left the mark is built upon."""
    from dsm_redis import StaleFencingToken, object_lock

    obj = FencedAccount.objects.create()
    obj.machine.deposit(amount=1)  # compiled
    with pg_connect() as other, pg_connect() as watcher, object_lock(obj, ttl=60):
        other.autocommit = False
        other.execute(
            "UPDATE testapp_fencedaccount SET balance = balance + 100, fencing_token = COALESCE(%s, fencing_token)"
            " WHERE id = %s",
            [committed_mark, obj.pk],
        )

        def commit_once_the_transition_waits() -> None:
            wait_for(
                lambda: watcher.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    ["%set_config('lock_timeout'%testapp_fencedaccount%"],
                ).fetchone(),
                "the transition to wait for the row lock",
            )
            other.commit()

        join = in_background(commit_once_the_transition_waits)
        if committed_mark is None:
            obj.machine.deposit(amount=1)
        else:
            with pytest.raises(StaleFencingToken):
                obj.machine.deposit(amount=1)
        join()
    row = fresh(obj)
    assert (row.balance, row.deposits) == ((102, 2) if committed_mark is None else (101, 1))
    assert (row.fencing_token == committed_mark) is (committed_mark is not None)


@postgresql
def test_a_primary_key_no_row_can_have_is_a_missing_row_as_for_the_orm():
    """Django (5.0+) compiles ``pk=<out of the column's range>`` to no query at all; ``.get()`` raises
    ``DoesNotExist``, and so must the compiled statement, compiling or compiled."""
    in_scan = mark_table("default").judge_in_scan(Token("testapp.account:1", 1, "owner"), None)
    _STATEMENTS.clear()
    for pk in (2**31, 1, 2**31):  # compiling on it; compiled, then given it
        with transaction.atomic(), pytest.raises(Account.DoesNotExist):
            locked_row(Account, "default", pk, MARK, in_scan)


def test_an_instance_with_deferred_fields_adopts_the_whole_row_read_under_the_lock(db_alias):
    obj = Account.objects.using(db_alias).create()
    deferred = Account.objects.using(db_alias).only("pk").get(pk=obj.pk)
    Account.objects.using(db_alias).filter(pk=obj.pk).update(balance=5)  # after the instance was read
    deferred.machine.deposit(amount=1)
    assert (fresh(obj).balance, deferred.balance, deferred.deposits) == (6, 6, 1)
    assert not deferred.get_deferred_fields()


def test_an_inherited_instance_with_deferred_fields_adopts_the_whole_row_read_under_the_lock(db_alias):
    lion = Lion.objects.using(db_alias).create()
    deferred = Lion.objects.using(db_alias).only("pk").get(pk=lion.pk)
    Cat.objects.using(db_alias).filter(pk=lion.pk).update(age=7)  # the parent's row, after the read
    deferred.state_machine.rip(reason="old")
    assert (fresh(lion).state, fresh(lion).cause, deferred.age, deferred.mane) == (DEAD, "old", 7, "short")
    assert not deferred.get_deferred_fields()
