"""The history of a nemesis run: what every operation did, as its worker saw it, plus the journal.

Owns the event format (JSON lines, one object per line), the writer a worker appends with, and
``load``/``assemble``, which turn a saved history into per-object register operations for the
checker. A saved history is self-contained: header, worker events, faults, the journal and the
final rows, so ``python -m dsm_redis.tools.nemesis.checker HISTORY`` can judge it later, anywhere.

Events (``t`` is ``time.monotonic_ns()``: one clock for every process of the machine):

- ``header``   ``seed``, ``contender``, ``initial`` {obj: [state, balance]}, ``edges`` [[from, to]], options
- ``invoke``   ``op``, ``obj``, ``f`` (what the operation is), ``worker``, ``t``: written before it starts
- ``write``    ``op``, ``step``, ``from``, ``to``, ``token``, ``owner``, ``t``: written in the write's
               transaction, before the journal row, i.e. before the commit
- ``commit``   ``op``, ``step``, ``t``: written after that transaction committed (on-commit hook)
- ``complete`` ``op``, ``outcome`` (ok | fail | info), ``error``, ``t``
- ``fault``    ``kind``, ``phase`` (start | end), ``detail``, ``t``
- ``journal``  ``id``, ``obj``, ``op``, ``step``, ``from``, ``to``, ``token``, ``owner``
- ``final``    ``obj``, ``value``: the row at the end of the run

Limits: a worker killed between a commit and its ``commit`` event leaves that step *info*; an
operation with no ``complete`` event (its worker died) is info. Lines are appended with one
``write(2)`` each, so a killed worker leaves whole lines behind (a torn last line is skipped).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OK, FAIL, INFO = "ok", "fail", "info"
Value = tuple[str, int]


class HistoryWriter:
    """Appends events to one file, one ``write(2)`` per line (safe across SIGKILL)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, type: str, **fields: Any) -> None:
        fields.setdefault("t", time.monotonic_ns())
        line = json.dumps({"type": type, **fields}, separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        os.close(self._fd)


def read_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The events of one file; a torn (unterminated or unparsable) line is skipped."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event


def write_history(path: str | os.PathLike[str], events: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event, separators=(",", ":")) + "\n")


@dataclass(frozen=True)
class RegisterOp:
    """One write (one committed-or-not transaction) on one object's register ``(state, balance)``.

    ``ret`` is None when the outcome is unknown (info): such an op may or may not have happened.
    """

    key: str  # "<op>/<step>"
    obj: int
    f: str
    call: int
    ret: int | None
    outcome: str
    before: Value | None
    after: Value | None
    token: int | None = None
    owner: str = ""


@dataclass(frozen=True)
class JournalEntry:
    id: int
    obj: int
    key: str
    before: Value
    after: Value
    token: int | None
    owner: str


@dataclass
class History:
    header: dict[str, Any]
    ops: list[RegisterOp]
    outcomes: dict[str, str]  # top-level operation -> outcome (for the report)
    journal: list[JournalEntry]
    final: dict[int, Value]
    faults: list[dict[str, Any]] = field(default_factory=list)
    functions: dict[str, str] = field(default_factory=dict)  # op -> f

    @property
    def initial(self) -> dict[int, Value]:
        return {int(k): _value(v) for k, v in self.header.get("initial", {}).items()}

    @property
    def edges(self) -> set[tuple[str, str]] | None:
        edges = self.header.get("edges")
        return None if edges is None else {(a, b) for a, b in edges}


def _value(v: Any) -> Value:
    return (str(v[0]), int(v[1]))


def step_key(op: str, step: int) -> str:
    return f"{op}/{step}"


def assemble(events: Iterable[dict[str, Any]]) -> History:
    """Group events by operation and split each into its writes (register ops)."""
    header: dict[str, Any] = {}
    invokes: dict[str, dict[str, Any]] = {}
    writes: dict[str, dict[int, dict[str, Any]]] = {}
    commits: dict[str, dict[int, int]] = {}
    completes: dict[str, dict[str, Any]] = {}
    journal: list[JournalEntry] = []
    final: dict[int, Value] = {}
    faults: list[dict[str, Any]] = []
    for e in events:
        kind = e.get("type")
        if kind == "header":
            header = e
        elif kind == "invoke":
            invokes[e["op"]] = e
        elif kind == "write":
            writes.setdefault(e["op"], {})[int(e["step"])] = e
        elif kind == "commit":
            commits.setdefault(e["op"], {})[int(e["step"])] = int(e["t"])
        elif kind == "complete":
            completes[e["op"]] = e
        elif kind == "journal":
            journal.append(
                JournalEntry(
                    int(e["id"]), int(e["obj"]), step_key(e["op"], int(e["step"])),
                    _value(e["from"]), _value(e["to"]), e.get("token"), e.get("owner") or "",
                )
            )  # fmt: skip
        elif kind == "final":
            final[int(e["obj"])] = _value(e["value"])
        elif kind == "fault":
            faults.append(e)
    ops: list[RegisterOp] = []
    outcomes: dict[str, str] = {}
    for op, invoke in invokes.items():
        complete = completes.get(op)
        outcome = complete["outcome"] if complete is not None else INFO
        outcomes[op] = outcome
        steps = writes.get(op, {})
        done = commits.get(op, {})
        call = int(invoke["t"])
        for step in sorted(steps):
            w = steps[step]
            start = max([call, *(t for s, t in done.items() if s < step)])
            if step in done:
                ret: int | None = done[step]
                status = OK
            elif outcome == FAIL and complete is not None:
                ret, status = int(complete["t"]), FAIL  # the worker saw an error that commits nothing
            else:
                ret, status = None, INFO
            ops.append(
                RegisterOp(
                    step_key(op, step), int(invoke["obj"]), str(invoke.get("f", "")), start, ret, status,
                    _value(w["from"]), _value(w["to"]), w.get("token"), w.get("owner") or "",
                )
            )  # fmt: skip
    journal.sort(key=lambda j: j.id)
    functions = {op: str(e.get("f", "")) for op, e in invokes.items()}
    return History(header, ops, outcomes, journal, final, faults, functions)


def load(path: str | os.PathLike[str]) -> History:
    return assemble(read_events(Path(path)))
