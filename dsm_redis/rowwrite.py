"""The transition's UPDATE: ``save(update_fields=...)``, with its statement compiled once per
(model, database, columns, which of them are NULL).

Owns one thing: sending what ``instance.save(using=..., update_fields=...)`` sends for a saved
object, without building and compiling an update query per transition (``fence.save_judged``
decides *what* is written; ``rowlock.py`` reads the row this writes).

Contract: the same as that ``save()`` — ``pre_save`` and ``post_save`` with the same arguments,
each field's ``pre_save`` (``auto_now``), the related-object checks, the ORM's own SQL and bound
parameters (checked against the ORM when a statement is compiled; NULL written into the SQL, the
parameters a tuple), "did not affect any rows" when the row is gone, ``save()``'s ``ValueError``
when the primary key is unset, ``_state`` set as after a save. Where that cannot be guaranteed,
``save()`` itself runs: a model that overrides ``save`` (or the methods it calls; checked per call,
so a method patched in later runs too), a custom base manager, multi-table inheritance,
``select_on_save``, a composite or generated field, an instance still being added (``save()`` may
insert it); and, per call, a value that is an expression (``F()``, a ``FencingTokenField`` outside
its judged write), a primary key no row can have, or a statement the ORM compiled to another shape.
"""

from __future__ import annotations

import functools
import operator
import sys
from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db import DatabaseError, connections, transaction
from django.db.models import Model
from django.db.models.signals import post_save, pre_save
from django.db.models.sql import UpdateQuery

__all__: list[str] = []

# Model methods that save() runs on the way to its UPDATE: overridden, the model keeps save().
_SAVE_PATH = ("save", "save_base", "_save_table", "_do_update", "_save_parents", "_prepare_related_fields_for_save")
# Django's own, compared on every call, not once per model: a method patched in later (on the
# model or on Model, as mock.patch.object does in a test suite) must run from then on. One patched
# on Model before this module was imported is not Django's code: it never matches (save() runs).
_DJANGOS = tuple(
    method if getattr(method, "__globals__", None) is vars(sys.modules[Model.__module__]) else object()
    for method in (getattr(Model, name) for name in _SAVE_PATH)
)


_save_path_of = operator.attrgetter(*_SAVE_PATH)


def _saves_as_django(model: type[Model]) -> bool:
    return bool(_save_path_of(model) == _DJANGOS)  # functions compare by identity


class _Plan:
    """What is fixed per model: its fields to write, and its compiled statements."""

    __slots__ = ("model", "names", "non_pks", "pk_field", "related", "statements")

    def __init__(self, model: type[Model]) -> None:
        self.model: Any = model
        meta = model._meta
        self.pk_field = meta.pk
        self.non_pks = [f for f in meta.local_concrete_fields if not f.primary_key]
        # What save() accepts in update_fields (a primary key, say, it refuses: its error is kept).
        self.names = frozenset(n for f in self.non_pks for n in (f.name, f.attname))
        self.related = any(f.is_relation for f in meta.concrete_fields)
        # (alias, vendor, columns, which are NULL) -> SQL, or None where the ORM compiled something else.
        self.statements: dict[tuple[str, str, tuple[str, ...], tuple[bool, ...]], str | None] = {}


@functools.cache
def _plan(model: type[Model]) -> _Plan | None:
    concrete: Any = model._meta.concrete_model
    meta = concrete._meta
    if not _saves_as_django(model):
        return None  # the model's own save() must run
    if meta.parents or meta.base_manager_name is not None or meta.select_on_save or meta.auto_created:
        return None  # several tables; a manager that may filter; a SELECT first; an m2m row
    if len(getattr(meta, "pk_fields", [meta.pk])) != 1 or meta.pk.is_relation:
        return None
    if any(getattr(f, "generated", False) or hasattr(f, "get_placeholder") for f in meta.local_concrete_fields):
        return None  # refreshed after the write; a placeholder other than %s
    return _Plan(concrete)


def save_fields(instance: Model, using: str, update_fields: list[str]) -> None:
    """``instance.save(using=using, update_fields=update_fields)`` for a saved object."""
    plan = _plan(type(instance))
    fields = frozenset(update_fields)
    if (
        plan is None
        or not fields  # save() returns at once, unsignalled (after its related-object checks)
        or not fields <= plan.names
        or not _saves_as_django(type(instance))
        or instance._state.adding  # not saved yet: save() may INSERT it (a primary key with a default)
    ):
        instance.save(using=using, update_fields=update_fields)
        return
    if plan.related:
        # save()'s own check: an unsaved related object must not be written as a NULL key.
        instance._prepare_related_fields_for_save(operation_name="save")  # type: ignore[attr-defined]
    origin = type(instance)
    pre_save.send(sender=origin, instance=instance, raw=False, using=using, update_fields=fields)
    with transaction.mark_for_rollback_on_error(using=using):
        pk = _pk_on_save(instance, plan.pk_field)
        columns = [f for f in plan.non_pks if f.name in fields or f.attname in fields]
        values = [f.pre_save(instance, False) for f in columns]
        if not _update(plan, using, pk, columns, values):
            raise DatabaseError("Save with update_fields did not affect any rows.")
    instance._state.db = using
    instance._state.adding = False
    post_save.send(sender=origin, instance=instance, created=False, update_fields=fields, raw=False, using=using)


def _pk_on_save(instance: Model, field: Any) -> Any:
    """The primary key to UPDATE, as ``_save_table`` takes it: an unset one (the object deleted, a
    ``pre_save`` receiver) gets the field's default, or there is no UPDATE "WHERE pk IS NULL"."""
    pk = getattr(instance, field.attname)
    if pk is None:
        pk = field.get_pk_value_on_save(instance)
        setattr(instance, field.attname, pk)
        if pk is None:
            raise ValueError("Cannot force an update in save() with no primary key.")
    return pk


def _update(plan: _Plan, using: str, pk: Any, columns: list[Any], values: list[Any]) -> bool:
    if not columns:
        return True  # as save() does: update_fields naming no column of this table
    if any(hasattr(v, "resolve_expression") or hasattr(v, "prepare_database_save") for v in values):
        return _orm_update(plan, using, pk, columns, values)
    connection = connections[using]
    params = [f.get_db_prep_save(v, connection=connection) for f, v in zip(columns, values, strict=True)]
    if any(hasattr(p, "as_sql") for p in params):
        return _orm_update(plan, using, pk, columns, values)
    # The ORM writes NULL into the SQL, not as a parameter: which columns are NULL is the statement's.
    nulls = tuple(p is None for p in params)
    if any(nulls):
        params = [p for p in params if p is not None]
    field = plan.pk_field
    params.append(field.get_db_prep_value(field.get_prep_value(pk), connection, prepared=True))
    cache_key = (using, connection.vendor, tuple(f.attname for f in columns), nulls)
    try:
        sql = plan.statements[cache_key]
    except KeyError:
        try:
            sql = plan.statements[cache_key] = _compile(plan, using, pk, columns, values, params)
        except EmptyResultSet:  # a key no row can have (Django 5): the ORM's "no query"; not cached
            return _orm_update(plan, using, pk, columns, values)
    if sql is None:
        return _orm_update(plan, using, pk, columns, values)
    with connection.cursor() as cursor:
        try:
            cursor.execute(sql, tuple(params))  # as the ORM passes them: execute wrappers see a tuple
        except OverflowError:
            # A key beyond the driver's integers (SQLite): Django 5 compiles it to no query and
            # reports no row, Django 4.2 sends it and fails as here. The ORM does either.
            return _orm_update(plan, using, pk, columns, values)
        return bool(cursor.rowcount > 0)


def _rows(plan: _Plan, using: str, pk: Any) -> Any:
    # As _save_table filters them: the concrete model's base manager.
    return plan.model._base_manager.using(using).filter(pk=pk)


def _orm_update(plan: _Plan, using: str, pk: Any, columns: list[Any], values: list[Any]) -> bool:
    return bool(_rows(plan, using, pk)._update([(f, None, v) for f, v in zip(columns, values, strict=True)]) > 0)


def _compile(plan: _Plan, using: str, pk: Any, columns: list[Any], values: list[Any], params: list[Any]) -> str | None:
    """The ORM's SQL for this UPDATE, if it binds exactly ``params``; else None (the ORM path)."""
    query: Any = _rows(plan, using, pk).query.chain(UpdateQuery)
    query.add_update_fields([(f, None, v) for f, v in zip(columns, values, strict=True)])
    query.annotations = {}
    if query.related_updates:
        return None
    sql, orm_params = query.get_compiler(using).as_sql()
    if len(orm_params) != len(params) or not all(map(_same, orm_params, params)):
        return None
    return str(sql)


def _same(orm: Any, ours: Any) -> bool:
    # A type without an equality of its own (a driver's wrapper: psycopg's Jsonb) was made by the
    # same get_db_prep_save from the same value: its type is what could differ.
    return type(orm) is type(ours) and (type(ours).__eq__ is object.__eq__ or bool(orm == ours))
