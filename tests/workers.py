"""Functions that run inside worker processes (see ``procs.py``). Django is set up before they are
imported, so model imports happen inside the functions' modules lazily."""

from __future__ import annotations

import time
from typing import Any


def cowboy_deposit(index: int, account_ids: int | list[int], rounds: int, work: float) -> dict[str, int]:
    """deus-state-machina's "cowboy" code: read, check, modify, save — no lock. Several accounts
    are visited in the same order as ``dsm_deposit`` visits them."""
    from tests.testapp.models import Account

    ids = account_ids if isinstance(account_ids, list) else [account_ids]
    committed = 0
    for i in range(rounds):
        account = Account.objects.get(pk=ids[(index + i) % len(ids)])
        if account.state == "open":
            balance = account.balance
            time.sleep(work)
            account.balance = balance + 1
            account.deposits += 1
            account.save()
            committed += 1
    return {"committed": committed}


def dsm_deposit(
    index: int, account_ids: list[int], rounds: int, work: float, model: str = "testapp.Account"
) -> dict[str, Any]:
    """The same work through dsm_redis; retries only when the lock backend is unavailable."""
    import redis
    from django.apps import apps
    from django.conf import settings

    from dsm_redis import LockBackendUnavailable, LockLost, StaleFencingToken

    Account = apps.get_model(model)

    effects = redis.Redis.from_url(settings.REDIS_URL)
    reanchors = _count_log_records("re-anchored")
    committed: list[int] = []
    unavailable = refused = 0
    for i in range(rounds):
        account_id = account_ids[(index + i) % len(account_ids)]
        account = Account.objects.get(pk=account_id)
        while True:
            try:
                effect_key = f"effects:{settings.DSM_REDIS['OPTIONS']['KEY_PREFIX']}:{account_id}"
                account.machine.deposit(amount=1, work=work, effect=lambda key=effect_key: effects.incr(key))
                break
            except LockBackendUnavailable:
                unavailable += 1  # Redis down or restarting: nothing was written, try again
                time.sleep(0.05)
            except (StaleFencingToken, LockLost):
                refused += 1  # our lease died with the old Redis: nothing was committed, try again
        committed.append(account_id)
    return {
        "committed": len(committed),
        "per_account": committed,
        "unavailable": unavailable,
        "refused": refused,
        "reanchored": reanchors.count,
    }


class _Counter:
    def __init__(self) -> None:
        self.count = 0


def _count_log_records(needle: str) -> _Counter:
    import logging

    counter = _Counter()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if needle in record.getMessage():
                counter.count += 1

    logging.getLogger("dsm_redis").addHandler(Handler(logging.WARNING))
    return counter


def cowboy_switch(index: int, switch_id: int, rounds: int) -> dict[str, int]:
    """Turn a switch on if it is off, cowboy style: two racers may both "turn it on"."""
    from tests.testapp.models import Switch

    turned_on = 0
    for _ in range(rounds):
        switch = Switch.objects.get(pk=switch_id)
        if switch.state == "off":
            time.sleep(0.002)
            switch.state = "on"
            switch.flips += 1
            switch.save()
            turned_on += 1
        else:
            switch.state = "off"
            switch.flips += 1
            switch.save()
    return {"flips": rounds}


def dsm_switch(index: int, switch_id: int, rounds: int) -> dict[str, int]:
    from dsm_redis import TransitionException
    from tests.testapp.models import Switch

    flips = refused = 0
    for _ in range(rounds):
        switch = Switch.objects.get(pk=switch_id)
        try:
            if switch.state == "off":
                switch.machine.turn_on()
            else:
                switch.machine.turn_off()
            flips += 1
        except TransitionException:
            refused += 1  # the row moved on since we read it: refused, nothing written
    return {"flips": flips, "refused": refused}


def hold_across_two_transitions(inbox: Any, outbox: Any, account_id: int, model: str = "testapp.Account") -> str:
    """Deposit 1 under object_lock, report, wait to be told to go on, then try to deposit 100."""
    from django.apps import apps

    from dsm_redis import LockError, object_lock

    account = apps.get_model(model).objects.get(pk=account_id)
    with object_lock(account) as lease:
        account.machine.deposit(amount=1)
        outbox.put(("ok", lease.fencing_token))
        inbox.get(timeout=120)  # the test SIGSTOPs us here, past our TTL, then lets us go on
        try:
            account.machine.deposit(amount=100)
        except LockError as exc:
            return type(exc).__name__
    return "committed"


def hold_forever(inbox: Any, outbox: Any, account_id: int, model: str = "testapp.Account") -> None:
    """Take the object's lease and never give it back (the test SIGKILLs us)."""
    from django.apps import apps

    from dsm_redis import object_lock

    with object_lock(apps.get_model(model).objects.get(pk=account_id)) as lease:
        outbox.put(("ok", lease.fencing_token))
        inbox.get(timeout=300)
