"""The history checker: judges a nemesis history, per object, against four rules.

(a) **journal vs outcomes** — every ok write is in the journal exactly once, no failed write is,
    info writes may or may not be, and nothing is in the journal that no operation wrote.
(b) **a chain of states** — each journal entry starts from the value the previous one ended in
    (no lost update, no double transition; the first starts from the initial row), each changes the
    state along an edge of the machine when the history names the edges, and the final row equals
    the journal's replay (balance included).
(c) **fencing tokens** — along the journal, a token never goes down, and an *equal* token is
    accepted only from the same lease (same owner): one lease may write in several transactions
    (``transition_through``'s steps, ``object_lock``'s transactions), two leases never share a token
    at the database. Entries without a token (the cowboy contender) are not judged by this rule.
(d) **real time** — the journal order respects real time (a write whose operation completed before
    another's was invoked comes first), and the history alone is linearizable as a register: a
    Wing-Gong search (with Lowe's memoisation) for an order of the writes, consistent with real time,
    in which each write reads the value the previous one wrote; ok writes must be in it, info writes
    may be in or out, failed writes are out. The search is bounded in time: when the budget runs
    out the object is reported *undecided*, never hung on.

Usable on any saved history: ``python -m dsm_redis.tools.nemesis.checker HISTORY.jsonl``. Limits: rule
(d)'s search is exponential in the worst case (many concurrent info writes with equal values); the
values of the nemesis (a balance that only grows) keep it near-linear in practice.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .history import FAIL, INFO, OK, History, JournalEntry, RegisterOp, Value, load

DEFAULT_BUDGET = 30.0  # seconds for the linearizability search, over all objects


@dataclass(frozen=True)
class Violation:
    rule: str  # "a" .. "d"
    obj: int
    message: str
    keys: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"({self.rule}) object {self.obj}: {self.message}"


@dataclass
class Verdict:
    violations: list[Violation] = field(default_factory=list)
    undecided: list[int] = field(default_factory=list)  # objects whose search ran out of budget
    checked_objects: int = 0
    journal_entries: int = 0

    @property
    def clean(self) -> bool:
        return not self.violations and not self.undecided

    def summary(self) -> str:
        if self.clean:
            return f"clean: {self.checked_objects} objects, {self.journal_entries} journal entries, rules a-d hold"
        parts = []
        if self.violations:
            by_rule: dict[str, int] = defaultdict(int)
            for v in self.violations:
                by_rule[v.rule] += 1
            parts.append(
                f"{len(self.violations)} violations ("
                + ", ".join(f"{r}: {n}" for r, n in sorted(by_rule.items()))
                + ")"
            )
        if self.undecided:
            parts.append(f"undecided for objects {self.undecided} (linearizability search budget exhausted)")
        return "; ".join(parts)


def check(history: History, *, budget: float = DEFAULT_BUDGET) -> Verdict:
    verdict = Verdict()
    ops_by_obj: dict[int, list[RegisterOp]] = defaultdict(list)
    for op in history.ops:
        ops_by_obj[op.obj].append(op)
    journal_by_obj: dict[int, list[JournalEntry]] = defaultdict(list)
    for entry in history.journal:
        journal_by_obj[entry.obj].append(entry)
    initial = history.initial
    objects = sorted(set(initial) | set(ops_by_obj) | set(journal_by_obj) | set(history.final))
    deadline = time.monotonic() + budget
    for obj in objects:
        ops, journal = ops_by_obj.get(obj, []), journal_by_obj.get(obj, [])
        verdict.checked_objects += 1
        verdict.journal_entries += len(journal)
        start = initial.get(obj)
        verdict.violations += check_journal(obj, ops, journal)
        verdict.violations += check_chain(obj, journal, start, history.final.get(obj), history.edges)
        verdict.violations += check_tokens(obj, journal)
        verdict.violations += check_real_time(obj, ops, journal)
        if start is None:
            verdict.violations.append(Violation("b", obj, "the history has no initial value for this object"))
            continue
        result = linearizable(ops, start, deadline=deadline)
        if result is None:
            verdict.undecided.append(obj)
        elif not result:
            verdict.violations.append(
                Violation("d", obj, "not linearizable: no order of its writes, consistent with real time, "
                          "chains each write's read to the previous write")
            )  # fmt: skip
    return verdict


# -- (a) ----------------------------------------------------------------------------------------


def check_journal(obj: int, ops: Sequence[RegisterOp], journal: Sequence[JournalEntry]) -> list[Violation]:
    found: dict[str, int] = defaultdict(int)
    for entry in journal:
        found[entry.key] += 1
    known = {op.key: op for op in ops}
    out = []
    for op in ops:
        n = found.get(op.key, 0)
        if op.outcome == OK and n != 1:
            out.append(Violation("a", obj, f"ok write {op.key} is in the journal {n} times (expected once)", (op.key,)))
        elif op.outcome == FAIL and n:
            out.append(Violation("a", obj, f"failed write {op.key} committed ({n} journal entries)", (op.key,)))
        elif op.outcome == INFO and n > 1:
            out.append(Violation("a", obj, f"info write {op.key} is in the journal {n} times", (op.key,)))
    for key, n in found.items():
        if key not in known:
            out.append(Violation("a", obj, f"journal entry {key} ({n}x) matches no write in the history", (key,)))
    return out


# -- (b) ----------------------------------------------------------------------------------------


def check_chain(
    obj: int,
    journal: Sequence[JournalEntry],
    initial: Value | None,
    final: Value | None,
    edges: set[tuple[str, str]] | None,
) -> list[Violation]:
    out = []
    current = initial
    previous = "the initial row"
    for entry in journal:
        if current is not None and entry.before != current:
            out.append(
                Violation(
                    "b", obj,
                    f"journal entry {entry.id} ({entry.key}) read {_show(entry.before)} but {previous} left "
                    f"{_show(current)}: a lost update (or a write from a stale read)",
                    (entry.key,),
                )
            )  # fmt: skip
        if edges is not None and (entry.before[0], entry.after[0]) not in edges:
            out.append(
                Violation("b", obj, f"journal entry {entry.id} ({entry.key}) moved {entry.before[0]} -> "
                          f"{entry.after[0]}: not an edge of the machine", (entry.key,))
            )  # fmt: skip
        current = entry.after
        previous = f"entry {entry.id} ({entry.key})"
    if final is not None and current is not None and final != current:
        out.append(
            Violation("b", obj, f"the final row is {_show(final)} but replaying the journal gives {_show(current)}")
        )
    return out


def _show(value: Value) -> str:
    return f"({value[0]}, {value[1]})"


# -- (c) ----------------------------------------------------------------------------------------


def check_tokens(obj: int, journal: Sequence[JournalEntry]) -> list[Violation]:
    out = []
    last: JournalEntry | None = None
    for entry in journal:
        if entry.token is None:
            continue
        if last is not None and last.token is not None:
            if entry.token < last.token:
                out.append(
                    Violation("c", obj, f"fencing token went down: entry {entry.id} ({entry.key}) committed "
                              f"token {entry.token} after entry {last.id} ({last.key}) committed {last.token}",
                              (last.key, entry.key))
                )  # fmt: skip
            elif entry.token == last.token and entry.owner != last.owner:
                out.append(
                    Violation("c", obj, f"token {entry.token} committed by two leases: entry {last.id} "
                              f"({last.key}) and entry {entry.id} ({entry.key})", (last.key, entry.key))
                )  # fmt: skip
        last = entry
    return out


# -- (d) ----------------------------------------------------------------------------------------


def check_real_time(obj: int, ops: Sequence[RegisterOp], journal: Sequence[JournalEntry]) -> list[Violation]:
    """The journal (commit) order against the history's intervals: if entry j is after entry i in
    the journal, j's write must not have completed before i's was invoked."""
    by_key = {op.key: op for op in ops}
    out = []
    latest: tuple[int, JournalEntry] | None = None  # the latest invocation among earlier entries
    for entry in journal:
        op = by_key.get(entry.key)
        if op is None:
            continue  # rule (a) reports it
        if latest is not None and op.ret is not None and op.ret < latest[0]:
            earlier = latest[1]
            out.append(
                Violation("d", obj, f"journal entry {entry.id} ({entry.key}) completed before entry "
                          f"{earlier.id} ({earlier.key}) was invoked, yet committed after it", (earlier.key, entry.key))
            )  # fmt: skip
        if latest is None or op.call > latest[0]:
            latest = (op.call, entry)
    return out


class _Node:
    __slots__ = ("op", "index", "is_call", "match", "prev", "next")

    def __init__(self, op: RegisterOp, index: int, is_call: bool) -> None:
        self.op = op
        self.index = index
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def linearizable(ops: Sequence[RegisterOp], initial: Value, *, deadline: float | None = None) -> bool | None:
    """Wing & Gong's search with Lowe's cache, on a register whose writes are ``before -> after``.

    True, False, or None when ``deadline`` (``time.monotonic()``) passed first. Failed writes are
    left out; info writes (``ret`` None) have no return event, so they are never *required*: the
    search succeeds once every ok write is linearized.
    """
    candidates = [op for op in ops if op.outcome != FAIL and op.before is not None and op.after is not None]
    events: list[tuple[int, int, _Node]] = []  # (time, 0 for call / 1 for return, node)
    for i, op in enumerate(candidates):
        call = _Node(op, i, True)
        events.append((op.call, 0, call))
        if op.outcome == OK and op.ret is not None:
            ret = _Node(op, i, False)
            call.match, ret.match = ret, call
            events.append((op.ret, 1, ret))
    # At equal times calls sort first: such operations are taken as concurrent (the permissive side).
    events.sort(key=lambda e: (e[0], e[1], e[2].index))
    head = _Node(candidates[0], -1, True) if candidates else None  # sentinel
    if head is None:
        return True
    previous = head
    for _, _, node in events:
        previous.next, node.prev = node, previous
        previous = node

    def lift(node: _Node) -> None:
        assert node.prev is not None
        node.prev.next = node.next
        if node.next is not None:
            node.next.prev = node.prev
        m = node.match
        if m is not None:
            assert m.prev is not None
            m.prev.next = m.next
            if m.next is not None:
                m.next.prev = m.prev

    def unlift(node: _Node) -> None:
        m = node.match
        if m is not None:
            assert m.prev is not None
            m.prev.next = m
            if m.next is not None:
                m.next.prev = m
        assert node.prev is not None
        node.prev.next = node
        if node.next is not None:
            node.next.prev = node

    state = initial
    linearized = 0
    cache: set[tuple[int, Value]] = set()
    stack: list[tuple[_Node, Value]] = []
    entry = head.next
    steps = 0
    while entry is not None:
        steps += 1
        if deadline is not None and steps % 2048 == 0 and time.monotonic() > deadline:
            return None
        if entry.is_call:
            op = entry.op
            if op.before == state:
                assert op.after is not None
                marked = linearized | (1 << entry.index)
                if (marked, op.after) not in cache:
                    cache.add((marked, op.after))
                    stack.append((entry, state))
                    state, linearized = op.after, marked
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # A return whose call is not linearized yet: undo the last choice and try the next one.
            if not stack:
                return False
            node, state = stack.pop()
            linearized &= ~(1 << node.index)
            unlift(node)
            entry = node.next
    return True


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dsm_redis.tools.nemesis.checker", description=__doc__.split("\n\n")[0])
    parser.add_argument("history", help="a history saved by the nemesis (JSON lines)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for rule (d)'s search")
    args = parser.parse_args(argv)
    verdict = check(load(args.history), budget=args.budget)
    for violation in verdict.violations:
        print(violation)
    print(verdict.summary())
    return 0 if verdict.clean else (1 if verdict.violations else 2)


if __name__ == "__main__":
    sys.exit(main())
