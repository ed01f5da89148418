"""The fence's inputs as values: the Token, the verdicts, the per-database strategy, the renewer's
weak hold on a lease."""

from __future__ import annotations

import dataclasses
import gc

import pytest
from django.db import connections

from dsm_redis.marks import MarkTable, PostgresMarkTable, SqliteMarkTable, column_value, column_verdict, mark_table
from dsm_redis.renewer import Renewer
from dsm_redis.token import Token


def test_a_token_is_an_immutable_value():
    token = Token("app.m:1", 7, "owner-a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        token.number = 8  # type: ignore[misc]
    again = token.renumbered(9)
    assert (again.key, again.number, again.owner) == ("app.m:1", 9, "owner-a")
    assert token.number == 7
    assert token == Token("app.m:1", 7, "owner-a")


def test_column_verdicts():
    """Accepted (None) when higher, or equal from the same lease; else the mark that refused it."""
    mark = column_value(Token("app.m:1", 5, "a"))
    assert mark == "5:a"
    assert column_verdict(mark, Token("app.m:1", 6, "b")) is None
    assert column_verdict(mark, Token("app.m:1", 5, "a")) is None
    assert column_verdict(mark, Token("app.m:1", 5, "b")) == 5
    assert column_verdict(mark, Token("app.m:1", 4, "a")) == 5
    assert column_verdict("", Token("app.m:1", 1, "a")) is None  # no mark yet


@pytest.mark.parametrize("alias", ["default", "sqlite"])
def test_one_strategy_per_database_chosen_once(alias):
    chosen = mark_table(alias)
    assert mark_table(alias) is chosen
    expected = {"postgresql": PostgresMarkTable, "sqlite": SqliteMarkTable}.get(connections[alias].vendor, MarkTable)
    assert type(chosen) is expected


def test_the_renewer_holds_a_lease_only_weakly():
    ticks: list[str] = []

    class Held:
        key = "app.m:1"
        renew_interval = 3600.0

        def tick(self) -> float | None:
            ticks.append(self.key)
            return None

    renewer = Renewer()
    held = Held()
    renewer.add(held)
    renewer.add(held)  # once, however often added
    assert len(renewer._entries) == 1
    del held
    gc.collect()
    assert len(renewer._entries) == 0  # collected: nothing left to renew
    assert ticks == []
