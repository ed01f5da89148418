"""The transition's row-lock statement, compiled once per (model, database, expression in the scan)
and run on a cursor.

Owns one thing: what ``row_for_update(model, using, pk).annotate(<alias>=<the fence in the scan>)
.get()`` sends and how its row becomes an instance, without building a queryset per transition
(``fence.py`` decides *what* is judged; this module only sends the ORM's own statement faster).

Contract: the SQL is exactly the ORM's (same columns, ``LIMIT``/``FOR UPDATE``, the fence function in
the select list with the same bound, the same bound parameters: checked when it is compiled), and the
row is turned into an instance as the ORM's iterable does (its converters, ``Model.from_db``, the
annotation set on it). Where that cannot be guaranteed the ORM path is kept: a custom base manager
(it may filter per call), a relation as primary key, a compiled query of another shape.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db import connections
from django.db.models import Model
from django.db.models.expressions import RawSQL
from django.db.models.query import MAX_GET_RESULTS

__all__: list[str] = []


class _Statement:
    """What ``rows.annotate(<alias>=<the fence in the scan>).get()`` sends, compiled once, and how its row
    becomes an instance: the ORM's own SQL (same columns, ``FOR UPDATE``, the fence function in the
    select list with the same bound), run on a cursor; the row turned into an instance as the ORM's
    iterable does (its converters, ``Model.from_db``, the annotation set on it)."""

    __slots__ = ("sql", "pk_field", "fields", "init_list", "converters", "mark_at")

    def __init__(self, sql: str, pk_field: Any, fields: slice, init_list: list[str], converters: Any, mark_at: int):
        self.sql, self.pk_field, self.fields = sql, pk_field, fields
        self.init_list, self.converters, self.mark_at = init_list, converters, mark_at

    def pk_param(self, pk: Any, connection: Any) -> Any:
        # What the ORM's ``pk=`` exact lookup binds.
        field = self.pk_field
        return field.get_db_prep_value(field.get_prep_value(pk), connection, prepared=True)


# (model, alias, vendor, the in-scan expression's SQL) -> its statement, or None where the ORM path
# is kept (a custom base manager, a relation as primary key, a compiled query not of the expected shape).
_STATEMENTS: dict[tuple[type[Model], str, str, str], _Statement | None] = {}
_UNCOMPILED: Any = object()


def row_for_update(model: type[Model], using: str, pk: Any) -> Any:
    return model._base_manager.db_manager(using).select_for_update().filter(pk=pk)


def locked_row(model: type[Model], using: str, pk: Any, alias: str, in_scan: RawSQL) -> Model:
    """``row_for_update(model, using, pk).annotate(**{alias: in_scan}).get()``, compiled once."""
    connection = connections[using]
    cache_key = (model, using, connection.vendor, in_scan.sql)
    statement = _STATEMENTS.get(cache_key, _UNCOMPILED)
    if statement is _UNCOMPILED:
        try:
            statement = _STATEMENTS[cache_key] = _compile(row_for_update(model, using, pk), using, pk, alias, in_scan)
        except EmptyResultSet:
            # A key no row can have (out of the column's range): Django sends no query, and get()
            # finds nothing. Compiled with another key next time.
            statement = None
    if statement is None:
        return row_for_update(model, using, pk).annotate(**{alias: in_scan}).get()
    with connection.cursor() as cursor:
        cursor.execute(statement.sql, (*in_scan.params, statement.pk_param(pk, connection)))
        found = cursor.fetchone()
    if found is None:
        raise model.DoesNotExist(  # type: ignore[attr-defined]
            f"{model._meta.object_name} matching query does not exist."
        )
    row = list(found)
    for at, (converters, expression) in statement.converters:
        value = row[at]
        for converter in converters:
            value = converter(value, expression, connection)
        row[at] = value
    fresh = model.from_db(using, statement.init_list, row[statement.fields])
    setattr(fresh, alias, row[statement.mark_at])
    return fresh


def _compile(rows: Any, using: str, pk: Any, alias: str, in_scan: RawSQL) -> _Statement | None:
    model = rows.model
    pk_field = model._meta.pk
    if model._meta.base_manager_name is not None or pk_field.is_relation:
        return None  # a manager may filter per call; a relation's key is prepared by its target
    clone = rows.annotate(**{alias: in_scan})
    # As QuerySet.get() prepares it.
    if clone.query.can_filter() and not clone.query.distinct_fields:
        clone = clone.order_by()
    if connections[using].features.supports_select_for_update_with_limit:
        clone.query.set_limits(high=MAX_GET_RESULTS)
    compiler = clone.query.get_compiler(using)
    sql, params = compiler.as_sql()
    statement = _Statement(sql, pk_field, slice(0), [], [], -1)
    expected = (*in_scan.params, statement.pk_param(pk, compiler.connection))
    klass_info = compiler.klass_info
    if tuple(params) != expected or not klass_info or klass_info.get("related_klass_infos"):
        return None
    select = compiler.select
    start, end = klass_info["select_fields"][0], klass_info["select_fields"][-1] + 1
    statement.fields = slice(start, end)
    statement.init_list = [column[0].target.attname for column in select[start:end]]
    statement.converters = list(compiler.get_converters([column[0] for column in select]).items())
    statement.mark_at = compiler.annotation_col_map[alias]
    return statement
