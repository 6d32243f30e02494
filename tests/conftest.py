"""Shared test set-up: one torch thread, the in-process CLI runner and the AV checkpoint builder.

The helpers live in tests/helpers/ so that module-scoped fixtures and hypothesis tests, which cannot
take a function-scoped fixture, use the same code: ``from helpers.cli import run_cli`` and
``from helpers.checkpoints import write_av_checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from helpers.checkpoints import AVCheckpoint, write_av_checkpoint
from helpers.cli import run_cli


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The models in the tests are tiny: one thread avoids OpenMP overhead on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli() -> Callable[..., object]:
    """``cli("inspect", path, "--json", "-")`` runs avdiag in-process and returns a
    :class:`helpers.cli.CliRun` (``.code``, ``.out``, ``.err``, ``.json()``, ``.ok()``, ``.error(...)``)."""
    return run_cli


@pytest.fixture
def av_checkpoint(tmp_path) -> Callable[..., AVCheckpoint]:
    """``av_checkpoint("best_model.pth", "mmpareto", planted=True)`` writes a research-layout checkpoint
    under this test's tmp_path (options of :func:`helpers.checkpoints.write_av_checkpoint`)."""
    def build(name: str = "model.pt", arch: str = "ogm-ge", **options) -> AVCheckpoint:
        return write_av_checkpoint(tmp_path / name, arch, **options)

    return build
