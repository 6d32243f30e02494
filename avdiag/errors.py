"""Every error avdiag raises on bad input, in one place; the CLI turns each into one line on stderr
and the exit code it carries (0 analysed, 1 policy violations, 2 unreadable / refused / usage error)."""

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


class DataError(AvdiagError):
    """A dataset that is missing, malformed or unsafe; the message is one line naming what and where."""


class ModelError(AvdiagError):
    """The model behind a checkpoint could not be built, loaded or run on the data."""


class VerificationError(AvdiagError):
    """A rewritten checkpoint does not hold what was intended (nothing is written)."""
