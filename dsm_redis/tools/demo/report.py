"""What the demo prints: a progress indicator on stderr while a contender races, then the table and
a plain-words summary on stdout.

The progress bar is redrawn in place only when stderr is a terminal; otherwise (CI logs, pipes)
each contender gets one line when it starts and one when it ends.
"""

from __future__ import annotations

import textwrap
import time
from dataclasses import dataclass
from typing import TextIO

BAR_WIDTH = 30
REDRAW_EVERY = 0.1  # seconds


@dataclass(frozen=True)
class Result:
    """One contender's run: the workers' own counts plus what the database holds afterwards."""

    contender: str
    attempted: int
    committed: int
    refused: int
    gave_up: int
    deposits: int  # deposits the code reported as committed
    lost: int  # committed deposits missing from the balances
    illegal: int  # charges or bills beyond the first per period: forbidden transitions
    seconds: float


def status(stream: TextIO, message: str) -> None:
    """A one-off status line on stderr (starting servers, cleaning up)."""
    print(message, file=stream, flush=True)


class Progress:
    """``cowboy     [##########----------]  320/800 rounds  2.1s`` on a terminal."""

    def __init__(self, stream: TextIO, label: str, total: int) -> None:
        self.stream = stream
        self.label = label
        self.total = max(total, 1)
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._drawn = 0.0

    def start(self) -> None:
        self.started = time.monotonic()
        if self.tty:
            self._draw(0)
        else:
            status(self.stream, f"{self.label}: racing ({self.total} rounds in all)...")

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.tty and now - self._drawn >= REDRAW_EVERY:
            self._drawn = now
            self._draw(done)

    def finish(self, seconds: float) -> None:
        if self.tty:
            self._draw(self.total)
            self.stream.write("\n")
            self.stream.flush()
        else:
            status(self.stream, f"{self.label}: done in {seconds:.1f}s")

    def _draw(self, done: int) -> None:
        filled = BAR_WIDTH * min(done, self.total) // self.total
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        elapsed = time.monotonic() - self.started
        width = len(str(self.total))
        self.stream.write(f"\r{self.label:<10} [{bar}] {done:>{width}}/{self.total} rounds {elapsed:5.1f}s")
        self.stream.flush()


HEADER = ("contender", "attempted", "committed", "refused", "lost updates", "illegal transitions", "time")


def table(results: list[Result]) -> str:
    """The side-by-side table, one row per contender."""
    rows = [HEADER] + [
        (
            r.contender,
            str(r.attempted),
            str(r.committed),
            str(r.refused),
            str(r.lost),
            str(r.illegal),
            f"{r.seconds:.1f}s",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def summary(results: list[Result]) -> list[str]:
    """Plain words for the numbers, claiming nothing the numbers do not show (one paragraph each)."""
    lines = [_describe(r) for r in results]
    by_name = {r.contender: r for r in results}
    cowboy, dsm = by_name.get("cowboy"), by_name.get("dsm_redis")
    if cowboy is not None and dsm is not None and cowboy.seconds > 0:
        lines.append(
            f"Time: dsm_redis took {dsm.seconds / cowboy.seconds:.1f}x as long as cowboy for the "
            "same rounds: each of its transitions holds the subscription's lease and row lock, so "
            "racers for one subscription take turns."
        )
    return [textwrap.fill(line, width=100, subsequent_indent="  ") for line in lines]


def _describe(r: Result) -> str:
    protected = r.contender != "cowboy"
    if r.lost or r.illegal:
        text = (
            f"{r.contender}: {r.lost} of its {r.deposits} committed deposits are missing from the "
            f"balances (lost updates), and {r.illegal} times a period was charged or billed again "
            "(illegal transitions: paid -> paid, due -> due)."
        )
        if protected:
            text += " dsm_redis should never do this: please report it as a bug."
        return text
    if not protected:
        return f"{r.contender}: lost nothing this time (races depend on timing); try more --processes or --rounds."
    text = (
        f"{r.contender}: all {r.deposits} committed deposits are in the balances and no period was "
        f"charged or billed twice; {r.refused} payments or bills were refused because the "
        "subscription had moved on since it was read (nothing was written for them)."
    )
    if r.gave_up:
        text += f" {r.gave_up} transitions gave up waiting for a lock (nothing written)."
    return text
