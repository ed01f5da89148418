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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.db import DatabaseError, connections, models
from django.db.models import F, Model
from django.db.models.expressions import RawSQL

from .exceptions import LockTimeout, StaleFencingToken
from .keys import root_model

if TYPE_CHECKING:
    from .lease import Lease

__all__ = ["FencingTokenField", "fencing_column", "lock_row", "fence"]

logger = logging.getLogger("dsm_redis")
MARK = "dsm_redis_fence_mark"
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout expired


class FencingTokenField(models.CharField):
    """Opt a model into keeping its fencing mark in its own row instead of the shared table.

    ``fencing_token = FencingTokenField()`` on the model (then ``makemigrations``). The column
    holds ``"<token>:<lease owner>"`` of the latest committed transition. It is read by the same
    ``SELECT ... FOR UPDATE`` that reads the row and written by the same ``UPDATE`` that writes it:
    no fence table, no stored function, 4 statements per transition on every database. The cost:
    a column and a migration on your table, and writes that bypass dsm_redis must leave it alone.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 100)
        kwargs.setdefault("default", "")
        kwargs.setdefault("editable", False)
        super().__init__(*args, **kwargs)

    def pre_save(self, model_instance: Model, add: bool) -> Any:
        value = getattr(model_instance, self.attname)
        if add or model_instance.__dict__.pop(_STAMP, None) == value:
            return value  # an insert, or the mark a transition just judged (once)
        # Any other save() keeps the database's mark: an instance loaded before the latest
        # transition must not write an older mark back and let a stale holder through.
        return F(self.attname)


_STAMP = "_dsm_redis_fencing_stamp"


@functools.cache
def fencing_column(model: type[Model]) -> str | None:
    """The attname of the ``FencingTokenField`` of ``model``'s row, if its root model opted in.

    The root's: a proxy or a multi-table-inheritance child shares its root's key and mark.
    """
    for f in root_model(model)._meta.concrete_fields:
        if isinstance(f, FencingTokenField):
            return f.attname
    return None


def lock_row(
    instance: Model, using: str, lease: Lease, row_lock_timeout: float | None, *, in_caller_transaction: bool
) -> Model:
    """Lock the row, judge the lease's token, and return the row as it is now (a new instance)."""
    postgres = connections[using].vendor == "postgresql"
    timeout = None if row_lock_timeout is None or not postgres else f"{max(1, int(row_lock_timeout * 1000))}ms"
    previous_timeout = None
    if timeout is not None and in_caller_transaction:
        # set_config(..., true) lasts until the end of the *transaction*, not of our savepoint:
        # put the caller's own lock_timeout back afterwards (a rollback to our savepoint undoes it).
        previous_timeout = _execute(using, "SELECT current_setting('lock_timeout')", [])
    try:
        fresh = _lock_and_judge(instance, using, lease, timeout)
    except DatabaseError as exc:
        cause = exc.__cause__
        if (getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)) == _LOCK_NOT_AVAILABLE:
            raise LockTimeout(f"row lock on {lease.key} not obtained within {row_lock_timeout}s") from exc
        raise
    if previous_timeout is not None:
        _execute(using, "SELECT set_config('lock_timeout', %s, true)", [previous_timeout])
    return fresh


def _lock_and_judge(instance: Model, using: str, lease: Lease, timeout: str | None) -> Model:
    model = type(instance)
    postgres = connections[using].vendor == "postgresql"
    column = fencing_column(model)
    rows = model._base_manager.db_manager(using).select_for_update().filter(pk=instance.pk)
    root = root_model(model)
    if root is not model:
        # Multi-table inheritance: lock the parent row first, the order a plain save() of the
        # child writes in, so a transition and a save() cannot deadlock.
        root_rows = root._base_manager.db_manager(using).select_for_update().filter(pk=instance.pk)
        if column is None and postgres:
            result = root_rows.annotate(**{MARK: _pg_fence(lease, timeout)}).values_list(MARK, flat=True).get()
            _judge(_pg_verdict(result), lease, lambda: _table_verdict(lease, using))
            return rows.get()  # judged; the parent row is locked, the child's lock cannot wait long
        _bounded(root_rows, timeout).values_list("pk", flat=True).get()
        timeout = None
    if column is not None:
        fresh = _bounded(rows, timeout).get()
        prev = _parse(getattr(fresh, column))
        _judge(_column_verdict(prev, lease), lease, lambda: _column_verdict(prev, lease))
        # Written by the transition's own UPDATE (protocol._write always includes it); the stamp
        # lets that one save() write it (FencingTokenField.pre_save).
        mark = f"{lease.fencing_token}:{lease.owner}"
        setattr(fresh, column, mark)
        instance.__dict__[_STAMP] = mark
        return fresh
    if postgres:
        # One round trip: the function bounds the row-lock wait (SET LOCAL lock_timeout) and
        # judges the mark; it runs in the scan, before FOR UPDATE waits for the row.
        fresh = rows.annotate(**{MARK: _pg_fence(lease, timeout)}).get()
        _judge(_pg_verdict(getattr(fresh, MARK)), lease, lambda: _table_verdict(lease, using))
        return fresh
    # Elsewhere the mark goes first: on SQLite it is the write that takes the database's write
    # lock at the start, which avoids a read-to-write lock upgrade deadlock.
    fence(lease, using)
    return rows.get()


def fence(lease: Lease, using: str) -> None:
    """Judge ``lease``'s token in the current transaction of ``using`` (raise the mark or refuse)."""
    model, pk = _object_of(lease.key)
    column = fencing_column(model) if model is not None else None
    if column is None:
        _judge(_table_verdict(lease, using), lease, lambda: _table_verdict(lease, using))
        return
    assert model is not None
    rows = model._base_manager.db_manager(using).filter(pk=pk)
    prev = _parse(rows.select_for_update().values_list(column, flat=True).get())
    _judge(_column_verdict(prev, lease), lease, lambda: _column_verdict(prev, lease))
    rows.update(**{column: f"{lease.fencing_token}:{lease.owner}"})


# -- verdicts: None when the token is accepted, else the mark that refused it --------------------
#
# A token is accepted when it is higher than the mark, or equal to it *and from the same lease*
# (a lease writing in several transactions). An equal token from another lease is refused: after
# Redis loses its counter, a re-anchored lease can be minted a token that a lease from before the
# loss still holds, and the two must not both be accepted.


def _judge(verdict: int | None, lease: Lease, rejudge: Callable[[], int | None]) -> None:
    if verdict is None:
        return
    stale = lease.fencing_token
    # The database has seen this token or a newer one from another lease. Either our lease ran out
    # and another holder committed (we must not write), or Redis lost its counter and minted us a
    # low token while we really do hold the lease: Redis alone can tell which, atomically with
    # minting the replacement token.
    if lease.reanchor(verdict) and rejudge() is None:
        return
    logger.warning("stale fencing token %s for %s refused: the database holds %s", stale, lease.key, verdict)
    raise StaleFencingToken(
        f"fencing token {stale} for {lease.key} is not newer than the committed mark {verdict}: "
        f"another holder has written since this lease was granted",
        token=stale,
        mark=verdict,
    )


def _column_verdict(prev: tuple[int, str], lease: Lease) -> int | None:
    token, owner = prev
    if lease.fencing_token > token or (lease.fencing_token == token and lease.owner == owner):
        return None
    return token


def _pg_fence(lease: Lease, timeout: str | None) -> RawSQL:
    return RawSQL("dsm_redis_fence(%s, %s, %s, %s)", (lease.key, lease.fencing_token, lease.owner, timeout))


def _pg_verdict(result: int) -> int | None:
    # dsm_redis_fence returns the token when it accepts it, minus the mark when it refuses.
    return None if result > 0 else -result


def _table_verdict(lease: Lease, using: str) -> int | None:
    connection = connections[using]
    key, token, owner = lease.key, lease.fencing_token, lease.owner
    if connection.vendor == "postgresql":
        return _pg_verdict(_execute(using, "SELECT dsm_redis_fence(%s, %s, %s, NULL)", [key, token, owner]))
    if connection.vendor == "sqlite":
        accepted = _execute(
            using,
            "INSERT INTO dsm_redis_fencing_mark (object_key, token, owner) VALUES (%s, %s, %s) "
            "ON CONFLICT (object_key) DO UPDATE SET token = excluded.token, owner = excluded.owner "
            "WHERE dsm_redis_fencing_mark.token < excluded.token "
            "OR (dsm_redis_fencing_mark.token = excluded.token AND dsm_redis_fencing_mark.owner = excluded.owner) "
            "RETURNING token",
            [key, token, owner],
        )
        if accepted is not None:
            return None
        return int(_execute(using, "SELECT token FROM dsm_redis_fencing_mark WHERE object_key = %s", [key]))
    return _portable_verdict(lease, using)


def _portable_verdict(lease: Lease, using: str) -> int | None:
    from .models import FencingMark

    marks = FencingMark.objects.using(using)
    mark: Any = marks.select_for_update().filter(pk=lease.key).first()
    if mark is None:
        marks.create(object_key=lease.key, token=lease.fencing_token, owner=lease.owner)
        return None
    verdict = _column_verdict((mark.token, mark.owner), lease)
    if verdict is None:
        marks.filter(pk=lease.key).update(token=lease.fencing_token, owner=lease.owner)
    return verdict


# -- helpers ----------------------------------------------------------------------------------------


def _execute(using: str, sql: str, params: list[Any]) -> Any:
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else row[0]


def _bounded(rows: Any, timeout: str | None) -> Any:
    if timeout is None:
        return rows
    # set_config runs in the scan, before FOR UPDATE waits: the wait is bounded.
    return rows.annotate(**{MARK: RawSQL("set_config('lock_timeout', %s, true)", (timeout,))})


def _parse(value: str | None) -> tuple[int, str]:
    token, _, owner = (value or "0:").partition(":")
    return int(token or 0), owner


def _object_of(key: str) -> tuple[type[Model] | None, Any]:
    label, _, pk = key.partition(":")
    try:
        model = apps.get_model(label)
    except LookupError:
        return None, None
    return model, model._meta.pk.to_python(pk)
