"""Fencing: the database judges every write made under a lease.

Safety contract:
- A transition's ``lock_row`` locks the object's row (``SELECT ... FOR UPDATE``) and, in the same
  round trip, raises the object's fencing mark (table ``dsm_redis_fencing_mark``, or the model's own
  ``FencingTokenField``) to the lease's token, or refuses with ``StaleFencingToken`` when the mark
  is already higher (a newer lease has committed). The mark commits or rolls back with the row, so
  "the highest token committed per object" is exactly what it holds, and a judged holder keeps the
  mark (or the row) locked until it commits: a newer holder's judgement waits for it.
- Re-anchoring: when a token is refused but Redis confirms the holder still owns the lease, Redis
  lost its counter (restart without persistence, flush, eviction) and a token above the mark is
  minted. That is sound only where nothing has been read under the lease before the judgement:
  the *first* judgement of a lease, made by a transition's own ``SELECT ... FOR UPDATE`` (it
  judges and reads in one statement) or by ``barrier`` (run when a lease that spans several
  transactions is entered, before the holder reads). After a lease was accepted once, its token is
  anchored; a later refusal means another holder wrote in between, and it stands. ``fence`` —
  ``Lease.fence()`` before hand-written writes — never re-anchors: a holder whose key Redis
  brought back after another holder committed (a lagging replica promoted, an AOF restore) wrote
  from reads older than that commit, and is refused.
- ``barrier``: entering ``object_lock`` (or a ``locked_task`` without ``atomic``) judges the token
  in a transaction of its own and commits it, waiting (bounded) for an older holder that is still
  inside a judged transaction. Afterwards every older holder has either committed — and the new
  holder's reads see it — or is refused: nothing read under the new lease can be overwritten by a
  late commit of an older one.
- Every row-lock wait started here is bounded by ``ROW_LOCK_TIMEOUT`` and raises ``LockTimeout``
  (PostgreSQL's ``lock_timeout``; on SQLite the connection's busy timeout bounds it, and the
  "database is locked" error it ends in is raised as ``LockTimeout`` too).

Shape: the fence judges a ``Token`` value (``token.py``) and knows nothing of leases. Where the mark
is kept and how a database judges against it is one strategy per database (``marks.py``), chosen
once per alias; the row-lock statement itself is compiled once per model, database and expression
in its scan (``rowlock.py``). Re-anchoring is the holder's business: at a lease's first judgement it passes a
``reanchor`` callable (the mark that refused it -> a newer token Redis minted, or ``None``), and
every judgement returns the token it accepted, which the holder adopts. Kept whole: the row lock,
the bound on its wait and the judgement are one sequence of statements, read best in one place.

Limits: only writes made through dsm_redis (or after ``Lease.fence()``) are judged; a side effect
that writes to systems outside this database must pass ``transition.fencing_token`` on itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.db import DatabaseError, OperationalError, connections, models, transaction
from django.db.models import F, Model
from django.db.models.expressions import RawSQL

from . import telemetry
from .exceptions import LockTimeout, StaleFencingToken
from .keys import object_of, root_model
from .marks import MarkTable, column_value, column_verdict, execute, mark_table
from .rowlock import locked_row, row_for_update
from .rowwrite import save_fields
from .token import Token

__all__ = ["FencingTokenField"]

logger = logging.getLogger("dsm_redis")
MARK = "dsm_redis_fence_mark"
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout expired
# SQLite: the busy timeout expired (or, with a shared cache, another connection holds the table).
_SQLITE_BUSY = ("database is locked", "database table is locked")

# Given the mark that refused a token: the newer token Redis minted once it confirmed the holder
# still owns the lease, or None. Passed only at a lease's first judgement (module docstring).
Reanchor = Callable[[int], "Token | None"]


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
        if add or _JUDGED_WRITE.get() == (id(model_instance), value):
            return value  # an insert, or the judged write of a transition (save_judged)
        # Any other save() keeps the database's mark: an instance loaded before the latest
        # transition must not write an older mark back and let a stale holder through.
        return F(self.attname)


# Set only for the duration of the transition's own UPDATE (save_judged): which instance may write
# which mark. Scoped, not a flag on the instance: a side effect's save(), refresh_from_db() or a
# rolled-back savepoint cannot consume or alter it, so the committed row always carries the mark.
_JUDGED_WRITE: ContextVar[tuple[int, str] | None] = ContextVar("dsm_redis_judged_write", default=None)


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
    instance: Model,
    using: str,
    token: Token,
    row_lock_timeout: float | None,
    *,
    in_caller_transaction: bool,
    reanchor: Reanchor | None = None,
) -> tuple[Model, Token]:
    """Lock the row, judge ``token``, and return the row as it is now (a new instance) with the
    token accepted (``token``, or the re-anchored one)."""
    with _bounded_wait(using, token.key, row_lock_timeout, in_caller_transaction) as timeout:
        return _lock_and_judge(instance, using, token, timeout, reanchor)


@contextmanager
def _bounded_wait(
    using: str, key: str, row_lock_timeout: float | None, in_caller_transaction: bool
) -> Iterator[str | None]:
    """Yield PostgreSQL's ``lock_timeout`` value for the statements inside; a lock wait that ends
    at the bound (PostgreSQL's lock_timeout, SQLite's busy timeout) is ``LockTimeout``."""
    timeout = mark_table(using).lock_timeout(row_lock_timeout)
    previous_timeout = None
    if timeout is not None and in_caller_transaction:
        # set_config(..., true) lasts until the end of the *transaction*, not of our savepoint:
        # put the caller's own lock_timeout back afterwards (a rollback to our savepoint undoes it).
        previous_timeout = execute(using, "SELECT current_setting('lock_timeout')", [])
    try:
        yield timeout
    except DatabaseError as exc:
        # The transaction is aborted (PostgreSQL): the savepoint rollback that follows undoes our
        # setting, or the whole transaction ends; no statement can run here.
        cause = exc.__cause__
        pg_timeout = (getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)) == _LOCK_NOT_AVAILABLE
        sqlite_busy = isinstance(exc, OperationalError) and str(exc) in _SQLITE_BUSY
        if pg_timeout or sqlite_busy:
            raise LockTimeout(f"row lock on {key} not obtained within {row_lock_timeout}s") from exc
        raise
    except BaseException:
        # A refusal (StaleFencingToken) leaves the transaction usable: a caller that catches it and
        # carries on must get its own lock_timeout back, not ours. (After an interrupt mid-statement
        # the connection may be unusable: the original exception is the one to report.)
        with contextlib.suppress(DatabaseError):
            _restore_lock_timeout(using, previous_timeout)
        raise
    _restore_lock_timeout(using, previous_timeout)


def _restore_lock_timeout(using: str, previous_timeout: str | None) -> None:
    if previous_timeout is not None:
        execute(using, "SELECT set_config('lock_timeout', %s, true)", [previous_timeout])


@contextmanager
def bounded_row_locks(using: str, key: str, row_lock_timeout: float | None) -> Iterator[None]:
    """Bound every lock wait of the statements inside (in the current transaction) by
    ``row_lock_timeout``, raising ``LockTimeout``; the transaction's own setting is put back."""
    with _bounded_wait(using, key, row_lock_timeout, in_caller_transaction=True) as timeout:
        if timeout is not None:
            execute(using, "SELECT set_config('lock_timeout', %s, true)", [timeout])
        yield


def _lock_and_judge(
    instance: Model, using: str, token: Token, timeout: str | None, reanchor: Reanchor | None
) -> tuple[Model, Token]:
    model = type(instance)
    table = mark_table(using)
    column = fencing_column(model)
    root = root_model(model)
    if root is model and column is None:
        in_scan = table.judge_in_scan(token, timeout)
        if in_scan is not None:
            # One round trip: the function bounds the row-lock wait (SET LOCAL lock_timeout) and
            # judges the mark; it runs in the scan, before FOR UPDATE waits for the row (marks.py).
            fresh = locked_row(model, using, instance.pk, MARK, in_scan)
            verdict = table.scan_verdict(getattr(fresh, MARK))
            return fresh, _accepted(verdict, token, reanchor, _table_judge(table, using, None))
    if root is model and column is not None and timeout is not None and table.row_locks:
        # _bounded(row_for_update(...), timeout).get(), compiled once: no queryset per transition
        # (rows lock here: no write lock to take first, _take_write_lock).
        fresh = locked_row(model, using, instance.pk, MARK, _bound_in_scan(timeout))
        return _judged_on_column(fresh, column, token, reanchor)
    rows = row_for_update(model, using, instance.pk)
    if root is not model:
        # Multi-table inheritance: lock the parent row first, the order a plain save() of the
        # child writes in, so a transition and a save() cannot deadlock.
        root_rows = row_for_update(root, using, instance.pk)
        in_scan = table.judge_in_scan(token, timeout) if column is None else None
        if in_scan is not None:
            result = root_rows.annotate(**{MARK: in_scan}).values_list(MARK, flat=True).get()
            accepted = _accepted(table.scan_verdict(result), token, reanchor, _table_judge(table, using, None))
            return rows.get(), accepted  # judged; the parent row is locked, the child's lock cannot wait long
        _take_write_lock(root_rows, root._meta.pk.attname, table)
        _lock_bounded(root_rows, timeout)
        timeout = None
    if column is not None:
        _take_write_lock(rows, column, table)
        return _judged_on_column(_bounded(rows, timeout).get(), column, token, reanchor)
    # Elsewhere the mark goes first: on SQLite it is the write that takes the database's write
    # lock at the start, which avoids a read-to-write lock upgrade deadlock.
    judge = _table_judge(table, using, timeout)
    accepted = _accepted(judge(token), token, reanchor, judge)
    return rows.get(), accepted


def _judged_on_column(fresh: Model, column: str, token: Token, reanchor: Reanchor | None) -> tuple[Model, Token]:
    stored = getattr(fresh, column)
    accepted = _accepted(column_verdict(stored, token), token, reanchor, functools.partial(column_verdict, stored))
    setattr(fresh, column, column_value(accepted))  # written by the transition's UPDATE (save_judged)
    return fresh, accepted


def save_judged(instance: Model, token: Token, using: str, update_fields: set[str]) -> None:
    """The transition's own UPDATE, after ``lock_row`` accepted ``token`` in this transaction.

    With a ``FencingTokenField`` it always carries the token's mark, whatever the side effect did
    to the instance (``refresh_from_db()``, its own ``save()``, a rolled-back savepoint): a
    committed transition that left the old mark would let a holder older than it through.
    """
    column = fencing_column(type(instance))
    if column is None:
        save_fields(instance, using, sorted(update_fields))
        return
    mark = column_value(token)
    setattr(instance, column, mark)
    scope = _JUDGED_WRITE.set((id(instance), mark))
    try:
        save_fields(instance, using, sorted(update_fields | {column}))
    finally:
        _JUDGED_WRITE.reset(scope)


def fence(token: Token, using: str, row_lock_timeout: float | None) -> Token | None:
    """Judge ``token`` in the current transaction of ``using`` before hand-written writes.

    Raises the mark, or refuses with ``StaleFencingToken`` — without re-anchoring (module
    docstring): whatever the holder read before this call may predate a newer holder's commit.
    Returns ``token`` once accepted; ``None`` when nothing was judged (a ``FencingTokenField``
    object with no row).
    """
    return _fence(token, using, row_lock_timeout, reanchor=None, in_caller_transaction=True)


def barrier(token: Token, using: str, row_lock_timeout: float | None, reanchor: Reanchor | None = None) -> Token | None:
    """Judge a freshly taken lease's token before its holder reads anything (``object_lock``'s entry).

    In a transaction of its own that commits at once (a savepoint inside a caller's transaction,
    whose commit then publishes it): the judgement waits for an older holder still inside a
    judged transaction, so that holder's commit is visible to every read after this call, and a
    holder older still is refused from now on. Nothing has been read under the lease yet, so a
    refused token may be re-anchored (``reanchor``) when Redis confirms ownership. With a
    ``FencingTokenField``, an object with no row has nothing to protect and the door writes nothing
    (returns ``None``: nothing was judged); with the mark table the object's mark row is written
    either way. Returns the token accepted.
    """
    # Outside a caller's transaction the bound ends with our own: nothing of the caller's to put back.
    in_caller_transaction = connections[using].in_atomic_block
    with transaction.atomic(using=using):
        return _fence(token, using, row_lock_timeout, reanchor=reanchor, in_caller_transaction=in_caller_transaction)


def _fence(
    token: Token, using: str, row_lock_timeout: float | None, *, reanchor: Reanchor | None, in_caller_transaction: bool
) -> Token | None:
    model, pk = object_of(token.key)
    column = fencing_column(model) if model is not None else None
    table = mark_table(using)
    with _bounded_wait(using, token.key, row_lock_timeout, in_caller_transaction) as timeout:
        if column is None:
            judge = _table_judge(table, using, timeout)
            return _accepted(judge(token), token, reanchor, judge)
        assert model is not None
        rows = model._base_manager.db_manager(using).filter(pk=pk)
        _take_write_lock(rows, column, table)
        found = (
            _bounded(rows.select_for_update(), timeout)
            .values_list(column, *_BOUND_ALIAS[: timeout is not None])
            .first()
        )
        if found is None:
            return None  # no row: nothing to write, nothing to protect
        stored = found[0]
        accepted = _accepted(column_verdict(stored, token), token, reanchor, functools.partial(column_verdict, stored))
        rows.update(**{column: column_value(accepted)})
        return accepted


# -- the judgement: a verdict (None: accepted, else the mark that refused it; marks.py) ----------


def _accepted(
    verdict: int | None, token: Token, reanchor: Reanchor | None, verdict_of: Callable[[Token], int | None]
) -> Token:
    """The token accepted: ``token``, or at a first judgement the re-anchored one; else refused."""
    again = None if reanchor is None else functools.partial(_reanchored, reanchor, verdict_of)
    return _judge(verdict, token, again) or token


def _reanchored(reanchor: Reanchor, verdict_of: Callable[[Token], int | None], mark: int) -> Token | None:
    token = reanchor(mark)
    return token if token is not None and verdict_of(token) is None else None


def _judge(verdict: int | None, token: Token, again: Callable[[int], Token | None] | None, /) -> Token | None:
    """Accept (``None``: ``token`` as it is, or the re-anchored token) or raise ``StaleFencingToken``."""
    if verdict is None:
        return None
    # The database has seen this token or a newer one from another lease. Either our lease ran out
    # and another holder committed (we must not write), or Redis lost its counter and minted us a
    # low token while we really do hold the lease: Redis alone can tell which, atomically with
    # minting the replacement token — and only at the lease's first judgement, where nothing was
    # read under it before (again is None otherwise: module docstring). A lease already accepted
    # once had its token anchored then; refused later, another holder wrote in between, and what
    # this holder read (an enclosing object_lock's reads, a walk's earlier steps) predates it.
    if again is not None and (reanchored := again(verdict)) is not None:
        return reanchored
    stale = token.number
    telemetry.token_refused(token.key)
    logger.warning("stale fencing token %s for %s refused: the database holds %s", stale, token.key, verdict)
    raise StaleFencingToken(
        f"fencing token {stale} for {token.key} is not newer than the committed mark {verdict}: "
        f"another holder has written since this lease was granted",
        token=stale,
        mark=verdict,
    )


def _table_judge(table: MarkTable, using: str, timeout: str | None) -> Callable[[Token], int | None]:
    return lambda token: table.verdict(token, using, timeout)


# -- helpers ----------------------------------------------------------------------------------------


def _bounded(rows: Any, timeout: str | None) -> Any:
    if timeout is None:
        return rows
    # values_list() must name MARK (_BOUND_ALIAS), or Django leaves the annotation out of the SELECT.
    return rows.annotate(**{MARK: _bound_in_scan(timeout)})


def _bound_in_scan(timeout: str) -> RawSQL:
    # set_config runs in the scan, before FOR UPDATE waits: the wait is bounded.
    return RawSQL("set_config('lock_timeout', %s, true)", (timeout,))


_BOUND_ALIAS = (MARK,)


def _take_write_lock(rows: Any, column: str, table: MarkTable) -> None:
    """A no-op UPDATE of ``column`` first, where the database has no row locks (SQLite)."""
    # SQLite has no row locks: a transaction that reads first and writes later deadlocks with
    # another that does the same (each holds a read lock the other's commit needs), and one of them
    # fails. Writing first takes the database's write lock up front, as the mark table's INSERT does.
    if not table.row_locks:
        rows.update(**{column: F(column)})


def _lock_bounded(rows: Any, timeout: str | None) -> None:
    _bounded(rows, timeout).values_list("pk", *_BOUND_ALIAS[: timeout is not None]).get()
