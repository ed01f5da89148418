"""Races between real OS processes on real PostgreSQL and Redis.

Every race runs twice under the same load: once with deus-state-machina's "cowboy" code, which
must lose updates (otherwise the test could not see a race at all), and once through dsm_redis,
which must lose none and run each side effect exactly once per committed transition.
"""

from __future__ import annotations

import pytest

from tests.helpers import effects
from tests.procs import committed_per_account, run_workers
from tests.testapp.models import Account

pytestmark = pytest.mark.django_db(transaction=True)

PROCESSES = 8
ROUNDS = 15
WORK = 0.003  # seconds between read and write: an external call in the side effect
MANY = 5  # objects the many-object races spread over


def test_cowboy_code_loses_updates_under_this_load():
    account = Account.objects.create()
    results = run_workers("tests.workers:cowboy_deposit", PROCESSES, account.pk, ROUNDS, WORK)
    committed = sum(r["committed"] for r in results)
    account.refresh_from_db()
    assert committed == PROCESSES * ROUNDS
    assert account.balance < committed, "the unprotected code lost nothing: this load cannot show a race"


def test_eight_processes_on_one_object_lose_nothing(redis):
    account = Account.objects.create()
    results = run_workers("tests.workers:dsm_deposit", PROCESSES, [account.pk], ROUNDS, WORK)
    committed = sum(r["committed"] for r in results)
    account.refresh_from_db()
    assert committed == PROCESSES * ROUNDS
    assert account.balance == committed
    assert account.deposits == committed
    assert effects(redis, account.pk) == committed  # each side effect ran exactly once


def test_cowboy_code_loses_updates_over_many_objects_under_this_load():
    ids = [Account.objects.create().pk for _ in range(MANY)]
    results = run_workers("tests.workers:cowboy_deposit", PROCESSES, ids, ROUNDS, WORK)
    committed = sum(r["committed"] for r in results)
    balance = sum(Account.objects.filter(pk__in=ids).values_list("balance", flat=True))
    assert balance < committed, "the unprotected code lost nothing: this load cannot show a race"


def test_eight_processes_over_many_objects_lose_nothing(redis):
    accounts = [Account.objects.create() for _ in range(MANY)]
    ids = [a.pk for a in accounts]
    results = run_workers("tests.workers:dsm_deposit", PROCESSES, ids, ROUNDS, WORK)
    per_account = committed_per_account(results, ids)
    for account in Account.objects.filter(pk__in=ids):
        assert account.balance == account.deposits == per_account[account.pk]
        assert effects(redis, account.pk) == per_account[account.pk]
    assert sum(per_account.values()) == PROCESSES * ROUNDS


def test_fencing_marks_increase_with_every_lease():
    from dsm_redis.keys import object_key
    from dsm_redis.models import FencingMark

    account = Account.objects.create()
    run_workers("tests.workers:dsm_deposit", 4, [account.pk], 5, 0)
    mark = FencingMark.objects.get(pk=object_key(account)).token
    assert mark >= 20  # one token per lease, 20 leases, strictly increasing
