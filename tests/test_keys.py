"""Object keys: one row, one key, whatever its primary key looks like."""

from __future__ import annotations

import pytest
from django.db import transaction

from dsm_redis import object_lock
from dsm_redis.keys import STORED_KEY_LENGTH, object_key, stored_key
from dsm_redis.models import FencingMark
from tests.testapp.models import KeyedAccount, UuidAccount

pytestmark = pytest.mark.django_db(databases=["default", "sqlite"], transaction=True)

LONG = "k" * 500
ODD = "a:b {c} d}{"


@pytest.mark.parametrize("pk", [LONG, ODD, LONG + ODD], ids=["long", "colon-braces-spaces", "long-and-odd"])
def test_any_string_primary_key_transitions_and_fences(db_alias, pk):
    account = KeyedAccount.objects.using(db_alias).create(key=pk)
    account.machine.deposit(amount=2)
    with object_lock(account) as lease:
        with transaction.atomic(using=db_alias):
            lease.fence(db_alias)
            KeyedAccount.objects.using(db_alias).filter(pk=pk).update(balance=7)
        account.machine.deposit()
    row = KeyedAccount.objects.using(db_alias).get(pk=pk)
    assert (row.balance, row.deposits) == (8, 2)
    mark = FencingMark.objects.using(db_alias).get(pk=stored_key(object_key(account)))
    assert mark.token == lease.fencing_token


def test_uuid_primary_key(db_alias):
    account = UuidAccount.objects.using(db_alias).create()
    account.machine.deposit()
    again = UuidAccount.objects.using(db_alias).get(pk=str(account.pk))
    assert object_key(again) == object_key(account)
    again.machine.deposit()
    assert UuidAccount.objects.using(db_alias).get(pk=account.pk).balance == 2


def test_stored_keys_fit_and_stay_distinct():
    a, b = "x" * 300, "x" * 299 + "y"
    assert len(stored_key(a)) == len(stored_key(b)) == STORED_KEY_LENGTH
    assert stored_key(a) != stored_key(b) and stored_key(a) == stored_key("x" * 300)
    assert stored_key("short") == "short"


def test_one_row_one_key_whatever_form_its_primary_key_is_given_in(db_alias):
    from decimal import Decimal

    from dsm_redis.celery import existing_object_key
    from tests.testapp.models import DecimalAccount

    DecimalAccount.objects.using(db_alias).create(number=Decimal("1.00"))
    keys = {existing_object_key(DecimalAccount, pk, db_alias) for pk in ("1", "1.0", Decimal("1.00"), 1)}
    assert keys == {object_key(DecimalAccount.objects.using(db_alias).get())}
    assert existing_object_key(DecimalAccount, "2.0", db_alias) is None


def test_a_locked_task_for_a_missing_row_takes_no_lease_and_leaves_nothing_in_redis(db_alias, redis):
    from django.conf import settings

    from dsm_redis.celery import locked_task
    from dsm_redis.keys import counter_key

    ran = []
    body = locked_task(KeyedAccount, pk_arg="pk", using=db_alias)(lambda pk: ran.append(pk))
    assert body(pk="no such row") is None
    assert ran == []
    prefix = settings.DSM_REDIS["OPTIONS"]["KEY_PREFIX"]
    assert not redis.exists(counter_key(prefix, object_key(KeyedAccount, "no such row")))
