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
