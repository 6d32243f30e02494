"""Errors that the CLI turns into one line on stderr and a documented exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2


class AvdiagError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""

    exit_code = EXIT_ERROR


class UsageError(AvdiagError):
    """Bad arguments or options."""


class UnreadableCheckpointError(AvdiagError):
    """The file is missing, truncated, corrupt, or not a checkpoint format avdiag reads."""


class LfsPointerError(UnreadableCheckpointError):
    """A Git LFS pointer file stands where the weights should be."""


class UnsafeCheckpointError(AvdiagError):
    """The pickle references globals outside the weights-only allow-list."""

    def __init__(self, message: str, unsafe_globals: list[str]):
        super().__init__(message)
        self.unsafe_globals = list(unsafe_globals)


class NothingToAnalyseError(AvdiagError):
    """The checkpoint holds no tensors at all."""
