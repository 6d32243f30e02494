"""How a long-running step reports progress, without knowing who draws it.

A :data:`ProgressFactory` is called as ``factory(total, label)`` and returns a context manager that
yields ``advance(n)``. The library defaults to :func:`no_progress`; the CLI passes the one from
``avdiag.report.progress`` (a bar on a terminal, periodic lines otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

Advance = Callable[[int], None]
ProgressFactory = Callable[[int, str], AbstractContextManager[Advance]]


@contextmanager
def no_progress(total: int, label: str) -> Iterator[Advance]:
    """Report nothing."""
    yield lambda n: None
