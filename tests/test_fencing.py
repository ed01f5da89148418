"""Fencing tokens judged by the database, in the shared mark table and in an opted-in column.

The multi-process versions (a holder SIGSTOPped past its TTL) are in test_faults.py; here the same
interleavings are driven from two threads, which contend for a lease like two processes do.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from django.db import connections, transaction

from dsm_redis import LockTimeout, StaleFencingToken, object_lock
from dsm_redis.backends import get_backend
from dsm_redis.fence import fencing_column
from dsm_redis.keys import counter_key, object_key, redis_name
from dsm_redis.lease import hold
from dsm_redis.models import FencingMark
from tests.helpers import dsm_options, fresh, pg_connect
from tests.procs import in_background
from tests.testapp.models import Account, Cat, DecimalAccount, FencedAccount, KeyedAccount, UuidAccount

pytestmark = pytest.mark.django_db(databases=["default", "sqlite"], transaction=True)

MODELS = pytest.mark.parametrize("model", [Account, FencedAccount], ids=["mark-table", "own-column"])


def mark(obj: Any) -> int:
    if fencing_column(type(obj)):
        return int(type(obj).objects.using(obj._state.db).get(pk=obj.pk).fencing_token.split(":")[0])
    return FencingMark.objects.using(obj._state.db).get(pk=object_key(obj)).token


def in_other_thread(fn: Any) -> None:
    """Run fn in another thread (its own lease holder, its own DB connection) and wait for it."""
    in_background(fn)()


def expire(lease: Any) -> None:
    """What a TTL running out does: the lease key disappears from Redis."""
    from django.conf import settings

    prefix = settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"]
    get_backend().client.delete(f"lock:{redis_name(prefix, lease.key)}")


@MODELS
def test_marks_follow_tokens(model, db_alias):
    obj = model.objects.using(db_alias).create()
    with object_lock(obj) as first:
        obj.machine.deposit()
    assert mark(obj) == first.fencing_token
    obj.machine.deposit()
    assert mark(obj) > first.fencing_token


@MODELS
def test_stale_holder_is_refused_and_commits_nothing(model, db_alias):
    obj = model.objects.using(db_alias).create()
    with object_lock(obj) as lease:
        obj.machine.deposit(amount=1)
        expire(lease)  # our lease runs out while we are "paused"...
        in_other_thread(lambda: model.objects.using(db_alias).get(pk=obj.pk).machine.deposit(amount=10))
        with pytest.raises(StaleFencingToken) as caught:
            obj.machine.deposit(amount=100)  # ...and our next write is judged stale
        assert caught.value.token == lease.fencing_token and caught.value.mark > lease.fencing_token
    row = model.objects.using(db_alias).get(pk=obj.pk)
    assert (row.balance, row.deposits) == (11, 2)
    assert obj.balance == 1  # the refused transition left the instance as it was


@MODELS
def test_lost_counter_is_reanchored_above_the_mark(model, db_alias, caplog):
    from django.conf import settings

    obj = model.objects.using(db_alias).create()
    for _ in range(3):
        obj.machine.deposit()
    before = mark(obj)
    # Redis lost the counter (restart without persistence, flush, eviction): tokens restart at 1.
    get_backend().client.delete(counter_key(settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"], object_key(obj)))
    with caplog.at_level(logging.WARNING, logger="dsm_redis"):
        obj.machine.deposit()
    assert "re-anchored" in caplog.text
    assert mark(obj) > before
    assert model.objects.using(db_alias).get(pk=obj.pk).balance == 4
    obj.machine.deposit()  # and the counter carries on from there
    assert model.objects.using(db_alias).get(pk=obj.pk).balance == 5


def test_hand_written_writes_inside_object_lock_are_fenced(db_alias):
    obj = Account.objects.using(db_alias).create()
    with object_lock(obj) as lease:
        with transaction.atomic(using=db_alias):
            lease.fence(db_alias)
            Account.objects.using(db_alias).filter(pk=obj.pk).update(balance=5)
        expire(lease)
        in_other_thread(lambda: Account.objects.using(db_alias).get(pk=obj.pk).machine.deposit())
        with pytest.raises(StaleFencingToken):
            with transaction.atomic(using=db_alias):
                lease.fence(db_alias)
                Account.objects.using(db_alias).filter(pk=obj.pk).update(balance=500)
    assert Account.objects.using(db_alias).get(pk=obj.pk).balance == 6


@pytest.mark.parametrize(
    ("model", "alias", "statements"),
    [
        (Account, "default", ["BEGIN", "SELECT", "UPDATE", "COMMIT"]),
        (FencedAccount, "default", ["BEGIN", "SELECT", "UPDATE", "COMMIT"]),
        # SQLite has no row locks: the write lock is taken first (a no-op UPDATE), see fence.py.
        (FencedAccount, "sqlite", ["BEGIN", "UPDATE", "SELECT", "UPDATE", "COMMIT"]),
        # SQLite has no stored functions: the mark is a statement of its own.
        (Account, "sqlite", ["BEGIN", "INSERT", "SELECT", "UPDATE", "COMMIT"]),
    ],
    ids=["pg-table", "pg-column", "sqlite-column", "sqlite-table"],
)
def test_statements_per_uncontended_transition(model, alias, statements, queries):
    obj = model.objects.using(alias).create()
    obj.machine.deposit()
    with queries(alias) as ctx:
        obj.machine.deposit()
    assert [q["sql"].split()[0] for q in ctx.captured_queries] == statements
    # No separate refresh: the locking SELECT is the only read.


def test_two_redis_round_trips_per_uncontended_transition():
    obj = Account.objects.create()
    obj.machine.deposit()  # scripts loaded
    import redis as redis_py

    client = get_backend().client
    watcher = redis_py.Redis(connection_pool=redis_py.ConnectionPool(**client.connection_pool.connection_kwargs))
    seen: list[str] = []
    with watcher.monitor() as monitor:
        ready = threading.Event()

        def listen() -> None:
            ready.set()
            for command in monitor.listen():
                if command["client_type"] != "lua":  # commands a script runs are not round trips
                    seen.append(command["command"])
                if "STOP-LISTENING" in command["command"]:
                    return

        listener = threading.Thread(target=listen)
        listener.start()
        ready.wait()
        obj.machine.deposit()
        client.echo("STOP-LISTENING")
        listener.join()
    assert [c.split()[0] for c in seen[:-1]] == ["EVALSHA", "EVALSHA"]


@MODELS
def test_a_token_minted_twice_after_redis_loss_is_accepted_once(model, db_alias):
    from django.conf import settings

    prefix = settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"]
    obj = model.objects.using(db_alias).create()
    obj.machine.deposit()
    # A holds the next token and has not been judged yet (a transition before its SELECT ... FOR
    # UPDATE; object_lock would have judged it at its door).
    with hold(object_key(obj)) as a:
        client = get_backend().client
        client.delete(f"lock:{redis_name(prefix, a.key)}", counter_key(prefix, a.key))  # Redis restarts empty
        # B gets token 1, is refused by the mark, re-anchors above it: to A's token.
        in_other_thread(lambda: model.objects.using(db_alias).get(pk=obj.pk).machine.deposit(amount=10))
        assert mark(obj) == a.fencing_token  # the same token, committed by another lease
        with pytest.raises(StaleFencingToken):
            obj.machine.deposit(amount=100)
    row = model.objects.using(db_alias).get(pk=obj.pk)
    assert (row.balance, row.deposits) == (11, 2)


def test_a_plain_save_of_an_old_instance_does_not_lower_the_column_mark(db_alias):
    obj = FencedAccount.objects.using(db_alias).create()
    obj.machine.deposit()
    loaded_before = FencedAccount.objects.using(db_alias).get(pk=obj.pk)
    obj.machine.deposit()
    newest = mark(obj)
    loaded_before.balance = 100
    loaded_before.save()  # carries the older mark in memory: it must not write it back
    assert mark(obj) == newest
    assert FencedAccount.objects.using(db_alias).get(pk=obj.pk).balance == 100
    with object_lock(obj) as lease:
        expire(lease)
        in_other_thread(lambda: FencedAccount.objects.using(db_alias).get(pk=obj.pk).machine.deposit())
        stale = FencedAccount.objects.using(db_alias).get(pk=obj.pk)
        stale.save()  # the same, between a newer holder's commit and our next write
        with pytest.raises(StaleFencingToken):
            obj.machine.deposit()  # still judged stale: the newer mark was not overwritten


def test_a_fencing_field_below_the_root_of_an_inheritance_chain_is_reported():
    from django.db import models
    from django.test.utils import isolate_apps

    from dsm_redis import FencingTokenField
    from dsm_redis.checks import misplaced_fencing_fields

    with isolate_apps("tests.testapp"):

        class Animal(models.Model):
            class Meta:
                app_label = "testapp"

        class Tiger(Animal):
            fencing_token = FencingTokenField()

            class Meta:
                app_label = "testapp"

        class Root(models.Model):
            fencing_token = FencingTokenField()

            class Meta:
                app_label = "testapp"

        errors = misplaced_fencing_fields([Animal, Tiger, Root])
    assert [(e.id, e.obj) for e in errors] == [("dsm_redis.E006", Tiger)]
    assert "testapp.Animal" in errors[0].hint


# -- the transition's own write always carries the lease's mark --------------------------------------


def _refresh(row: Any) -> None:
    row.refresh_from_db()  # common after a queryset update(F(...)) in a side effect


def _save_in_a_rolled_back_savepoint(row: Any) -> None:
    try:
        with transaction.atomic(using=row._state.db):
            row.save()
            raise RuntimeError("caught by the side effect")
    except RuntimeError:
        pass


@pytest.mark.parametrize("side_effect", [_refresh, _save_in_a_rolled_back_savepoint], ids=["refresh", "savepoint"])
def test_a_committed_transition_always_raises_the_column_mark(db_alias, side_effect):
    obj = FencedAccount.objects.using(db_alias).create()
    obj.machine.deposit()
    with object_lock(obj, ttl=60) as older:  # judged at the door: the mark is now older's token
        expire(older)

        def newer() -> None:
            row = FencedAccount.objects.using(db_alias).get(pk=obj.pk)
            row.machine.deposit(amount=10, effect=lambda: side_effect(row))

        in_other_thread(newer)
        assert mark(obj) > older.fencing_token  # the newer transition's mark, whatever its side effect did
        with pytest.raises(StaleFencingToken):
            with transaction.atomic(using=db_alias):
                older.fence(db_alias)
                FencedAccount.objects.using(db_alias).filter(pk=obj.pk).update(balance=500)
    assert FencedAccount.objects.using(db_alias).get(pk=obj.pk).balance == 11


# -- Lease.fence() never re-anchors ---------------------------------------------------------------


def fenced_write(lease: Any, model: Any, alias: str, pk: Any, **values: Any) -> str:
    """A hand-written write as the README shows it: ``"wrote"``, or ``"refused"`` by the fence."""
    try:
        with transaction.atomic(using=alias):
            lease.fence(alias)
            model.objects.using(alias).filter(pk=pk).update(**values)
    except StaleFencingToken:
        return "refused"
    return "wrote"


def lost_then_brought_back(lease: Any, newer_writer: Any) -> None:
    """A's key is deleted (`dsm_locks --release --force`, eviction), ``newer_writer`` commits under
    a newer lease, then Redis rolls back (a lagging replica promoted, an AOF restore): A's key and
    the old counter return."""
    from django.conf import settings

    prefix = settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"]
    client = get_backend().client
    lock_key, counter = f"lock:{redis_name(prefix, lease.key)}", counter_key(prefix, lease.key)
    saved_counter = client.get(counter)
    client.delete(lock_key)
    in_other_thread(newer_writer)
    client.set(lock_key, lease.owner, px=60_000)
    client.set(counter, saved_counter)


@MODELS
def test_a_lease_redis_brings_back_is_refused_by_fence(model, db_alias):
    obj = model.objects.using(db_alias).create()
    with object_lock(obj, ttl=60) as a:
        read = model.objects.using(db_alias).get(pk=obj.pk).balance
        lost_then_brought_back(a, lambda: model.objects.using(db_alias).get(pk=obj.pk).machine.deposit(amount=10))
        # Redis says A owns the lease; A's read predates the newer commit: refused.
        assert fenced_write(a, model, db_alias, obj.pk, balance=read + 100) == "refused"
    assert model.objects.using(db_alias).get(pk=obj.pk).balance == 10


# -- what object_lock reads cannot be overtaken by an older holder's late commit --------------------


@MODELS
def test_an_older_holders_late_commit_cannot_overwrite_what_object_lock_read(model, db_alias, monkeypatch):
    from dsm_redis.lease import held_lease

    obj = model.objects.using(db_alias).create()
    older_inside, older_go, newer_waiting, newer_go = (threading.Event() for _ in range(4))
    older_lease: list[Any] = []

    def older() -> None:
        row = model.objects.using(db_alias).get(pk=obj.pk)

        def stall() -> None:  # the row is locked and the token judged, the transaction is open
            older_lease.append(held_lease(object_key(row)))
            older_inside.set()
            older_go.wait(60)

        row.machine.deposit(amount=1, effect=stall)

    join_older = in_background(older)
    assert older_inside.wait(60)
    expire(older_lease[0])  # its lease ends (Redis restarted empty, or it paused past its TTL)

    _signal_at_the_door(monkeypatch, newer_waiting)
    outcome: list[str] = []

    def newer() -> None:
        with object_lock(obj) as lease:
            read = model.objects.using(db_alias).get(pk=obj.pk).balance  # a plain read, as the README shows
            newer_waiting.set()
            newer_go.wait(60)
            outcome.append(fenced_write(lease, model, db_alias, obj.pk, balance=read + 100))

    join_newer = in_background(newer)
    assert newer_waiting.wait(60)  # the newer holder has read, or is at the door
    older_go.set()
    join_older()  # the older holder commits
    newer_go.set()
    join_newer()
    balance = model.objects.using(db_alias).get(pk=obj.pk).balance
    assert (outcome[0], balance) in {("wrote", 101), ("refused", 1)}, (outcome, balance)


# -- every row-lock wait is bounded ----------------------------------------------------------------


@MODELS
def test_fence_waits_for_a_row_lock_no_longer_than_the_bound(model, settings):
    from django.db import connection

    from dsm_redis import LockTimeout

    dsm_options(settings, ROW_LOCK_TIMEOUT=0.2)
    obj = model.objects.create()
    obj.machine.deposit()
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '30s'")  # without the bound: a failure, not a hang
    with object_lock(obj) as lease, pg_connect() as other:
        with other.transaction():
            # A stale holder that fenced and stalled with its transaction open.
            if fencing_column(model):
                other.execute(f"SELECT 1 FROM {model._meta.db_table} WHERE id = %s FOR UPDATE", [obj.pk])
            else:
                other.execute("SELECT 1 FROM dsm_redis_fencing_mark WHERE object_key = %s FOR UPDATE", [lease.key])
            with pytest.raises(LockTimeout, match="row lock"):
                with transaction.atomic():
                    lease.fence()
    assert model.objects.get(pk=obj.pk).balance == 1


def test_a_busy_sqlite_database_is_a_lock_timeout():
    import sqlite3

    from dsm_redis import LockTimeout

    obj = Account.objects.using("sqlite").create()
    name = connections["sqlite"].settings_dict["NAME"]
    with connections["sqlite"].cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(name, uri=str(name).startswith("file:"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the database
        with pytest.raises(LockTimeout):
            obj.machine.deposit()
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert Account.objects.using("sqlite").get(pk=obj.pk).balance == 0


@MODELS
def test_a_transition_inside_object_lock_is_not_re_anchored_after_redis_brings_the_lease_back(model, db_alias):
    obj = model.objects.using(db_alias).create()
    with object_lock(obj, ttl=60) as a:
        read = model.objects.using(db_alias).get(pk=obj.pk).balance
        lost_then_brought_back(a, lambda: model.objects.using(db_alias).get(pk=obj.pk).machine.deposit(amount=10))
        with pytest.raises(StaleFencingToken):
            obj.machine.deposit(amount=100 - read)  # an amount computed from what A read before B's commit
    assert model.objects.using(db_alias).get(pk=obj.pk).balance == 10


# -- doors, bounds and SQLite locking (adversarial review) ------------------------------------

WAIT = 60  # a guard against a hung test, never asserted as a duration


def _signal_at_the_door(monkeypatch: Any, event: threading.Event) -> None:
    """Set ``event`` when a holder reaches ``fence.barrier`` (the door of object_lock), so that a
    test can tell "the newer holder is waiting at the door" from "it has read"."""
    from dsm_redis import fence

    original = fence.barrier

    def barrier(*args: Any, **kwargs: Any) -> Any:
        event.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(fence, "barrier", barrier)


@MODELS
def test_object_lock_after_a_failed_transition_in_the_same_transaction_passes_the_door(model, monkeypatch):
    """Claim (object_lock's door): afterwards every older holder has either committed before the
    caller's first read, or is refused.

    In a caller's transaction, a transition that fails after its row lock (a side effect raising,
    a precondition failing against the fresh row, a LockTimeout) rolls back its savepoint — and
    with it the judged mark and its lock — but leaves the lease *parked* on the caller's
    transaction. object_lock entered next in that transaction re-enters the parked lease (depth 1)
    and skips the door: an older holder fences, the newer one reads, the older one commits, the
    newer one's fenced write overwrites it.

    PostgreSQL only: on SQLite the rolled-back savepoint keeps the database's write lock, and the
    older holder's fence waits for the caller's transaction instead.
    """
    alias = "default"
    obj = model.objects.using(alias).create()
    a_read, a_go_fence, a_fenced, a_go_commit = (threading.Event() for _ in range(4))
    b_failed, b_at_door_or_read = threading.Event(), threading.Event()
    older: list[Any] = []
    outcome: list[str] = []

    def holder_a() -> None:  # the older holder: entered object_lock, read, then lost its lease
        with object_lock(obj, ttl=60) as a:
            older.append(a)
            read = model.objects.using(alias).get(pk=obj.pk).balance
            a_read.set()
            assert a_go_fence.wait(WAIT)
            with transaction.atomic(using=alias):
                a.fence(alias)  # its own door's mark: the same token and owner, accepted
                model.objects.using(alias).filter(pk=obj.pk).update(balance=read + 100)
                a_fenced.set()
                assert a_go_commit.wait(WAIT)

    def holder_b() -> None:  # the newer holder, inside its own transaction (ATOMIC_REQUESTS, say)
        assert b_failed.wait(WAIT)
        with transaction.atomic(using=alias):
            b_row = model.objects.using(alias).get(pk=obj.pk)
            with pytest.raises(RuntimeError):
                b_row.machine.deposit(effect=_raise)  # judged, then rolled back to its savepoint
            a_go_fence.set()
            assert a_fenced.wait(WAIT)  # the older holder has fenced and written, not committed
            with object_lock(obj) as b:  # must wait at the door for the older holder's commit
                read = model.objects.using(alias).get(pk=obj.pk).balance
                b_at_door_or_read.set()
                outcome.append(fenced_write(b, model, alias, obj.pk, balance=read + 1))

    join_a = in_background(holder_a)
    assert a_read.wait(WAIT)
    _signal_at_the_door(monkeypatch, b_at_door_or_read)  # A has passed its own door
    expire(older[0])  # A's lease is lost in Redis; A does not know yet (its local clock says valid)
    join_b = in_background(holder_b)
    b_failed.set()
    assert b_at_door_or_read.wait(WAIT)
    a_go_commit.set()
    join_a()
    join_b()
    balance = model.objects.using(alias).get(pk=obj.pk).balance
    assert (outcome[0], balance) in {("wrote", 101), ("refused", 100)}, (outcome, balance)


def _raise() -> None:
    raise RuntimeError("the side effect failed; the caller handles it and carries on")


@MODELS
def test_a_refused_fence_puts_back_the_callers_lock_timeout(model, settings):
    """Claim: every row-lock wait is bounded by ROW_LOCK_TIMEOUT, and the caller's own lock_timeout
    is put back afterwards (fence._bounded_wait). StaleFencingToken is not a DatabaseError: when
    Lease.fence() refuses, the restore is skipped and nothing rolls it back (no savepoint of ours),
    so the rest of the caller's transaction runs with lock_timeout = ROW_LOCK_TIMEOUT. A caller that
    catches the refusal and carries on (logs it, writes an audit row, locks another row) gets
    LockNotAvailable errors after 200 ms where it had asked to wait 5 s."""
    dsm_options(settings, ROW_LOCK_TIMEOUT=0.2)
    obj = model.objects.create()
    with object_lock(obj, ttl=60) as lease:
        expire(lease)
        in_other_thread(lambda: model.objects.get(pk=obj.pk).machine.deposit())
        with transaction.atomic():
            with connections["default"].cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '5s'")
            with pytest.raises(StaleFencingToken):
                lease.fence()
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT current_setting('lock_timeout')")
                (after,) = cursor.fetchone()
    assert after == "5s"


@pytest.mark.parametrize("model_name", ["Cat", "Lion"])
def test_concurrent_transitions_on_sqlite_do_not_deadlock_for_an_inherited_model(model_name):
    """Claim (fence.py): on SQLite the transition's first statement is a write, which takes the
    database's write lock up front and "avoids a read-to-write lock upgrade deadlock". For a
    multi-table-inheritance child (Lion) lock_row reads the parent row first (_lock_bounded) and
    writes the mark after it: two transitions on *different* objects, each holding a read lock and
    wanting the write lock, deadlock, and SQLite fails one at once with "database is locked" —
    raised as LockTimeout ("not obtained within 30s") although nobody waited. Cat is the control."""
    from dsm_redis import LockTimeout
    from tests.testapp import models as testapp

    model = getattr(testapp, model_name)
    alias, per_thread, n_threads = "sqlite", 20, 4
    objects = [[model.objects.using(alias).create() for _ in range(per_thread)] for _ in range(n_threads)]
    start = threading.Barrier(n_threads)
    timeouts: list[str] = []

    def walk(mine: list[Any]) -> None:
        start.wait(WAIT)
        for obj in mine:
            try:
                obj.state_machine.transition_through(testapp.DEAD)
            except LockTimeout as exc:
                timeouts.append(str(exc))

    joins = [in_background(lambda mine=mine: walk(mine)) for mine in objects]
    for join in joins:
        join()
    assert timeouts == [], f"{len(timeouts)} transitions failed, e.g. {timeouts[0]}"


@pytest.mark.parametrize("model", [Account, UuidAccount, DecimalAccount, KeyedAccount, Cat])
def test_compiled_row_lock_select_is_the_orms(model):
    """The row-lock SELECT compiled once per model sends what the ORM's ``.get()`` sends, and
    builds the same instance (every column, the judgement's result)."""
    if connections["default"].vendor != "postgresql":
        pytest.skip("the judgement runs in the scan on PostgreSQL only")
    from django.test.utils import CaptureQueriesContext

    from dsm_redis.fence import MARK
    from dsm_redis.marks import mark_table
    from dsm_redis.rowlock import _STATEMENTS, locked_row
    from dsm_redis.token import Token

    pk = {DecimalAccount: "7.50", KeyedAccount: "a {b}: c"}.get(model)
    obj = model.objects.create(**({"pk": pk} if pk is not None else {}))
    token = Token(object_key(obj), 5, "owner")
    found = []
    for compiled in (False, True):
        _STATEMENTS.clear()
        with transaction.atomic(), CaptureQueriesContext(connections["default"]) as queries:
            rows = model._base_manager.db_manager("default").select_for_update().filter(pk=obj.pk)
            in_scan = mark_table("default").judge_in_scan(token, "1000ms")
            fresh = (
                locked_row(model, "default", obj.pk, MARK, in_scan)
                if compiled
                else rows.annotate(**{MARK: in_scan}).get()
            )
        assert not compiled or _STATEMENTS[(model, "default", "postgresql", in_scan.sql)] is not None
        found.append(([q["sql"] for q in queries], fresh))
    (orm_sql, orm_row), (sql, row) = found
    assert sql == orm_sql
    assert type(row) is type(orm_row) and row.pk == orm_row.pk and row._state.db == orm_row._state.db
    assert {f.attname: getattr(row, f.attname) for f in model._meta.concrete_fields} == {
        f.attname: getattr(orm_row, f.attname) for f in model._meta.concrete_fields
    }
    assert getattr(row, MARK) == getattr(orm_row, MARK) == 5
    assert not row._state.adding


def test_compiled_row_lock_select_missing_row():
    if connections["default"].vendor != "postgresql":
        pytest.skip("the judgement runs in the scan on PostgreSQL only")
    from dsm_redis.fence import MARK
    from dsm_redis.marks import mark_table
    from dsm_redis.rowlock import locked_row
    from dsm_redis.token import Token

    for _ in range(2):  # compiling, then compiled
        with transaction.atomic(), pytest.raises(Account.DoesNotExist, match="Account matching query does not exist"):
            locked_row(Account, "default", 10**9, MARK, mark_table("default").judge_in_scan(Token("x:1", 1, "o"), None))


@pytest.mark.parametrize(
    ("model", "given"),
    [(DecimalAccount, "7.5"), (UuidAccount, "6F9619FF-8B86-D011-B42D-00CF4FC964FF")],
    ids=["decimal", "uuid"],
)
def test_one_row_has_one_lease_and_one_mark_whatever_form_an_instance_holds_its_pk_in(model, given, db_alias):
    """An instance keeps its primary key as it was given ("7.5", an upper-case UUID); the row read
    back has the stored form (7.50, lower case). Both name one row: one lease, one fencing mark,
    or a holder's fenced write is judged against a mark the other holder never raised."""
    mine = model.objects.using(db_alias).create(pk=given)
    theirs = model.objects.using(db_alias).get(pk=mine.pk)
    busy: list[LockTimeout] = []

    def other_holder() -> None:
        try:
            with object_lock(theirs, timeout=0):
                theirs.machine.deposit(amount=10)
        except LockTimeout as exc:
            busy.append(exc)

    with object_lock(mine) as lease:
        balance = fresh(mine).balance  # read under our lease
        in_other_thread(other_holder)
        with transaction.atomic(using=db_alias):
            lease.fence(db_alias)
            model.objects.using(db_alias).filter(pk=mine.pk).update(balance=balance + 1)
    row = fresh(mine)
    assert row.balance == 1 + 10 * row.deposits, "a deposit was overwritten by a write from an older read"
    assert len(busy) == 1


def _sqlite_before_3_35(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    # SQLite parses RETURNING from 3.35 on; before, the clause is a syntax error.
    from django.db import OperationalError

    if " RETURNING " in sql.upper():
        raise OperationalError('near "RETURNING": syntax error')
    return execute(sql, params, many, context)


def test_the_sqlite_mark_needs_no_sqlite_newer_than_djangos_minimum():
    """Django supports SQLite older than 3.35 (5.2: 3.31; 4.2: 3.21) and deployments run it (Debian
    11 ships 3.34): the upsert that judges a token must not need RETURNING, on acceptance or refusal."""
    obj = Account.objects.using("sqlite").create()
    with connections["sqlite"].execute_wrapper(_sqlite_before_3_35):
        obj.machine.deposit()
        with object_lock(obj) as lease:
            obj.machine.deposit()
            expire(lease)
            in_other_thread(lambda: Account.objects.using("sqlite").get(pk=obj.pk).machine.deposit(amount=10))
            with pytest.raises(StaleFencingToken):
                obj.machine.deposit(amount=100)
    assert (fresh(obj).balance, fresh(obj).deposits) == (12, 3)


def _set_lock_timeout(value: str) -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, true)", [value])


def _lock_timeout() -> str:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT current_setting('lock_timeout')")
        return str(cursor.fetchone()[0])


@MODELS
def test_a_transition_in_the_callers_transaction_puts_back_its_lock_timeout_accepted_or_refused(model, settings):
    """The row lock's statement bounds its wait with ``set_config('lock_timeout', ..., true)``, which
    lasts until the *caller's* transaction ends: accepted, or refused and caught, the transition must
    leave the caller's own setting as it was."""
    if connections["default"].vendor != "postgresql":
        pytest.skip("lock_timeout is PostgreSQL's")
    dsm_options(settings, ROW_LOCK_TIMEOUT=0.2)
    obj = model.objects.create()
    with object_lock(obj, ttl=60) as lease:
        with transaction.atomic():
            _set_lock_timeout("61s")
            obj.machine.deposit(amount=1)
            accepted = _lock_timeout()
        expire(lease)
        in_other_thread(lambda: model.objects.get(pk=obj.pk).machine.deposit(amount=10))
        with transaction.atomic():
            _set_lock_timeout("61s")
            with pytest.raises(StaleFencingToken):
                obj.machine.deposit(amount=100)
            refused = _lock_timeout()
    assert (accepted, refused) == ("61s", "61s")
    assert (fresh(obj).balance, fresh(obj).deposits) == (11, 2)
