"""The nemesis's history checker on small hand-made histories: valid ones pass, and each rule
catches the violation it exists for. No servers, no Django database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dsm_redis.tools.nemesis.checker import check, linearizable, main
from dsm_redis.tools.nemesis.history import assemble, write_history

EDGES = [["a", "b"], ["b", "c"], ["c", "a"], ["a", "a"], ["b", "b"], ["c", "c"]]


class Builder:
    """Events of one object (pk 1) starting at ("a", 0); ``journal`` in commit order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = [{"type": "header", "initial": {"1": ["a", 0]}, "edges": EDGES}]
        self.journal_id = 0

    def op(
        self,
        op: str,
        call: int,
        ret: int | None,
        before: tuple[str, int],
        after: tuple[str, int],
        *,
        outcome: str = "ok",
        committed: bool | None = None,
        token: int | None = None,
        owner: str = "",
        step: int = 0,
        journal: bool | None = None,
    ) -> Builder:
        """One write. ``committed`` (default: outcome == ok) adds the commit event; ``journal``
        (default: committed) adds the journal entry."""
        committed = outcome == "ok" if committed is None else committed
        journal = committed if journal is None else journal
        if step == 0:
            self.events.append({"type": "invoke", "op": op, "obj": 1, "f": "edge", "t": call})
        self.events.append(
            {"type": "write", "op": op, "step": step, "from": list(before), "to": list(after),
             "token": token, "owner": owner, "t": call + 1}
        )  # fmt: skip
        if committed:
            assert ret is not None
            self.events.append({"type": "commit", "op": op, "step": step, "t": ret})
        if ret is not None and outcome != "info":
            self.events.append({"type": "complete", "op": op, "outcome": outcome, "t": ret + 1})
        if journal:
            self.entry(op, before, after, token=token, owner=owner, step=step)
        return self

    def entry(
        self, op: str, before: tuple[str, int], after: tuple[str, int], *, token: int | None = None,
        owner: str = "", step: int = 0,
    ) -> Builder:  # fmt: skip
        self.journal_id += 1
        self.events.append(
            {"type": "journal", "id": self.journal_id, "obj": 1, "op": op, "step": step,
             "from": list(before), "to": list(after), "token": token, "owner": owner}
        )  # fmt: skip
        return self

    def final(self, value: tuple[str, int]) -> Builder:
        self.events.append({"type": "final", "obj": 1, "value": list(value)})
        return self

    def rules(self) -> list[str]:
        return sorted({v.rule for v in check(assemble(self.events)).violations})


def sequential() -> Builder:
    return (
        Builder()
        .op("w0.0", 10, 20, ("a", 0), ("b", 1), token=1, owner="x")
        .op("w1.0", 30, 40, ("b", 1), ("b", 3), token=2, owner="y")
        .op("w0.1", 50, 60, ("b", 3), ("c", 4), token=3, owner="z")
        .final(("c", 4))
    )


def test_a_sequential_history_is_clean():
    verdict = check(assemble(sequential().events))
    assert verdict.clean, verdict.violations
    assert verdict.journal_entries == 3


def test_concurrent_writes_may_commit_in_either_order():
    b = (
        Builder()
        .op("w0.0", 10, 50, ("b", 1), ("b", 2), token=2, owner="y", journal=False)
        .op("w1.0", 11, 40, ("a", 0), ("b", 1), token=1, owner="x", journal=False)
    )
    b.entry("w1.0", ("a", 0), ("b", 1), token=1, owner="x").entry("w0.0", ("b", 1), ("b", 2), token=2, owner="y")
    assert b.final(("b", 2)).rules() == []


def test_info_writes_may_or_may_not_have_committed():
    committed = Builder().op("w0.0", 10, None, ("a", 0), ("b", 1), outcome="info", journal=True)
    committed.op("w1.0", 30, 40, ("b", 1), ("b", 2)).final(("b", 2))
    assert committed.rules() == []
    lost = Builder().op("w0.0", 10, None, ("a", 0), ("b", 1), outcome="info", journal=False)
    lost.op("w1.0", 30, 40, ("a", 0), ("a", 2)).final(("a", 2))
    assert lost.rules() == []


def test_failed_writes_without_journal_entries_are_fine():
    b = Builder().op("w0.0", 10, 20, ("a", 0), ("b", 1), outcome="fail").op("w1.0", 30, 40, ("a", 0), ("a", 1))
    assert b.final(("a", 1)).rules() == []


# -- (a) ------------------------------------------------------------------------------------------


def test_a_an_ok_write_missing_from_the_journal():
    b = Builder().op("w0.0", 10, 20, ("a", 0), ("b", 1), journal=False).final(("a", 0))
    assert "a" in b.rules()


def test_a_an_ok_write_journaled_twice():
    b = Builder().op("w0.0", 10, 20, ("a", 0), ("a", 1)).entry("w0.0", ("a", 1), ("a", 1)).final(("a", 1))
    assert "a" in b.rules()


def test_a_a_failed_write_that_committed():
    b = Builder().op("w0.0", 10, 20, ("a", 0), ("b", 1), outcome="fail", journal=True).final(("b", 1))
    assert b.rules() == ["a"]


def test_a_a_journal_entry_no_operation_wrote():
    b = sequential()
    b.entry("ghost.0", ("c", 4), ("c", 5))
    b.events[-2:] = [b.events[-1], {"type": "final", "obj": 1, "value": ["c", 5]}]
    assert b.rules() == ["a"]


# -- (b) ------------------------------------------------------------------------------------------


def test_b_a_lost_update():
    # Both read (a, 0); the second commit overwrites the first: the journal chain breaks.
    b = (
        Builder()
        .op("w0.0", 10, 30, ("a", 0), ("b", 1), token=1, owner="x")
        .op("w1.0", 11, 40, ("a", 0), ("a", 5), token=2, owner="y")
        .final(("a", 5))
    )
    assert "b" in b.rules()


def test_b_an_edge_the_machine_does_not_have():
    b = Builder().op("w0.0", 10, 20, ("a", 0), ("c", 1)).final(("c", 1))
    assert b.rules() == ["b"]


def test_b_a_final_row_that_is_not_the_replay():
    b = sequential()
    b.events[-1] = {"type": "final", "obj": 1, "value": ["c", 99]}
    assert b.rules() == ["b"]


# -- (c) ------------------------------------------------------------------------------------------


def test_c_a_token_that_goes_down():
    b = (
        Builder()
        .op("w0.0", 10, 20, ("a", 0), ("b", 1), token=5, owner="x")
        .op("w1.0", 30, 40, ("b", 1), ("c", 2), token=4, owner="y")
        .final(("c", 2))
    )
    assert b.rules() == ["c"]


def test_c_an_equal_token_from_one_lease_is_fine_from_two_is_not():
    one = (
        Builder()
        .op("w0.0", 10, 20, ("a", 0), ("b", 1), token=5, owner="x")
        .op("w0.0", 10, 30, ("b", 1), ("c", 2), token=5, owner="x", step=1)
        .final(("c", 2))
    )
    assert one.rules() == []
    two = (
        Builder()
        .op("w0.0", 10, 20, ("a", 0), ("b", 1), token=5, owner="x")
        .op("w1.0", 30, 40, ("b", 1), ("c", 2), token=5, owner="y")
        .final(("c", 2))
    )
    assert two.rules() == ["c"]


def test_c_cowboy_entries_without_tokens_are_not_judged():
    b = Builder().op("w0.0", 10, 20, ("a", 0), ("b", 1)).op("w1.0", 30, 40, ("b", 1), ("c", 2)).final(("c", 2))
    assert b.rules() == []


# -- (d) ------------------------------------------------------------------------------------------


def test_d_the_journal_order_against_real_time():
    # w1.0 completed (t=20) before w0.0 was invoked (t=30), but committed after it.
    b = (
        Builder()
        .op("w1.0", 10, 20, ("b", 1), ("b", 2), journal=False)
        .op("w0.0", 30, 40, ("a", 0), ("b", 1), journal=False)
    )
    b.entry("w0.0", ("a", 0), ("b", 1)).entry("w1.0", ("b", 1), ("b", 2)).final(("b", 2))
    assert b.rules() == ["d"]


def test_d_a_stale_read_is_not_linearizable():
    # w1.0 starts after w0.0 completed, yet read the value from before it. The journal is
    # (falsely) consistent, which only the history-side search can notice.
    b = Builder().op("w0.0", 10, 20, ("a", 0), ("b", 1), journal=False)
    b.op("w1.0", 30, 40, ("a", 0), ("b", 2), journal=False)
    b.entry("w0.0", ("a", 0), ("b", 1)).entry("w1.0", ("b", 1), ("b", 2)).final(("b", 2))
    verdict = check(assemble(b.events))
    assert [v.rule for v in verdict.violations] == ["d"]
    assert "not linearizable" in verdict.violations[0].message


def test_d_linearizable_search_backtracks_over_info_writes():
    ops = assemble(
        Builder()
        .op("i.0", 5, None, ("a", 0), ("a", 9), outcome="info", journal=False)
        .op("w0.0", 10, 50, ("a", 0), ("b", 1), journal=False)
        .op("w1.0", 12, 60, ("b", 1), ("c", 2), journal=False)
        .events
    ).ops
    assert linearizable(ops, ("a", 0)) is True
    assert linearizable(ops, ("b", 1)) is False


def test_d_the_search_is_bounded_and_says_undecided():
    # Many concurrent info writes with interchangeable values: exponential without a bound.
    b = Builder()
    for i in range(18):
        b.op(f"i{i}.0", 1, None, ("a", 0), ("a", 0), outcome="info", journal=False)
    b.op("w.0", 2, 100, ("b", 5), ("b", 6), journal=False)
    ops = assemble(b.events).ops
    assert linearizable(ops, ("a", 0), deadline=0.0) is None


def test_the_command_line_judges_a_saved_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    clean, dirty = tmp_path / "clean.jsonl", tmp_path / "dirty.jsonl"
    write_history(clean, sequential().events)
    events = sequential().events
    events[-1] = {"type": "final", "obj": 1, "value": ["c", 99]}
    write_history(dirty, events)
    assert main([str(clean)]) == 0
    assert "clean" in capsys.readouterr().out
    assert main([str(dirty)]) == 1
    assert "(b) object 1" in capsys.readouterr().out
    assert json.loads(clean.read_text().splitlines()[0])["type"] == "header"
