"""Fencing: the database judges every write made under a lease.

Safety contract: inside one transaction, ``lock_row`` locks the object's row (``SELECT ... FOR
UPDATE``) and raises the object's fencing mark (table ``dsm_redis_fencing_mark``) to the lease's
token, or refuses with ``StaleFencingToken`` when the mark is already higher — a newer lease has
committed, so this holder's lease ran out while it was paused. The mark commits or rolls back with
the row, so "the highest token committed per object" is exactly what the table holds. A refused
holder that Redis still recognises as the owner means Redis lost the counter (restart without
persistence, failover, flush): the lease is re-anchored above the mark and judged once more.

Limits: only writes made through dsm_redis (or after ``Lease.fence()``) are judged; a side effect
that writes to systems outside this database must pass ``transition.fencing_token`` on itself.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

from django.apps import apps
from django.db import DatabaseError, connections, models
from django.db.models import Model
from django.db.models.expressions import RawSQL

from .exceptions import LockTimeout, StaleFencingToken

if TYPE_CHECKING:
    from .lease import Lease

__all__ = ["FencingTokenField", "fencing_column", "lock_row", "fence"]

logger = logging.getLogger("dsm_redis")
MARK = "dsm_redis_fence_mark"
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout expired


class FencingTokenField(models.BigIntegerField):
    """Opt a model into keeping its fencing mark in its own row instead of the shared table.

    ``fencing_token = FencingTokenField()`` on the model (then ``makemigrations``). The mark is
    read by the same ``SELECT ... FOR UPDATE`` that reads the row and written by the same
    ``UPDATE`` that writes it: no fence table, no stored function, 4 statements per transition on
    every database. The cost: a column and a migration on your table, and writes to the row that
    bypass dsm_redis must leave the column alone.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("default", 0)
        kwargs.setdefault("editable", False)
        super().__init__(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def fencing_column(model: type[Model]) -> str | None:
    """The attname of the model's ``FencingTokenField``, if it opted into one."""
    for f in model._meta.concrete_fields:
        if isinstance(f, FencingTokenField):
            return f.attname
    return None


def lock_row(instance: Model, using: str, lease: Lease, row_lock_timeout: float | None) -> Model:
    """Lock the row, judge the lease's token, and return the row as it is now (a new instance)."""
    model = type(instance)
    rows = model._base_manager.db_manager(using).select_for_update().filter(pk=instance.pk)
    vendor = connections[using].vendor
    timeout = None if row_lock_timeout is None else f"{max(1, int(row_lock_timeout * 1000))}ms"
    column = fencing_column(model)
    try:
        if column is not None:
            if vendor == "postgresql" and timeout is not None:
                # set_config runs in the scan, before FOR UPDATE waits: the wait is bounded.
                rows = rows.annotate(**{MARK: RawSQL("set_config('lock_timeout', %s, true)", (timeout,))})
            fresh = rows.get()
            mark = getattr(fresh, column) or 0
            _judge(mark, lease, lambda: mark)
            # Written by the transition's own UPDATE (protocol._write always includes it).
            setattr(fresh, column, lease.fencing_token)
            return fresh
        if vendor == "postgresql":
            # One round trip: the function bounds the row-lock wait (SET LOCAL lock_timeout) and
            # upserts the mark; it runs in the scan, before FOR UPDATE waits for the row.
            fresh = rows.annotate(
                **{MARK: RawSQL("dsm_redis_fence(%s, %s, %s)", (lease.key, lease.fencing_token, timeout))}
            ).get()
            _judge(getattr(fresh, MARK), lease, lambda: _upsert(lease.key, lease.fencing_token, using))
            return fresh
        # Elsewhere the mark's upsert goes first: on SQLite it is the write that takes the
        # database's write lock at the start, which avoids a read-to-write lock upgrade deadlock.
        fence(lease, using)
        return rows.get()
    except DatabaseError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
            raise LockTimeout(f"row lock on {lease.key} not obtained within {row_lock_timeout}s") from exc
        raise


def fence(lease: Lease, using: str) -> None:
    """Judge ``lease``'s token in the current transaction of ``using`` (raise the mark or refuse)."""
    model, pk = _object_of(lease.key)
    column = fencing_column(model) if model is not None else None
    if column is None:
        _judge(_upsert(lease.key, lease.fencing_token, using), lease, lambda: _upsert(lease.key, lease.fencing_token, using))
        return
    assert model is not None
    rows = model._base_manager.db_manager(using).filter(pk=pk)
    mark = rows.select_for_update().values_list(column, flat=True).get() or 0
    _judge(mark, lease, lambda: mark)
    rows.update(**{column: lease.fencing_token})


def _object_of(key: str) -> tuple[type[Model] | None, Any]:
    label, _, pk = key.partition(":")
    try:
        model = apps.get_model(label)
    except LookupError:
        return None, None
    return model, model._meta.pk.to_python(pk)


def _judge(mark: int, lease: Lease, rejudge: Callable[[], int]) -> None:
    if mark <= lease.fencing_token:
        return
    stale = lease.fencing_token
    # The database has seen a newer token. Either our lease ran out and another holder committed
    # (we must not write), or Redis lost its counter and re-minted low tokens while we really do
    # hold the lease: Redis alone can tell which, atomically with minting the replacement token.
    if lease.reanchor(mark) and rejudge() <= lease.fencing_token:
        return
    logger.warning("stale fencing token %s for %s refused: the database holds %s", stale, lease.key, mark)
    raise StaleFencingToken(
        f"fencing token {stale} for {lease.key} is older than the committed mark {mark}: "
        f"another holder has written since this lease was granted",
        token=stale,
        mark=mark,
    )


def _upsert(key: str, token: int, using: str) -> int:
    """Raise the mark to ``token`` unless it is higher; return the mark after the call."""
    connection = connections[using]
    if connection.vendor == "postgresql":
        sql, params = "SELECT dsm_redis_fence(%s, %s, NULL)", [key, token]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return int(cursor.fetchone()[0])
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO dsm_redis_fencing_mark (object_key, token) VALUES (%s, %s) "
                "ON CONFLICT (object_key) DO UPDATE SET token = excluded.token "
                "WHERE dsm_redis_fencing_mark.token <= excluded.token RETURNING token",
                [key, token],
            )
            row = cursor.fetchone()
            if row is not None:
                return int(row[0])
            cursor.execute("SELECT token FROM dsm_redis_fencing_mark WHERE object_key = %s", [key])
            return int(cursor.fetchone()[0])
    return _upsert_portable(key, token, using)


def _upsert_portable(key: str, token: int, using: str) -> int:
    from .models import FencingMark

    marks = FencingMark.objects.using(using).select_for_update()
    mark: Any = marks.filter(pk=key).first()
    if mark is None:
        FencingMark.objects.using(using).create(object_key=key, token=token)
        return token
    if mark.token <= token:
        marks.filter(pk=key).update(token=token)
        return token
    return int(mark.token)
