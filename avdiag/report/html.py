"""Reports built from avdiag's JSON results: the document model, the self-contained HTML page and
``write_report``.

A report renders one or more result dicts (``InspectResult.to_dict()``, ``RewriteResult.to_dict()``,
``DiffResult.to_dict()``, or the same read back from ``--json`` files) as sections, one per result,
chosen by ``result["tool"]["command"]``: ``inspect``, ``reinit`` and ``diff`` have their own views
(tables and figures from :mod:`avdiag.report.plots`); any other command gets a generic section (its
summary, its top-level fields, its JSON). A section shows what its JSON holds and nothing else: the
z-score histogram needs ``--per-channel`` arrays (without them the section says so), the firing-rate
and measured-vs-predicted figures need a probe (``--data``).

The HTML page is one file with nothing external: CSS inline, figures as base64 PNG data URIs, no
JavaScript (long tables fold into ``<details>``). :mod:`avdiag.report.markdown` renders the same
sections as Markdown.
"""

from __future__ import annotations

import base64
import html
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from avdiag._version import __version__
from avdiag.errors import UsageError
from avdiag.report import plots
from avdiag.report.plots import as_float, count

KNOWN_SCHEMA_MAJOR = "1"
MAX_JSON_CHARS = 100_000  # generic sections: the JSON shown is cut here
COLLAPSE_ROWS = 25  # tables longer than this fold into <details>
HTML_MAX_ROWS = 2000


# ---- document model ------------------------------------------------------------------------------


@dataclass
class Text:
    text: str
    kind: str = "text"  # text / summary / note / warning


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    kinds: str  # one letter per column: c (code: names), l (text), r (number), s (severity)
    collapsed: bool | None = None  # None: fold when longer than COLLAPSE_ROWS


@dataclass
class Chart:
    key: str  # stable name within its section (dead-ratio, z-histogram, ...)
    title: str
    caption: str
    draw: Callable[[], bytes | None]  # the PNG
    text: Callable[[], list[Any]] | None = None  # Markdown without images: Unicode chart / table blocks


@dataclass
class Code:
    title: str
    text: str


@dataclass
class Section:
    anchor: str
    command: str
    title: str
    blocks: list[Any] = field(default_factory=list)


# ---- input -------------------------------------------------------------------------------------


def check_results(results: Any) -> list[dict]:
    """``results`` as a list of result dicts, or a one-line UsageError (a bare dict is taken as one result)."""
    if isinstance(results, dict):
        results = [results]
    if not isinstance(results, (list, tuple)) or not results:
        raise UsageError("report: no results to render")
    for i, result in enumerate(results, 1):
        if not isinstance(result, dict):
            raise UsageError(f"report: result {i} is not a JSON object but {type(result).__name__}")
        if "schema_version" not in result:
            raise UsageError(f"report: result {i} has no schema_version: not an avdiag JSON report")
    return list(results)


def load_results(paths: list[str | Path]) -> list[dict]:
    """Read JSON result files (for ``avdiag report A.json B.json``); one-line UsageErrors naming the file."""
    out = []
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"{path}: cannot read ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not a UTF-8 text file") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
        if not isinstance(data, dict) or "schema_version" not in data:
            raise UsageError(f"{path}: not an avdiag JSON report (no schema_version)")
        out.append(data)
    return out


def command_of(result: dict) -> str:
    """The command a result came from, or "" when it has none."""
    tool = result.get("tool")
    command = tool.get("command") if isinstance(tool, dict) else None
    return command if isinstance(command, str) else ""


def build_sections(results: Any) -> list[Section]:
    """One Section per result (see the module docstring), validated first."""
    results = check_results(results)
    sections = []
    for i, result in enumerate(results, 1):
        command = command_of(result)
        builder = _BUILDERS.get(command) if str(result.get("schema_version")).split(".")[0] == KNOWN_SCHEMA_MAJOR \
            else None
        anchor = f"r{i}-{_slug(command or 'result')}"
        try:
            sections.append(builder(result, anchor) if builder else _generic(result, anchor, command))
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise UsageError(f"report: result {i} ({command or 'no command'}) is malformed: {e}") from e
    return sections


def default_title(sections: list[Section]) -> str:
    return "avdiag report: " + "; ".join(s.title for s in sections[:3]) + (" ..." if len(sections) > 3 else "")


# ---- formatting helpers --------------------------------------------------------------------------


def _d(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list:
    return value if isinstance(value, list) else []


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "x"


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number for a table cell: ints as they are, floats to ``digits`` significant digits, – for none."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    v = as_float(value)
    if v is None:
        return "–"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def fmt_fixed(value: Any, places: int = 2) -> str:
    v = as_float(value)
    if v is None:
        return "–"
    if not math.isfinite(v):
        return fmt_num(v)
    return f"{v:.{places}f}"


def fmt_pct(value: Any) -> str:
    v = as_float(value)
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def fmt_bytes(value: Any) -> str:
    v = as_float(value)
    if v is None or not math.isfinite(v):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return "–"


def preview(channels: Any, n: int = 8) -> str:
    """Channel indices, the first ``n`` of them."""
    items = _l(channels)
    if not items:
        return ""
    head = ", ".join(str(c) for c in items[:n])
    return head + (f", … ({len(items)} in all)" if len(items) > n else "")


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (bool, int, float)):
        return fmt_num(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) <= 8 and all(isinstance(v, (str, int, float, bool)) or v is None for v in value):
            return ", ".join(_text(v) for v in value) or "(none)"
        return f"list of {len(value)}"
    if isinstance(value, dict):
        if len(value) <= 6 and all(isinstance(v, (str, int, float, bool)) or v is None for v in value.values()):
            return ", ".join(f"{k} {_text(v)}" for k, v in value.items()) or "(none)"
        return f"{len(value)} entries"
    return str(value)


def _kv_table(title: str, pairs: list[tuple[str, Any]]) -> Table:
    return Table(title, ["field", "value"], [[k, _text(v)] for k, v in pairs if v is not None], "ll", collapsed=False)


# ---- inspect -------------------------------------------------------------------------------------


_FLAG_KEYS = ("dead_channels", "abnormal_channels", "constant_channels", "low_gain_channels",
              "collapsed_filter_channels", "nonfinite_channels", "possibly_dead_channels")


def _inspect(res: dict, anchor: str) -> Section:
    ck, summary, mods, probe = _d(res.get("checkpoint")), _d(res.get("summary")), _d(res.get("modalities")), \
        _d(res.get("probe"))
    layers = [layer for layer in _l(res.get("layers")) if isinstance(layer, dict)]
    section = Section(anchor, "inspect", f"inspect: {ck.get('path', '?')}")
    blocks = section.blocks
    blocks.append(Text(str(summary.get("text") or f"{len(layers)} BN layers"), "summary"))
    layout = _d(res.get("layout"))
    thresholds = _d(res.get("thresholds"))
    pairs = [("path", ck.get("path")), ("format", ck.get("format")), ("size", fmt_bytes(ck.get("size_bytes"))),
             ("sha256", ck.get("sha256") or "not computed"),
             ("tensors", f"{fmt_num(ck.get('n_tensors'))} ({fmt_num(ck.get('n_elements'))} elements)"),
             ("unwrapped", ", ".join(f"{_d(u).get('kind')} {_d(u).get('value')}" for u in _l(ck.get("unwrapped")))
              or "(none)"),
             ("other entries", ", ".join(map(str, _l(ck.get("extras")))) or "(none)"),
             ("layout", f"{layout.get('name', '?')} ({layout.get('source', '?')})"
              + (f", fusion {layout['fusion']}" if layout.get("fusion") else "")),
             ("modalities", ", ".join(f"{m} = {p}" for m, p in _d(layout.get("modalities")).items()) or "(one group)"),
             ("thresholds", ", ".join(f"{k} {fmt_num(v)}" for k, v in thresholds.items()))]
    if probe:
        pairs.append(("probe", f"{fmt_num(probe.get('samples'))} samples in {fmt_num(probe.get('batches'))} batches "
                               f"of {probe.get('data', '?')}; model {probe.get('model', '?')} on "
                               f"{probe.get('device', '?')}{', amp' if probe.get('amp') else ''}"))
        pt = _d(probe.get("thresholds"))
        pairs.append(("probe thresholds", ", ".join(f"{k} {fmt_num(v)}" for k, v in pt.items())))
    blocks.append(_kv_table("Checkpoint", pairs))
    blocks.append(_modality_table(mods, bool(probe)))
    if not layers:
        blocks.append(Text("No BatchNorm layer in this report: nothing to plot.", "note"))
    else:
        blocks.append(Chart(
            "dead-ratio", "Dead-channel ratio per BN layer",
            "Share of each BN layer's channels judged dead by the static scan (z < dead_z before a zeroing "
            "activation, or constant output), layers in network order, one panel per modality; hatched: "
            "possibly dead (what the BN feeds is unknown).",
            lambda: plots.dead_ratio_by_layer(res), lambda: [Code("", plots.dead_ratio_text(res))]))
        if plots.has_per_channel(res, "z"):
            dead_z = plots.dead_threshold(res)
            blocks.append(Chart(
                "z-histogram", "Distribution of z = beta / s",
                f"Per-channel z of every BN channel (log counts), per modality; dark: layers that feed a "
                f"ReLU-like activation (where z < {dead_z:g} means dead), light: the other layers. The dashed "
                f"line is dead_z. Constant channels (s = 0, z = ±inf) are counted in the panel's note.",
                lambda: plots.z_histogram(res), lambda: [_z_table(res)]))
        else:
            blocks.append(Text("z-score distribution: not drawn, this report has no per-channel arrays "
                               "(made without --per-channel).", "note"))
        if probe:
            if any(isinstance(layer.get("fire_rate"), list) for layer in layers):
                blocks.append(Chart(
                    "fire-rate", "Measured firing rate per channel",
                    "Fraction of positions where each BN channel's output fires on the probe data (log counts), "
                    "per modality; red, left: channels at or below dead_rate; the dotted line is rare_rate.",
                    lambda: plots.fire_rate_histogram(res), lambda: [_fire_table(res)]))
            if plots.has_measured(res):
                blocks.append(Chart(
                    "measured-vs-predicted", "Dead channels per BN layer: predicted vs measured",
                    "Static prediction (blue) next to the measurement on data (orange) for each probed BN layer.",
                    lambda: plots.measured_vs_predicted(res), None))
            blocks.extend(_probe_tables(res, layers, mods, probe))
    flagged = [layer for layer in layers if any(count(layer.get(k)) for k in _FLAG_KEYS)
               or count(layer.get("measured_dead_channels"))]
    if flagged:
        blocks.append(_flagged_table(flagged, bool(probe)))
    if layers:
        blocks.append(_all_layers_table(layers, bool(probe)))
    findings = [f for f in _l(res.get("findings")) if isinstance(f, dict)]
    if findings:
        blocks.append(Table(f"Findings ({len(findings)})", ["severity", "id", "location", "message"],
                            [[str(f.get("severity", "")), str(f.get("id", "")), str(f.get("location", "")),
                              str(f.get("message", ""))] for f in findings], "slcl"))
    nonfinite = _d(summary.get("nonfinite_tensors"))
    if nonfinite:
        blocks.append(Text(f"{len(nonfinite)} tensor(s) hold NaN or Inf: "
                           + ", ".join(f"{k} ({v})" for k, v in list(nonfinite.items())[:10]), "warning"))
    return section


def _modality_table(mods: dict, probe: bool) -> Table:
    headers = ["modality", "BN layers", "channels", "dead (ratio)", "abnormal", "constant", "low gain", "collapsed",
               "possibly dead", "worst z", "worst layer"]
    kinds = "lrrrrrrrrrc"
    if probe:
        headers += ["measured dead", "rarely active", "precision / recall"]
        kinds += "rrr"
    rows = []
    for name, m in mods.items():
        m = _d(m)
        row = [str(name), fmt_num(m.get("n_bn_layers")), fmt_num(m.get("n_bn_channels")),
               f"{fmt_num(m.get('n_dead'))} ({fmt_pct(m.get('dead_ratio'))})", fmt_num(m.get("n_abnormal")),
               fmt_num(m.get("n_constant")), fmt_num(m.get("n_low_gain")), fmt_num(m.get("n_collapsed")),
               fmt_num(m.get("n_possibly_dead")), fmt_fixed(m.get("worst_z")), str(m.get("worst_layer") or "–")]
        if probe:
            agree = _d(m.get("agreement"))
            row += [fmt_num(m.get("n_measured_dead")), fmt_num(m.get("n_rarely_active")),
                    f"{fmt_fixed(agree.get('precision'))} / {fmt_fixed(agree.get('recall'))}"]
        rows.append(row)
    return Table("Per modality", headers, rows, kinds, collapsed=False)


def _z_table(res: dict) -> Table:
    dead_z = plots.dead_threshold(res)
    buckets = plots.z_buckets(dead_z)
    rows = []
    for m, (feeding, other) in plots.per_channel_values(res, "z").items():
        for label, part in (("feeds activation", feeding), ("other layers", other)):
            if part.size:
                rows.append([f"{m}, {label}"] + [str(n) for n in plots.z_bucket_counts(part, dead_z)])
    return Table(f"Channels per z range (dead_z = {dead_z:g})", ["channels"] + [b[0] for b in buckets], rows,
                 "l" + "r" * len(buckets), collapsed=False)


def _fire_table(res: dict) -> Table:
    dead_rate, rare_rate = plots.probe_thresholds(res)
    edges = [(f"<= {dead_rate:g}", -math.inf, dead_rate), (f"({dead_rate:g}, {rare_rate:g}]", dead_rate, rare_rate),
             (f"({rare_rate:g}, 0.5]", rare_rate, 0.5), ("(0.5, 1]", 0.5, math.inf)]
    rows = []
    for m, (feeding, other) in plots.per_channel_values(res, "fire_rate", measured=True).items():
        for label, part in (("feeds activation", feeding), ("other layers", other)):
            if part.size:
                rows.append([f"{m}, {label}"] + [str(int(((part > lo) & (part <= hi)).sum())) for _, lo, hi in edges])
    return Table("Channels per measured firing rate", ["channels"] + [e[0] for e in edges], rows, "lrrrr",
                 collapsed=False)


def _probe_tables(res: dict, layers: list[dict], mods: dict, probe: dict) -> list[Any]:
    out: list[Any] = []
    rows = []
    for name, agree in [(str(n), _d(_d(m).get("agreement"))) for n, m in mods.items()] + \
            [("all", _d(probe.get("agreement")))]:
        if not agree:
            continue
        tp, fp, fn = (as_float(agree.get(k)) for k in ("true_positive", "false_positive", "false_negative"))
        rows.append([name, fmt_num(None if tp is None or fp is None else int(tp + fp)),
                     fmt_num(None if tp is None or fn is None else int(tp + fn)),
                     fmt_num(agree.get("true_positive")), fmt_num(agree.get("false_positive")),
                     fmt_num(agree.get("false_negative")), fmt_fixed(agree.get("precision")),
                     fmt_fixed(agree.get("recall"))])
    if rows:
        out.append(Table("Prediction vs measurement (probed layers)",
                         ["modality", "predicted dead", "measured dead", "both", "predicted only", "measured only",
                          "precision", "recall"], rows, "lrrrrrrr", collapsed=False))
    mismatched = [layer for layer in layers
                  if count(layer.get("predicted_not_measured")) or count(layer.get("measured_not_predicted"))]
    if mismatched:
        out.append(Table(f"BN layers where prediction and measurement disagree ({len(mismatched)})",
                         ["layer", "predicted", "measured", "predicted only", "measured only"],
                         [[str(layer.get("name")), fmt_num(count(layer.get("dead_channels"))),
                           fmt_num(count(layer.get("measured_dead_channels"))),
                           preview(layer.get("predicted_not_measured")) or "–",
                           preview(layer.get("measured_not_predicted")) or "–"] for layer in mismatched], "crrll"))
    missing = _l(probe.get("missing_layers"))
    if missing:
        out.append(Text(f"{len(missing)} BN layer(s) never ran on the data: " + ", ".join(map(str, missing[:12]))
                        + (" ..." if len(missing) > 12 else ""), "warning"))
    return out


def _flagged_table(layers: list[dict], probe: bool) -> Table:
    headers = ["layer", "modality", "channels", "activation", "dead", "abnormal", "constant", "low gain",
               "collapsed", "possibly dead", "worst z", "dead channels"]
    kinds = "clrlrrrrrrrl"
    if probe:
        headers[-1:-1] = ["measured dead", "rarely active"]
        kinds = "clrlrrrrrrrrrl"
    rows = []
    for layer in layers:
        row = [str(layer.get("name")), str(layer.get("modality")), fmt_num(layer.get("channels")),
               _activation(layer)] + [fmt_num(count(layer.get(k))) for k in _FLAG_KEYS[:5]] + \
              [fmt_num(count(layer.get("possibly_dead_channels"))), fmt_fixed(layer.get("worst_z"))]
        if probe:
            row += [fmt_num(count(layer.get("measured_dead_channels"))),
                    fmt_num(count(layer.get("rarely_active_channels")))]
        row.append(preview(layer.get("dead_channels")) or "–")
        rows.append(row)
    return Table(f"BN layers with flagged channels ({len(layers)})", headers, rows, kinds)


def _activation(layer: dict) -> str:
    feeds = layer.get("feeds_activation")
    act = layer.get("activation")
    if feeds == "yes":
        return str(act or "yes")
    return "none" if feeds == "no" else "unknown"


def _all_layers_table(layers: list[dict], probe: bool) -> Table:
    headers = ["layer", "modality", "channels", "activation", "activation source", "eps", "dead", "worst z",
               "min fire prob"]
    kinds = "clrllrrrr"
    if probe:
        headers += ["measured dead", "positions"]
        kinds += "rr"
    rows = []
    for layer in layers:
        row = [str(layer.get("name")), str(layer.get("modality")), fmt_num(layer.get("channels")), _activation(layer),
               str(layer.get("activation_source") or "–"),
               f"{fmt_num(layer.get('eps'))} ({layer.get('eps_source', '?')})",
               fmt_num(count(layer.get("dead_channels"))), fmt_fixed(layer.get("worst_z")),
               fmt_num(layer.get("min_fire_prob"))]
        if probe:
            row += [fmt_num(count(layer.get("measured_dead_channels"))) if "measured_dead_channels" in layer else "–",
                    fmt_num(layer.get("positions_seen"))]
        rows.append(row)
    return Table(f"All BN layers ({len(layers)})", headers, rows, kinds, collapsed=True)


# ---- reinit --------------------------------------------------------------------------------------


def _reinit(res: dict, anchor: str) -> Section:
    source = _d(res.get("source"))
    section = Section(anchor, "reinit", f"reinit: {source.get('path', '?')} → {res.get('target', '?')}")
    blocks = section.blocks
    blocks.append(Text(str(res.get("summary") or res.get("method") or "reinit"), "summary"))
    for warning in _l(res.get("warnings")):
        blocks.append(Text(f"warning: {warning}", "warning"))
    params = _d(res.get("parameters"))
    pairs: list[tuple[str, Any]] = [("method", res.get("method")), ("source", source.get("path")),
                                    ("source format", source.get("format")),
                                    ("source sha256", source.get("sha256") or "not computed"),
                                    ("target", res.get("target"))]
    for key, value in params.items():
        if key == "method":
            continue
        if key == "channels" and isinstance(value, dict):
            n = sum(count(v) for v in value.values())
            pairs.append(("channels", f"{n} channel(s) in {len(value)} layer(s)"))
        elif key == "layers" and isinstance(value, list):
            pairs.append(("layers", f"{len(value)}: " + ", ".join(map(str, value[:6])) + (" ..." if len(value) > 6
                                                                                          else "")))
        else:
            pairs.append((str(key), value))
    verification = _d(res.get("verification"))
    if verification:
        pairs.append(("verification", ", ".join(f"{k} {_text(v)}" for k, v in verification.items())))
    blocks.append(_kv_table("Rewrite", pairs))
    before, after = _d(res.get("dead_before")), _d(res.get("dead_after"))
    labels = list(dict.fromkeys([*before, *after]))
    if labels:
        b = [int(as_float(before.get(m)) or 0) for m in labels]
        a = [int(as_float(after.get(m)) or 0) for m in labels]
        blocks.append(Table("Dead BN channels per modality (static scan)", ["modality", "before", "after", "change"],
                            [[m, str(x), str(y), f"{y - x:+d}"] for m, x, y in zip(labels, b, a)], "lrrr",
                            collapsed=False))
        blocks.append(Chart(
            "dead-before-after", "Dead BN channels before → after",
            "Channels the static scan judges dead in the input checkpoint (before) and in the rewritten one "
            "(after), per modality.",
            lambda: plots.dead_before_after(labels, b, a, "dead BN channels per modality: before → after"),
            lambda: [Code("", plots.before_after_text(labels, b, a))]))
    diagnosis = _d(res.get("diagnosis"))
    if diagnosis:
        blocks.append(_dict_table("Diagnosis", "modality", diagnosis))
    changes = [c for c in _l(res.get("changes")) if isinstance(c, dict)]
    if changes:
        rows = []
        for c in changes:
            nb, na = as_float(c.get("norm_before")), as_float(c.get("norm_after"))
            ratio = na / nb if nb and na is not None and math.isfinite(nb) else None
            rows.append([str(c.get("name")), fmt_num(c.get("channels_changed")), fmt_num(nb, 4), fmt_num(na, 4),
                         fmt_num(ratio)])
        blocks.append(Table(f"Rewritten tensors ({len(changes)})", ["tensor", "channels changed", "norm before",
                                                                   "norm after", "after / before"], rows, "crrrr"))
    return section


def _dict_table(title: str, first: str, data: dict) -> Table:
    """A table of {name: {field: value}}: one row per name, the union of the fields as columns
    (a name whose value is not a dict gets it in a single "value" column)."""
    columns = list(dict.fromkeys(k for v in data.values() if isinstance(v, dict) for k in v))
    if any(not isinstance(v, dict) for v in data.values()):
        columns.append("value")
    rows = [[str(name)] + [_text(v.get(c)) if isinstance(v, dict) else (_text(v) if c == "value" else "")
                           for c in columns] for name, v in data.items()]
    return Table(title, [first] + columns, rows, "l" + "r" * len(columns), collapsed=False)


# ---- diff ----------------------------------------------------------------------------------------


def _diff(res: dict, anchor: str) -> Section:
    a, b, summary = _d(res.get("a")), _d(res.get("b")), _d(res.get("summary"))
    section = Section(anchor, "diff", f"diff: {a.get('path', '?')} → {b.get('path', '?')}")
    blocks = section.blocks
    blocks.append(Text(str(summary.get("text") or "diff"), "summary"))
    blocks.append(Table("Checkpoints", ["side", "path", "format", "sha256", "tensors", "size"],
                        [[side, str(ck.get("path")), str(ck.get("format")), str(ck.get("sha256") or "not computed"),
                          fmt_num(ck.get("n_tensors")), fmt_bytes(ck.get("size_bytes"))]
                         for side, ck in (("A", a), ("B", b))], "lcllrr", collapsed=False))
    atol = as_float(res.get("atol"))
    if atol:
        blocks.append(Text(f"Values compared with atol {fmt_num(atol)} (elements within it count as equal).", "note"))
    mods = {str(k): _d(v) for k, v in _d(res.get("modalities")).items()}
    if mods:
        rows = []
        for name, m in mods.items():
            cb, ca = m.get("n_bn_channels_before"), m.get("n_bn_channels_after")
            rows.append([name, fmt_num(ca) if cb == ca else f"{fmt_num(cb)} → {fmt_num(ca)}",
                         fmt_num(m.get("n_dead_before")), fmt_num(m.get("n_dead_after")), fmt_num(m.get("n_died")),
                         fmt_num(m.get("n_revived")),
                         f"{fmt_num(m.get('n_changed_tensors'))}/{fmt_num(m.get('n_tensors'))}",
                         fmt_num(m.get("n_added_tensors")), fmt_num(m.get("n_removed_tensors")),
                         fmt_num(m.get("mean_rel_change"))])
        blocks.append(Table("Per modality", ["modality", "BN channels", "dead in A", "dead in B", "died", "revived",
                                             "changed tensors", "added", "removed", "mean rel change"], rows,
                            "lrrrrrrrrr", collapsed=False))
        with_bn = [n for n, m in mods.items() if (as_float(m.get("n_bn_channels_before")) or 0)
                   or (as_float(m.get("n_bn_channels_after")) or 0)]
        if with_bn:
            before = [int(as_float(mods[n].get("n_dead_before")) or 0) for n in with_bn]
            after = [int(as_float(mods[n].get("n_dead_after")) or 0) for n in with_bn]
            blocks.append(Chart(
                "dead-before-after", "Dead BN channels, A → B",
                "Channels the static scan judges dead in checkpoint A (before) and in B (after), per modality.",
                lambda: plots.dead_before_after(with_bn, before, after, "dead BN channels per modality: A → B"),
                lambda: [Code("", plots.before_after_text(with_bn, before, after))]))
    bn_layers = [layer for layer in _l(res.get("bn_layers")) if isinstance(layer, dict)]
    if bn_layers:
        blocks.append(Chart(
            "bn-layers", "Dead channels per BN layer, A → B",
            "For every BN layer in network order: channels dead in A and in B; x: how many of its channels "
            "changed (any of gamma, beta, running mean or variance).",
            lambda: plots.diff_layers(res), lambda: [Code("", plots.diff_layers_text(res))]))
        moved = [layer for layer in bn_layers if layer.get("status") != "unchanged" or count(layer.get("died"))
                 or count(layer.get("revived"))]
        if moved:
            rows = []
            for layer in moved:
                rel = _d(layer.get("rel_change"))
                rows.append([str(layer.get("name")), str(layer.get("modality")), str(layer.get("status")),
                             fmt_num(layer.get("n_channels_changed")), fmt_num(layer.get("n_dead_before")),
                             fmt_num(layer.get("n_dead_after")), preview(layer.get("died")) or "–",
                             preview(layer.get("revived")) or "–"]
                            + [fmt_num(rel.get(k)) for k in ("gamma", "beta", "running_mean", "running_var")])
            blocks.append(Table(f"BN layers that changed ({len(moved)})",
                                ["layer", "modality", "status", "channels changed", "dead in A", "dead in B", "died",
                                 "revived", "rel Δ gamma", "rel Δ beta", "rel Δ mean", "rel Δ var"], rows,
                                "cllrrrllrrrr"))
        else:
            blocks.append(Text("No BN layer changed.", "note"))
    changed = [c for c in _l(res.get("changed")) if isinstance(c, dict)]
    if changed:
        rows = []
        for c in changed:
            sa, sb = tuple(_l(c.get("shape_a"))), tuple(_l(c.get("shape_b")))
            da, db = c.get("dtype_a"), c.get("dtype_b")
            rows.append([str(c.get("name")), str(c.get("modality")), ", ".join(map(str, _l(c.get("reasons")))),
                         str(list(sa)) if sa == sb else f"{list(sa)} → {list(sb)}",
                         str(da) if da == db else f"{da} → {db}",
                         f"{fmt_num(c.get('n_changed_elements'))}/{fmt_num(c.get('n_elements'))}",
                         fmt_num(c.get("max_abs_diff")), fmt_num(c.get("rel_change")),
                         f"{fmt_num(c.get('n_channels_changed'))}/{fmt_num(c.get('channels'))}"
                         if c.get("channels") is not None else "–"])
        blocks.append(Table(f"Changed tensors ({len(changed)})",
                            ["tensor", "modality", "reasons", "shape", "dtype", "changed elements", "max |Δ|",
                             "rel change", "channels changed"], rows, "cllllrrrr", collapsed=True))
    for label in ("added", "removed"):
        names = _l(res.get(label))
        if names:
            blocks.append(Table(f"Tensors {label} ({len(names)})", ["tensor"], [[str(n)] for n in names], "c"))
    return section


# ---- anything else -------------------------------------------------------------------------------


def _generic(res: dict, anchor: str, command: str) -> Section:
    version = res.get("schema_version")
    section = Section(anchor, command or "result", f"{command or 'result'} (no dedicated view)")
    blocks = section.blocks
    summary = res.get("summary")
    text = summary if isinstance(summary, str) else _d(summary).get("text")
    if isinstance(text, str) and text:
        blocks.append(Text(text, "summary"))
    known = str(version).split(".")[0] == KNOWN_SCHEMA_MAJOR
    blocks.append(Text(f"avdiag {__version__} has no dedicated view for "
                       + (f"command {command!r}" if known and command else
                          f"schema {version!r}" if not known else "a result without tool.command")
                       + ": its top-level fields follow.", "note"))
    blocks.append(_kv_table("Fields", [(str(k), v) for k, v in res.items()
                                       if not isinstance(v, (dict, list)) or k in ("tool", "summary")]))
    dump = json.dumps(res, indent=1, default=str)
    if len(dump) > MAX_JSON_CHARS:
        dump = dump[:MAX_JSON_CHARS] + f"\n... ({len(dump) - MAX_JSON_CHARS} more characters)"
    blocks.append(Code("JSON", dump))
    return section


def _conflict(res: dict, anchor: str) -> Section:
    section = Section(anchor, "conflict", f"conflict: {_d(res.get('checkpoint')).get('path', '?')} on {res.get('data', '?')}")
    blocks = section.blocks
    blocks.append(Text(str(res.get("summary") or "conflict"), "summary"))
    rows = []
    for m, entry in _d(res.get("modalities")).items():
        c, k = _d(_d(entry).get("conflict")), _d(_d(entry).get("contribution"))
        rows.append([m, fmt_num(c.get("cos_mean")), fmt_num(c.get("cos_std")), fmt_pct(c.get("conflict_rate")),
                     fmt_num(c.get("magnitude_ratio_mean")), fmt_pct(c.get("sample_conflict_rate")),
                     fmt_num(_d(k.get("shapley_mean")).get("accuracy")),
                     fmt_num(_d(k.get("shapley_mean")).get("probability")), fmt_num(k.get("unimodal_accuracy")),
                     fmt_num(_d(_d(entry).get("ogm")).get("score"))])
    blocks.append(Table("Per modality", ["modality", "cos mean", "cos std", "conflict rate", "|g_uni| / |g_mm|",
                                         "sample conflict", "Shapley (acc)", "Shapley (prob)", "uni-modal acc",
                                         "OGM score"], rows, "lrrrrrrrrr", collapsed=False))
    ogm, opm = _d(res.get("ogm")), _d(res.get("opm"))
    blocks.append(_kv_table("OGM-GE and OPM", [("rho", _d(ogm.get("rho"))), ("coefficients", _d(ogm.get("coefficients"))),
                                               ("dominant", ogm.get("dominant")),
                                               ("OPM drop probability", _d(opm.get("drop_probability")))]))
    blocks.append(Chart("conflict-per-layer", "Gradient conflict per layer",
                        "Mean cosine between the multimodal and the uni-modal loss gradients over each layer's "
                        "parameters (<= 0: conflict).", lambda: plots.conflict_per_layer(res)))
    blocks.append(Chart("contribution", "Contribution per modality",
                        "Exact two-modality Shapley values (pooled feature zeroed) and uni-modal accuracy.",
                        lambda: plots.contribution_bars(res)))
    return section


def _check(res: dict, anchor: str) -> Section:
    summary = _d(res.get("summary"))
    files = [f for f in _l(res.get("files")) if isinstance(f, dict)]
    title = f"check: {fmt_num(summary.get('n_checkpoints'))} checkpoint(s)" + (
        f" on {res['data']}" if res.get("data") else "")
    section = Section(anchor, "check", title)
    blocks = section.blocks
    blocks.append(Text(str(summary.get("text") or "check"), "summary"))
    blocks.append(Table("Checkpoints", ["path", "status", "violations", "not evaluated", "summary"],
                        [[str(f.get("path")), str(f.get("status")), fmt_num(len(_l(f.get("violations")))),
                          fmt_num(len(_l(f.get("not_evaluated")))),
                          str(f.get("error") or _d(f.get("inspection")).get("text") or "")] for f in files],
                        "clrrl"))
    violations = [_d(v) for f in files for v in _l(f.get("violations"))]
    if violations:
        blocks.append(Table("Violations", ["severity", "rule", "path", "location", "message", "outcome"],
                            [[str(v.get("severity")), str(v.get("rule_id")), str(v.get("path")), str(v.get("location")),
                              str(v.get("message")), "suppressed: " + str(v.get("suppression_reason"))
                              if v.get("suppressed") else str(v.get("outcome"))] for v in violations], "sccclc"))
    skipped = [(str(f.get("path")), _d(n)) for f in files for n in _l(f.get("not_evaluated"))]
    if skipped:
        blocks.append(Table("Not evaluated", ["path", "rule", "reason"],
                            [[path, str(n.get("rule_id")), str(n.get("reason"))] for path, n in skipped], "ccl"))
    with_data = [f for f in files if isinstance(f.get("data"), dict)]
    if with_data:
        rows = [[str(f.get("path")), m, fmt_num(x.get("share_accuracy")), fmt_num(x.get("unimodal_accuracy")),
                 fmt_num(x.get("rho")), fmt_num(x.get("cos_mean")), fmt_pct(x.get("conflict_rate"))]
                for f in with_data for m, x in _d(f["data"].get("modalities")).items() if isinstance(x, dict)]
        blocks.append(Table("On the data", ["path", "modality", "contribution share", "uni-modal acc", "OGM rho",
                                            "cos mean", "conflict rate"], rows, "clrrrrr", collapsed=False))
        blocks.append(Chart("check-shares", "Contribution share per checkpoint",
                            "Each modality's Shapley share of the gain over the head's biases (0: ignored, 0.5: "
                            "balanced); the dashed line is the policy's min_share.",
                            lambda: plots.check_shares(res)))
    return section


_BUILDERS: dict[str, Callable[[dict, str], Section]] = {"inspect": _inspect, "reinit": _reinit, "diff": _diff,
                                                        "conflict": _conflict, "check": _check}


# ---- HTML ----------------------------------------------------------------------------------------


_CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fff; color: #1d1f23;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header, nav, main, footer { max-width: 1200px; margin: 0 auto; padding: 0 24px; }
header h1 { font-size: 22px; margin: 24px 0 2px; }
p.meta, footer { color: #5b6068; font-size: 12px; }
nav ol { margin: 8px 0 0; padding-left: 20px; }
section.result { margin: 26px 0 40px; }
h2 { font-size: 18px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d3d7de; word-break: break-all; }
h3 { font-size: 15px; margin: 20px 0 6px; }
p.summary { font-weight: 600; background: #f2f5f9; border-left: 4px solid #4c72b0; padding: 8px 12px; margin: 8px 0; }
p.note { color: #5b6068; font-style: italic; }
p.warning { background: #fff5df; border-left: 4px solid #e0a030; padding: 6px 12px; }
div.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 4px 0 10px; font-size: 12.5px; }
th, td { border: 1px solid #d8dce2; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.code { white-space: nowrap; }
code, pre { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 8px; overflow-x: auto; max-height: 480px; }
td.sev-error { color: #b00020; font-weight: 600; }
td.sev-warning { color: #9a5700; font-weight: 600; }
td.sev-info { color: #5b6068; }
figure { margin: 8px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ea; }
figcaption { color: #5b6068; font-size: 12px; margin-top: 4px; max-width: 760px; }
details > summary { cursor: pointer; font-weight: 600; font-size: 15px; margin: 16px 0 6px; }
p.more { color: #5b6068; font-size: 12px; }
"""


def render_html(results: list[dict], title: str | None = None) -> str:
    """One self-contained HTML page (inline CSS, figures as PNG data URIs, no script, nothing external)
    with a section per result. Raises UsageError for input that is not a list of avdiag result dicts."""
    sections = build_sections(results)
    title = title or default_title(sections)
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f'<meta name="generator" content="avdiag {e(__version__)}">', f"<title>{e(title)}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<header><h1>{e(title)}</h1><p class=\"meta\">avdiag {e(__version__)} report of "
           f"{len(sections)} result(s)</p></header>"]
    if len(sections) > 1:
        out.append("<nav><ol>" + "".join(f'<li><a href="#{e(s.anchor)}">{e(s.title)}</a></li>' for s in sections)
                   + "</ol></nav>")
    out.append("<main>")
    for s in sections:
        out.append(f'<section class="result" id="{e(s.anchor)}" data-command="{e(s.command)}">')
        out.append(f"<h2>{e(s.title)}</h2>")
        for block in s.blocks:
            out.append(_html_block(block, s))
        out.append("</section>")
    out += ["</main>", "<footer><p>Made by avdiag from its JSON reports. Figures: matplotlib.</p></footer>",
            "</body>", "</html>", ""]
    return "\n".join(out)


def _html_block(block: Any, section: Section) -> str:
    e = html.escape
    if isinstance(block, Text):
        return f'<p class="{e(block.kind)}">{e(block.text)}</p>'
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Code):
        return f"<details><summary>{e(block.title)}</summary><pre>{e(block.text)}</pre></details>"
    if isinstance(block, Chart):
        png = draw_chart(block, section)
        if png is None:
            return f'<p class="note">{e(block.title)}: nothing to draw.</p>'
        w, h = png_size(png)
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return (f'<h3>{e(block.title)}</h3>\n<figure class="chart" data-chart="{e(block.key)}">'
                f'<img src="{src}" alt="{e(block.title)}" width="{w}" height="{h}">'
                f"<figcaption>{e(block.caption)}</figcaption></figure>")
    raise TypeError(f"unknown report block {type(block).__name__}")


def _html_table(t: Table) -> str:
    e = html.escape
    classes = {"r": "num", "c": "code"}
    rows = t.rows[:HTML_MAX_ROWS]
    head = "".join(f"<th>{e(h)}</th>" for h in t.headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            kind = t.kinds[i] if i < len(t.kinds) else "l"
            text = e(cell)
            if kind == "c" and cell not in ("", "–"):
                text = f"<code>{text}</code>"
            css = classes.get(kind) or (f"sev-{_slug(cell)}" if kind == "s" else "")
            cells.append(f'<td class="{css}">{text}</td>' if css else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    if len(t.rows) > len(rows):
        table += f'<p class="more">first {len(rows)} of {len(t.rows)} rows</p>'
    collapsed = t.collapsed if t.collapsed is not None else len(t.rows) > COLLAPSE_ROWS
    if collapsed:
        return f"<details><summary>{e(t.title)}</summary>{table}</details>"
    return f"<h3>{e(t.title)}</h3>\n{table}"


def draw_chart(chart: Chart, section: Section) -> bytes | None:
    """Draw a chart's PNG; errors from malformed data become one-line UsageErrors."""
    try:
        return chart.draw()
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UsageError(f"report: {section.command} result ({section.anchor}): cannot draw {chart.key}: {e}") from e


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


# ---- writing -------------------------------------------------------------------------------------


def write_report(results: list[dict], path: str | Path, *, title: str | None = None, images: bool = False) -> None:
    """Write the report to ``path``: HTML for .html / .htm, Markdown for .md (by suffix, case-insensitive).

    The file is written atomically (a temporary file beside it, fsynced, renamed over the target).
    With ``images=True`` a Markdown report also writes its figures as PNG files into the folder
    ``<stem>_files`` beside it and links them (relative links), instead of the Unicode charts.
    Raises UsageError for another suffix, for bad results and when the file cannot be written.
    """
    from avdiag.load.write import _atomic_write
    from avdiag.report.markdown import render_markdown

    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise UsageError(f"report {path}: is a directory")
    if suffix not in (".html", ".htm", ".md"):
        raise UsageError(f"report {path}: unknown format {path.suffix or '(no suffix)'!r}: use .html, .htm or .md")
    if not path.parent.is_dir():
        raise UsageError(f"report {path}: folder {path.parent} does not exist")
    if suffix == ".md":
        image_dir = path.parent / f"{path.stem}_files" if images else None
        text = render_markdown(results, image_dir=image_dir, title=title,
                               link_prefix=image_dir.name if image_dir else None)
    else:
        text = render_html(results, title)
    data = text.encode("utf-8")
    _atomic_write(path, lambda _tmp, f: f.write(data))
