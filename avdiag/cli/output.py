"""The one output path of every command: JSON (a file or stdout), the HTML/Markdown report, extra files
(JUnit, SARIF, per-sample tables), then the terminal. No output is ever written onto an input, and
every target is checked before the command starts its work."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avdiag.errors import UsageError

STDOUT = "-"


def console():
    """A rich Console on stdout; piped output gets a wide page (120 columns) instead of rich's 80."""
    from rich.console import Console

    return Console(width=shutil.get_terminal_size((120, 40)).columns)


def stderr_line(line: str) -> None:
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def warn_unsafe(unsafe: bool) -> None:
    if unsafe:
        stderr_line("avdiag: WARNING: --unsafe loads with full pickle: code inside the file runs with your rights")


@dataclass
class Outputs:
    """Where a command writes. Construct it first: it refuses bad targets before any work is done."""

    inputs: Iterable[str | Path]
    json_out: str | None = None
    report: Path | None = None
    quiet: bool = False
    files: dict[str, Path | None] = field(default_factory=dict)  # option name -> path (--junit, --samples, ...)

    def __post_init__(self) -> None:
        self.inputs = [Path(p) for p in self.inputs]
        targets = {"--json": None if self.json_out in (None, STDOUT) else Path(self.json_out),
                   "--report": self.report, **self.files}
        for option, path in targets.items():
            if path is not None:
                self._check_target(option, Path(path))

    @property
    def terminal(self) -> bool:
        """Whether the terminal rendering goes to stdout (not when stdout carries the JSON)."""
        return self.json_out != STDOUT

    def protect(self, path: str | Path) -> None:
        """Also refuse to write onto ``path`` (an output of the command itself, e.g. a rewritten checkpoint)."""
        self.inputs.append(Path(path))

    def _check_target(self, option: str, path: Path) -> None:
        if path.is_dir():
            raise UsageError(f"{option} {path}: is a directory")
        for other in self.inputs:
            if path.exists() and other.exists() and path.resolve() == other.resolve():
                raise UsageError(f"{option} {path}: refusing to overwrite an input")

    def emit(self, document: dict[str, Any], render: Callable[[Any], None] | None = None,
             extra: dict[str, str] | None = None, report_document: dict[str, Any] | None = None) -> None:
        """Write the JSON ``document``, the report built from it (or from the fuller ``report_document``),
        the ``extra`` texts (option -> text, for the paths given in ``files``), then ``render(console)``
        unless stdout holds the JSON."""
        for option, text in (extra or {}).items():
            self.write_text(option, self.files[option], text)
        if self.json_out is not None:
            self._write_json(document)
        if self.report is not None:
            self.write_report([report_document or document])
        if render is not None and self.terminal:
            render(console())

    def write_report(self, documents: list[dict[str, Any]]) -> None:
        from avdiag.workflows.report import report

        report(documents, self.report, protect=tuple(self.inputs))

    def write_text(self, option: str, path: Path, text: str) -> None:
        self._check_target(option, path)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise UsageError(f"{option} {path}: cannot write ({e.strerror})") from e

    def write_table(self, option: str, frame) -> None:
        """A pandas table to the .csv or .parquet path given for ``option``."""
        path = self.files[option]
        self._check_target(option, path)
        if path.suffix == ".parquet":
            try:
                frame.to_parquet(path)
            except ImportError as e:
                raise UsageError(f"{option} {path}: Parquet needs pyarrow (pip install pyarrow), or use .csv") from e
        elif path.suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            raise UsageError(f"{option} {path}: use a .csv or .parquet name")

    def _write_json(self, document: dict[str, Any]) -> None:
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        if self.json_out == STDOUT:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        self.write_text("--json", Path(self.json_out), text)
