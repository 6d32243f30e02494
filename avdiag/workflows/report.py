"""`avdiag report` and every command's ``--report PATH``: render result dicts as one HTML page or one
Markdown file, written atomically.

:func:`load_results` reads ``--json`` files of any avdiag 1.x; :func:`report` builds the document
(:mod:`avdiag.report.document`), renders it by the output's suffix and writes it through a temporary
file renamed onto the target, so a failed run leaves an existing report as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from avdiag.errors import UsageError
from avdiag.load.write import atomic_write
from avdiag.measure.runlog import is_run_log_path, read_run_log, read_text
from avdiag.report.document import build_document
from avdiag.report.html import render_html
from avdiag.report.markdown import render_markdown

HTML_SUFFIXES = (".html", ".htm")
MARKDOWN_SUFFIXES = (".md",)


def load_results(paths: list[Path]) -> list[dict]:
    """The JSON documents at ``paths``, in order (a ``.jsonl`` path is a training run log of
    :mod:`avdiag.monitor`, read as one result); a one-line UsageError naming the file when one cannot
    be read, is not JSON, or is not an avdiag result."""
    return [read_run_log(p).to_result() if is_run_log_path(p) else _load_result(Path(p)) for p in paths]


def _load_result(path: Path) -> dict:
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(data, dict) or "schema_version" not in data:
        raise UsageError(f"{path}: not an avdiag JSON result (no schema_version)")
    tool = data.get("tool")
    name = tool.get("name") if isinstance(tool, dict) else None
    if name is not None and name != "avdiag":
        raise UsageError(f"{path}: a JSON result of {name!r}, not of avdiag")
    return data


def report(results: list[dict], output: Path, title: str | None = None, images: bool = False,
           protect: tuple[Path, ...] = ()) -> Path:
    """Write the report of ``results`` to ``output``: HTML for .html / .htm, Markdown for .md (by suffix,
    case-insensitive). With ``images`` a Markdown report also writes its figures as PNG files into
    ``<stem>_files/`` beside it and links them relatively, instead of the Unicode charts. ``protect``
    names files that must not be overwritten (the command's inputs). Returns ``output``.

    Raises UsageError for another suffix, a folder or missing folder as target, a protected target,
    results that are not avdiag result dicts, and when a file cannot be written."""
    output = Path(output)
    _check_target(output, protect)
    suffix = output.suffix.lower()
    if suffix not in HTML_SUFFIXES + MARKDOWN_SUFFIXES:
        raise UsageError(f"report {output}: unknown format {output.suffix or '(no suffix)'!r}: "
                         f"use .html, .htm or .md")
    document = build_document(results, title)
    if suffix in HTML_SUFFIXES:
        _write(output, render_html(document).encode("utf-8"))
        return output
    folder = output.parent / f"{output.stem}_files" if images else None
    rendered = render_markdown(document, image_prefix=folder.name if folder else None)
    if folder is not None and rendered.images:
        _write_images(folder, rendered.images, protect)
    _write(output, rendered.text.encode("utf-8"))
    return output


def _check_target(path: Path, protect: tuple[Path, ...]) -> None:
    if path.is_dir():
        raise UsageError(f"report {path}: is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"report {path}: folder {path.parent} does not exist")
    if any(_same_file(path, Path(p)) for p in protect):
        raise UsageError(f"report {path}: is an input of this command; choose another name")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, lambda _tmp, f: f.write(data))


def _write_images(folder: Path, images: dict[str, bytes], protect: tuple[Path, ...]) -> None:
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise UsageError(f"report: cannot create {folder} ({e.strerror or e})") from e
    for name, png in images.items():
        _check_target(folder / name, protect)
        _write(folder / name, png)
