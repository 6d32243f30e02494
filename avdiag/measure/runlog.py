"""The run log of :mod:`avdiag.monitor`: one JSON object per line (JSON Lines), written as training goes.

Records, each with a ``kind``:

* ``"config"`` (always the first line): ``format`` (:data:`RUNLOG_FORMAT`), ``schema_version``
  (:data:`RUNLOG_SCHEMA_VERSION`), ``tool``, ``started`` (UTC, ISO 8601), ``config`` (the monitor's
  options), ``model`` (class, uni-modal logits source, parameter count per encoder) and ``initial``
  (``dead_channels`` before the first step, when that metric is on);
* ``"step"``: one per logged training step: ``step``, ``epoch``, ``batch_size``, ``loss`` (when the
  loop gave it), ``ogm`` (``scores``, ``rho``, ``coefficients`` per modality), ``train_accuracy``
  (fused and uni-modal, on the training batch), and every ``cosine_every`` steps ``conflict`` (per
  modality ``cos``, ``magnitude_ratio``); ``interventions`` when one acted on the step;
* ``"epoch"``: one per finished epoch: ``epoch``, ``step``, ``means`` (of the epoch's logged
  steps), ``dead_channels`` (per modality ``dead`` / ``channels``), ``heldout`` (fused, uni-modal
  accuracy and mean Shapley values) and ``learning_state`` (per modality purities and gap), each only
  when that metric is on.

Every line is flushed as it is written, so a run that is killed keeps every complete line;
:func:`read_run_log` drops an incomplete last line (and says so) and refuses anything else that is
not a run log with a one-line :class:`~avdiag.errors.UsageError`. Non-finite floats are null.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from avdiag._version import __version__
from avdiag.errors import UsageError
from avdiag.results import envelope, json_safe

RUNLOG_FORMAT = "avdiag-run-log"
RUNLOG_SCHEMA_VERSION = "1.0"
RUNLOG_COMMAND = "monitor"  # tool.command of the result dict a run log is read into
KINDS = ("config", "step", "epoch")


class RunLogWriter:
    """Appends records to a new run log, one flushed line each; the first is the config record."""

    def __init__(self, path: str | Path, config: dict[str, Any], model: dict[str, Any],
                 initial: dict[str, Any] | None = None):
        self.path = Path(path)
        try:
            self._file: TextIO | None = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise UsageError(f"run log {self.path}: cannot write ({e.strerror or e})") from e
        self.write({"kind": "config", "format": RUNLOG_FORMAT, "schema_version": RUNLOG_SCHEMA_VERSION,
                    "tool": {"name": "avdiag", "version": __version__},
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "config": config, "model": model, "initial": initial or {}})

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"run log {self.path} is closed")
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class RunLog:
    """A run log read back: its config record, step and epoch records, and whether its last line was cut."""

    path: str
    header: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False  # the last line was incomplete (a killed run) and was dropped

    @property
    def config(self) -> dict[str, Any]:
        return self.header.get("config") or {}

    def step_series(self, *keys: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the step records that have ``record[keys[0]][keys[1]]...``; null is NaN."""
        return _series(self.steps, "step", keys)

    def epoch_series(self, *keys: str) -> tuple[list[int], list[float]]:
        """(epochs, values) of the epoch records that have the value at ``keys``; null is NaN."""
        return _series(self.epochs, "epoch", keys)

    def summary_text(self) -> str:
        last = self.steps[-1] if self.steps else {}
        rho = dig(last, "ogm", "rho") or {}
        dominant = max(rho, key=lambda m: _num(rho[m]), default=None) if rho else None
        text = f"run log {self.path}: {len(self.steps)} logged steps, {len(self.epochs)} epochs"
        if dominant is not None and not math.isnan(_num(rho[dominant])):
            text += f"; last step: {dominant} leads (rho {_num(rho[dominant]):.3g})"
        return text + ("; the last line was incomplete (a killed run?) and was dropped" if self.truncated else "")

    def to_result(self) -> dict[str, Any]:
        """The run log as an avdiag result dict (``tool.command`` = ``monitor``), for reports."""
        return envelope(RUNLOG_COMMAND, [], {"text": self.summary_text(), "steps": len(self.steps),
                                             "epochs": len(self.epochs), "truncated": self.truncated},
                        {"run_log": self.path, "header": self.header, "steps": self.steps, "epochs": self.epochs})


def dig(record: Any, *keys: str) -> Any:
    """``record[k1][k2]...``, or None where a key is missing or a level is not an object."""
    for key in keys:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _series(records: list[dict[str, Any]], x_key: str, keys: tuple[str, ...]) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in records:
        value = dig(rec, *keys)
        if value is None and not _has_key(rec, keys):
            continue
        xs.append(int(rec[x_key]))
        ys.append(_num(value))
    return xs, ys


def _has_key(record: dict[str, Any], keys: tuple[str, ...]) -> bool:
    parent = dig(record, *keys[:-1]) if len(keys) > 1 else record
    return isinstance(parent, dict) and keys[-1] in parent


def is_run_log_path(path: str | Path) -> bool:
    return str(path).lower().endswith(".jsonl")


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents; a one-line UsageError naming the file when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a UTF-8 text file") from e


def read_run_log(path: str | Path) -> RunLog:
    """Read a run log; UsageError (one line, naming the file and line) when it is not one."""
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail: "" when the file ends with a newline
    records = [_parse(path, i, line) for i, line in enumerate(complete, 1) if line.strip()]
    truncated = False
    if tail.strip():
        try:
            records.append(_parse(path, len(lines), tail))
        except UsageError:
            truncated = True  # a line cut by a killed writer
    return _assemble(path, records, truncated)


def _parse(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: line {number} is not JSON ({e.msg}): not an avdiag run log") from e
    if not isinstance(record, dict) or record.get("kind") not in KINDS:
        raise UsageError(f"{path}: line {number} is not a run-log record (no kind config/step/epoch)")
    return record


def _assemble(path: Path, records: list[dict[str, Any]], truncated: bool) -> RunLog:
    if not records or records[0].get("kind") != "config" or records[0].get("format") != RUNLOG_FORMAT:
        raise UsageError(f"{path}: not an avdiag run log (its first line must be the monitor's config record)")
    major = str(records[0].get("schema_version", "")).split(".")[0]
    if major != RUNLOG_SCHEMA_VERSION.split(".")[0]:
        raise UsageError(f"{path}: run log schema {records[0].get('schema_version')!r}; this avdiag reads "
                         f"{RUNLOG_SCHEMA_VERSION.split('.')[0]}.x")
    log = RunLog(str(path), records[0], truncated=truncated)
    for i, rec in enumerate(records[1:], 2):
        if rec["kind"] == "config":
            raise UsageError(f"{path}: record {i} is a second config record (two runs in one file?)")
        if not isinstance(rec.get(rec["kind"]), int) or isinstance(rec.get(rec["kind"]), bool):
            raise UsageError(f"{path}: record {i} ({rec['kind']}) has no whole-number {rec['kind']!r}")
        (log.steps if rec["kind"] == "step" else log.epochs).append(rec)
    return log
