"""Running ``avdiag`` in-process as a shell would, and reading what it printed.

``run_cli`` calls :func:`avdiag.cli.main` with the warning filters a plain ``python -m avdiag`` run
starts with, captures stdout and stderr itself (so it also works where pytest's ``capsys`` cannot, as
inside hypothesis tests), and writes the warnings a real run would show onto the captured stderr.
``main`` must return its exit code, never raise ``SystemExit``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ERROR_PREFIX = "avdiag: error: "


def strict_json(text: str) -> Any:
    """One JSON document; NaN / Infinity literals (not JSON, though Python writes them) are refused."""
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


@dataclass(frozen=True)
class CliRun:
    """One finished command: its argv, exit code and captured output."""

    argv: tuple[str, ...]
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"avdiag {' '.join(self.argv)} -> exit {self.code}\nstdout: {self.out[-2000:]!r}\nstderr: {self.err!r}"

    def ok(self) -> CliRun:
        """Assert exit 0 (stderr shown when not) and return self."""
        assert self.code == 0, str(self)
        return self

    def json(self) -> Any:
        """stdout parsed as exactly one strict JSON document, after asserting exit 0."""
        return strict_json(self.ok().out)

    def error(self, *fragments: str | re.Pattern, code: int = 2) -> str:
        """Assert the one-line error every user error gives: exit ``code``, nothing on stdout, exactly one
        stderr line ``avdiag: error: ...`` that is not an internal error and contains every fragment
        (a string, or a compiled pattern that must match somewhere in the line). Returns the message
        after the prefix."""
        assert self.code == code, str(self)
        assert "Traceback" not in self.err, str(self)
        assert self.out == "", str(self)
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), str(self)
        message = lines[0][len(ERROR_PREFIX):]
        assert message.strip() and not message.startswith("internal error"), str(self)
        for fragment in fragments:
            found = fragment.search(message) if isinstance(fragment, re.Pattern) else fragment in message
            assert found, f"{fragment!r} not in the error line {message!r}"
        return message


def python_default_warning_filters() -> None:
    """The filters a plain ``python -m avdiag`` run starts with."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)


def run_cli(*args: str | Path | int | float) -> CliRun:
    """``avdiag ARGS...`` in-process; every argument is passed as ``str(arg)``."""
    from avdiag.cli import main  # late: collecting a test module must not need the CLI

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with warnings.catch_warnings(record=True) as caught:
            python_default_warning_filters()
            try:
                code = main(argv)
            except SystemExit as exc:
                raise AssertionError(f"main({argv!r}) raised SystemExit({exc.code!r}) instead of returning") from None
        for w in caught:  # a real run prints these on stderr; pytest would swallow them
            err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    return CliRun(tuple(argv), code, out.getvalue(), err.getvalue())
