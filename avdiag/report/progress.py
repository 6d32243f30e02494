"""Progress on stderr: a transient rich bar on a terminal, periodic plain lines when piped or under a
batch scheduler (so a long run is never silent), nothing when quiet. Every factory here follows
:data:`avdiag.progress.ProgressFactory`."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from avdiag.progress import Advance, ProgressFactory, no_progress

LINE_INTERVAL_S = 10.0


def progress_for(quiet: bool, stream: TextIO | None = None, interval: float = LINE_INTERVAL_S) -> ProgressFactory:
    """The progress a command shows: none with ``quiet``, a bar on a TTY, plain lines otherwise."""
    stream = stream or sys.stderr
    if quiet:
        return no_progress
    if stream.isatty():
        return progress_bar
    return lambda total, label: progress_lines(total, label, stream, interval)


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Advance]:
    """Yield ``advance(n)`` drawing a transient bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def progress_lines(total: int, label: str, stream: TextIO, interval: float = LINE_INTERVAL_S,
                   clock: Callable[[], float] = time.monotonic) -> Iterator[Advance]:
    """Yield ``advance(n)`` writing ``label: done/total (rate/s)`` at most every ``interval`` seconds,
    and once at the end when the run took longer than one interval."""
    start = last = clock()
    done = 0

    def line(now: float) -> None:
        rate = done / (now - start) if now > start else 0.0
        stream.write(f"avdiag: {label}: {done}/{total} ({rate:.1f}/s)\n")
        stream.flush()

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        now = clock()
        if now - last >= interval:
            line(now)
            last = now

    yield advance
    now = clock()
    if now - start >= interval and last != now:
        line(now)
