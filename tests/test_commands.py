"""``manage.py dsm_graph`` and ``manage.py dsm_locks``."""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import pytest
import redis as redis_py
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command

from dsm_redis import StaleFencingToken, object_lock
from dsm_redis.backends import get_backend
from dsm_redis.keys import object_key, redis_name
from dsm_redis.tools.servers import _free_port
from tests.procs import in_background


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# -- dsm_graph -------------------------------------------------------------------------------------


def test_graph_mermaid_labels_states_from_choices_and_marks_preconditions():
    assert run("dsm_graph", "testapp.Cat") == (
        "%% testapp.Cat.state_machine (CatStateMachine)\n"
        "stateDiagram-v2\n"
        '    state "Unknown" as s0\n'
        '    state "Alive" as s1\n'
        '    state "Dead" as s2\n'
        "    [*] --> s0\n"
        "    s0 --> s1 : survive\n"
        "    s0 --> s2 : rip [guarded]\n"
        "    s1 --> s2\n"
        "    s2 --> [*]\n"
    )


def test_graph_dot_for_string_states_from_text_choices():
    out = run("dsm_graph", "testapp.Order", "--format", "dot")
    assert out.startswith('digraph "testapp.Order.machine (OrderMachine)" {\n')
    assert out.rstrip().endswith("}")
    for line in (
        '    s0 [label="New"];',
        '    s2 [label="Payment failed", peripheries=2];',  # no edge leaves it
        "    __start__ -> s0;",  # the field's default: no `start` on the machine
        '    s0 -> s1 [label="pay"];',
        '    s1 -> s3 [label="explode"];',
        '    s0 -> s4 [label=""];',  # an edge without side effect
    ):
        assert line in out.splitlines()
    assert out.count("{") == out.count("}")


def test_graph_dot_marks_guarded_edges_dashed():
    out = run("dsm_graph", "testapp.SeedModel", "--format", "dot")
    assert '[label="go_to_middle [guarded]", style=dashed]' in out
    assert '[label="enable_transition_to_middle"]' in out
    assert 'label="MIDDLE"' in out  # labelled from choices, not 2


def test_graph_of_a_model_with_two_machines_needs_field():
    with pytest.raises(CommandError, match=r"--field \(billing, state_machine\)"):
        run("dsm_graph", "testapp.Parcel")
    assert "s0 --> s1 : charge" in run("dsm_graph", "testapp.Parcel", "--field", "billing")
    assert "s0 --> s1 : ship" in run("dsm_graph", "testapp.Parcel", "--field", "state_machine")
    with pytest.raises(CommandError, match="no StateMachineField 'nope'"):
        run("dsm_graph", "testapp.Parcel", "--field", "nope")


@pytest.mark.parametrize(
    ("label", "match"),
    [
        ("testapp.Nope", "not an installed model"),
        ("Cat", "app_label.Model"),
        ("testapp.AuditLog", "no StateMachineField"),
    ],
)
def test_graph_errors_name_the_problem(label, match):
    with pytest.raises(CommandError, match=match):
        run("dsm_graph", label)


def test_graph_values_without_choices_are_shown_as_they_are():
    out = run("dsm_graph", "testapp.Switch")
    assert 'state "off" as s0' in out and "s0 --> s1 : turn_on" in out and "s1 --> s0 : turn_off" in out
    assert "--> [*]" not in out.replace("[*] --> s0", "")  # a cycle has no end state


# -- dsm_locks -------------------------------------------------------------------------------------


def lock_keys(key: str) -> tuple[str, str]:
    name = redis_name(get_backend().config.key_prefix, key)
    return f"lock:{name}", f"lock-signal:{name}"


# The leases here are taken through the pytest plugin's ``dsm_redis_backend``: under a key prefix of
# the test's own, since other tests' leases (a holder killed on purpose) may still be running out
# their TTL.


def test_locks_lists_held_leases_with_owner_ttl_and_token(dsm_redis_backend):
    assert "No leases held" in run("dsm_locks")
    grants = {pk: dsm_redis_backend.acquire(f"cmd.test:{pk}", ttl=30, timeout=0) for pk in (1, 2)}
    out = run("dsm_locks").splitlines()
    assert out[0].split() == ["OBJECT", "OWNER", "TTL", "LEFT", "FENCING", "TOKEN"]
    for pk, grant in grants.items():
        row = next(line.split() for line in out if line.startswith(f"cmd.test:{pk} "))
        assert row[1] == grant.owner and row[2].endswith("s") and row[3] == str(grant.fencing_token)
    assert out[-1].startswith("2 leases held")
    rows = json.loads(run("dsm_locks", "--json"))
    assert {r["object"]: (r["owner"], r["fencing_token"]) for r in rows} == {
        f"cmd.test:{pk}": (g.owner, g.fencing_token) for pk, g in grants.items()
    }
    assert all(0 < r["ttl"] <= 30 for r in rows)


def test_release_of_a_running_lease_needs_force_and_wakes_a_waiter(dsm_redis_backend, caplog):
    grant = dsm_redis_backend.acquire("cmd.test:3", ttl=60, timeout=0)
    with pytest.raises(CommandError, match="--force"):
        run("dsm_locks", "--release", "cmd.test:3")
    assert dsm_redis_backend.describe("cmd.test:3")["owner"] == grant.owner  # refused: nothing released
    lock, signal = lock_keys("cmd.test:3")
    waiter = redis_py.Redis.from_url(django_settings.REDIS_URL)
    woken: list[Any] = []
    thread = threading.Thread(target=lambda: woken.append(waiter.blpop([signal], timeout=60)))
    thread.start()
    out = run("dsm_locks", "--release", lock, "--force")  # the Redis key is accepted too
    thread.join(90)
    waiter.close()
    assert f"Released the lease on cmd.test:3 held by {grant.owner}" in out
    assert dsm_redis_backend.describe("cmd.test:3")["owner"] is None
    assert woken and woken[0] is not None  # the release pushed the wake-up signal
    (logged,) = [r for r in caplog.records if "released by an operator" in r.getMessage()]
    assert logged.name == "dsm_redis" and logged.levelname == "WARNING" and grant.owner in logged.getMessage()
    assert "nothing to release" in run("dsm_locks", "--release", "cmd.test:3")


def test_release_is_owner_safe(dsm_redis_backend, monkeypatch):
    grant = dsm_redis_backend.acquire("cmd.test:4", ttl=60, timeout=0)
    with pytest.raises(CommandError, match="not someone-else: nothing released"):
        run("dsm_locks", "--release", "cmd.test:4", "--owner", "someone-else", "--force")
    # The lease changes hands between the command's read and its release: nothing is deleted.
    describe = type(dsm_redis_backend).describe
    monkeypatch.setattr(
        type(dsm_redis_backend), "describe", lambda self, key: {**describe(self, key), "owner": "the-previous-holder"}
    )
    with pytest.raises(CommandError, match="changed hands"):
        run("dsm_locks", "--release", "cmd.test:4", "--force")
    monkeypatch.undo()
    assert dsm_redis_backend.describe("cmd.test:4")["owner"] == grant.owner
    assert "Released" in run("dsm_locks", "--release", "cmd.test:4", "--owner", grant.owner, "--force")


def test_a_lease_without_expiry_is_released_without_force(dsm_redis_backend, redis):
    lock, _ = lock_keys("cmd.test:5")
    redis.set(lock, "legacy-holder")  # e.g. python-redis-lock with expire=None: it never expires
    assert "no expiry" in run("dsm_locks")
    assert "Released the lease on cmd.test:5 held by legacy-holder" in run("dsm_locks", "--release", "cmd.test:5")
    assert not redis.exists(lock)


@pytest.mark.parametrize("key", ["nope", "cmd.test", "lock:other-prefix:{cmd.test:1}", "cmd:1"])
def test_release_rejects_what_is_not_an_object_key(dsm_redis_backend, key):
    with pytest.raises(CommandError, match="not"):
        run("dsm_locks", "--release", key)


def test_force_and_owner_belong_to_release():
    with pytest.raises(CommandError, match="--release"):
        run("dsm_locks", "--force")


def test_locks_with_redis_down_is_a_clean_error_without_the_password(settings):
    settings.DSM_REDIS = {
        "LOCATION": f"redis://:s3cret-pw@127.0.0.1:{_free_port()}/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5},
    }
    with pytest.raises(CommandError) as info:
        run("dsm_locks")
    assert "unreachable" in str(info.value) and "s3cret" not in str(info.value)


def test_locks_with_the_local_backend_lists_this_process(settings):
    settings.DSM_REDIS = {"BACKEND": "dsm_redis.backends.local.LocalLockBackend"}
    grant = get_backend().acquire("cmd.test:6", ttl=30, timeout=0)
    assert grant.owner in run("dsm_locks")
    assert "Released" in run("dsm_locks", "--release", "cmd.test:6", "--force")


@pytest.mark.django_db(transaction=True)
def test_a_forced_release_cannot_let_the_old_holder_overwrite_a_newer_one(dsm_redis_backend):
    """The operator frees a lease whose holder is alive; another holder commits; the old holder's
    next write is refused by the database (fencing), not committed over the newer one."""
    from tests.testapp.models import Account

    account = Account.objects.create()
    with object_lock(account) as lease:
        run("dsm_locks", "--release", object_key(account), "--force")

        def newer() -> None:
            Account.objects.get(pk=account.pk).machine.deposit(amount=10)

        in_background(newer)()
        assert Account.objects.get(pk=account.pk).balance == 10
        with pytest.raises(StaleFencingToken):
            account.machine.deposit(amount=1)
        assert lease.fencing_token < get_backend().describe(object_key(account))["fencing_token"]
    account.refresh_from_db()
    assert (account.balance, account.deposits) == (10, 1)


# -- dsm_prune -------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_prune_deletes_old_applied_task_records_only():
    from datetime import timedelta

    from django.utils import timezone

    from dsm_redis.models import AppliedTask

    AppliedTask.objects.create(task_id="old", object_key="testapp.cat:1")
    AppliedTask.objects.create(task_id="new", object_key="testapp.cat:1")
    AppliedTask.objects.filter(task_id="old").update(applied_at=timezone.now() - timedelta(days=8))
    assert "would delete 1" in run("dsm_prune", "--applied-older-than", "7d", "--dry-run")
    assert set(AppliedTask.objects.values_list("task_id", flat=True)) == {"old", "new"}
    assert "deleted 1" in run("dsm_prune", "--applied-older-than", "7d")
    assert list(AppliedTask.objects.values_list("task_id", flat=True)) == ["new"]
    with pytest.raises(CommandError, match="not an age"):
        run("dsm_prune", "--applied-older-than", "a week")


@pytest.mark.django_db(transaction=True)
def test_prune_deletes_marks_of_deleted_objects_under_their_lease():
    from dsm_redis.models import FencingMark
    from tests.testapp.models import Account

    kept, gone, busy = (Account.objects.create() for _ in range(3))
    for account in (kept, gone, busy):
        account.machine.deposit()
    busy_key = object_key(busy)
    Account.objects.filter(pk__in=[gone.pk, busy.pk]).delete()
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:  # another holder of a deleted object's lease (a transition failing on it, say)
        with object_lock(busy):
            holding.set()
            done.wait(60)

    join = in_background(holder)
    assert holding.wait(60)
    try:
        out = run("dsm_prune", "--marks-of-deleted")
    finally:
        done.set()
        join()
    assert get_backend().describe(object_key(gone))["owner"] is None  # the command left no lease behind
    assert "deleted 1; 1 skipped (lease busy)" in out
    assert set(FencingMark.objects.values_list("object_key", flat=True)) == {object_key(kept), busy_key}
    # The counter stays in Redis: a row created again with that primary key gets newer tokens.
    again = Account.objects.create(pk=gone.pk)
    again.machine.deposit()
    assert FencingMark.objects.get(pk=object_key(again)).token > 1
