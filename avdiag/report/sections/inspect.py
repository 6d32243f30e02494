"""The report section of `avdiag inspect`: the checkpoint, per-modality counts, the static-scan
figures (dead ratio per layer; the z histogram when the JSON has ``--per-channel`` arrays), the probe's
figures and tables when it ran on data (``--data``), flagged and all BN layers, findings."""

from __future__ import annotations

import math

from avdiag.report import access as acc
from avdiag.report import plots
from avdiag.report.blocks import Block, Chart, Code, Section, Table, Text, section_builder
from avdiag.report.cells import NONE, fmt_bytes, fmt_fixed, fmt_num, fmt_pct, kv_table, preview

FLAG_KEYS = ("dead_channels", "abnormal_channels", "constant_channels", "low_gain_channels",
             "collapsed_filter_channels", "nonfinite_channels", "possibly_dead_channels")


@section_builder("inspect")
def inspect_section(res: dict, anchor: str) -> Section:
    probe = acc.obj(res.get("probe"))
    layers = acc.dicts(res.get("layers"))
    section = Section(anchor, "inspect", f"inspect: {acc.checkpoint_path(res)}")
    section.add(Text(acc.summary_text(res) or f"{len(layers)} BN layers", "summary"),
                _checkpoint_table(res, probe),
                _modality_table(res, bool(probe)))
    if not layers:
        section.add(Text("No BatchNorm layer in this report: nothing to plot.", "note"))
    else:
        section.add(*_static_charts(res))
        if probe:
            section.add(*_probe_charts(res, layers), *_probe_tables(res, layers, probe))
    flagged = [layer for layer in layers if any(acc.count(layer.get(k)) for k in FLAG_KEYS)
               or acc.count(layer.get("measured_dead_channels"))]
    if flagged:
        section.add(_flagged_table(flagged, bool(probe)))
    if layers:
        section.add(_all_layers_table(layers, bool(probe)))
    section.add(*_layernorm_blocks(acc.obj(res.get("layernorm"))))
    section.add(*_dormant_blocks(acc.obj(res.get("dormant"))))
    findings = acc.dicts(res.get("findings"))
    if findings:
        section.add(Table(f"Findings ({len(findings)})", ["severity", "id", "location", "message"],
                          [[str(f.get("severity", "")), str(f.get("id", "")), str(f.get("location", "")),
                            str(f.get("message", ""))] for f in findings], "slcl"))
    nonfinite = acc.obj(acc.summary_fields(res).get("nonfinite_tensors"))
    if nonfinite:
        section.add(Text(f"{len(nonfinite)} tensor(s) hold NaN or Inf: "
                         + ", ".join(f"{k} ({v})" for k, v in list(nonfinite.items())[:10]), "warning"))
    return section


def _checkpoint_table(res: dict, probe: dict) -> Table:
    ck, layout = acc.obj(res.get("checkpoint")), acc.obj(res.get("layout"))
    unwrapped = ", ".join(f"{acc.obj(u).get('kind')} {acc.obj(u).get('value')}" for u in acc.items(ck.get("unwrapped")))
    pairs = [("path", acc.checkpoint_path(res)), ("format", ck.get("format")),
             ("size", fmt_bytes(ck.get("size_bytes"))),
             ("sha256", ck.get("sha256") or "not computed"),
             ("tensors", f"{fmt_num(ck.get('n_tensors'))} ({fmt_num(ck.get('n_elements'))} elements)"),
             ("unwrapped", unwrapped or "(none)"),
             ("other entries", ", ".join(map(str, acc.items(ck.get("extras")))) or "(none)"),
             ("layout", f"{layout.get('name', '?')} ({layout.get('source', '?')})"
              + (f", fusion {layout['fusion']}" if layout.get("fusion") else "")),
             ("modalities", ", ".join(f"{m} = {p}" for m, p in acc.modality_prefixes(res).items()) or "(one group)"),
             ("thresholds", ", ".join(f"{k} {fmt_num(v)}" for k, v in acc.obj(res.get("thresholds")).items()))]
    if probe:
        pairs.append(("probe", f"{fmt_num(probe.get('samples'))} samples in {fmt_num(probe.get('batches'))} batches "
                               f"of {probe.get('data', '?')}; model {probe.get('model', '?')} on "
                               f"{probe.get('device', '?')}{', amp' if probe.get('amp') else ''}"))
        thresholds = acc.obj(probe.get("thresholds"))
        pairs.append(("probe thresholds", ", ".join(f"{k} {fmt_num(v)}" for k, v in thresholds.items())))
    return kv_table("Checkpoint", pairs)


def _modality_table(res: dict, probe: bool) -> Table:
    headers = ["modality", "BN layers", "channels", "dead (ratio)", "abnormal", "constant", "low gain", "collapsed",
               "possibly dead", "worst z", "worst layer"]
    kinds = "lrrrrrrrrrc"
    if probe:
        headers += ["measured dead", "rarely active", "precision / recall"]
        kinds += "rrr"
    rows = []
    for name, m in acc.obj(res.get("modalities")).items():
        m = acc.obj(m)
        row = [str(name), fmt_num(m.get("n_bn_layers")), fmt_num(m.get("n_bn_channels")),
               f"{fmt_num(m.get('n_dead'))} ({fmt_pct(m.get('dead_ratio'))})", fmt_num(m.get("n_abnormal")),
               fmt_num(m.get("n_constant")), fmt_num(m.get("n_low_gain")), fmt_num(m.get("n_collapsed")),
               fmt_num(m.get("n_possibly_dead")), fmt_fixed(acc.modality_worst_z(res, name)),
               str(m.get("worst_layer") or NONE)]
        if probe:
            agree = acc.obj(m.get("agreement"))
            row += [fmt_num(m.get("n_measured_dead")), fmt_num(m.get("n_rarely_active")),
                    f"{fmt_fixed(agree.get('precision'))} / {fmt_fixed(agree.get('recall'))}"]
        rows.append(row)
    return Table("Per modality", headers, rows, kinds, collapsed=False)


def _static_charts(res: dict) -> list[Block]:
    out: list[Block] = [Chart(
        "dead-ratio", "Dead-channel ratio per BN layer",
        "Share of each BN layer's channels judged dead by the static scan (z < dead_z before a zeroing "
        "activation, or constant output), layers in network order, one panel per modality; hatched: "
        "possibly dead (what the BN feeds is unknown).",
        lambda: plots.dead_ratio_by_layer(res), lambda: [Code("", plots.dead_ratio_text(res))])]
    if acc.has_per_channel(res, "z"):
        dead_z = acc.dead_threshold(res)
        out.append(Chart(
            "z-histogram", "Distribution of z = beta / s",
            f"Per-channel z of every BN channel (log counts), per modality; dark: layers that feed a "
            f"ReLU-like activation (where z < {dead_z:g} means dead), light: the other layers. The dashed "
            f"line is dead_z. Constant channels (s = 0, z = ±inf) are counted in the panel's note.",
            lambda: plots.z_histogram(res), lambda: [_z_table(res)]))
    else:
        out.append(Text("z-score distribution: not drawn, this report has no per-channel arrays "
                        "(made without --per-channel).", "note"))
    return out


def _probe_charts(res: dict, layers: list[dict]) -> list[Block]:
    out: list[Block] = []
    if any(isinstance(layer.get("fire_rate"), list) for layer in layers):
        out.append(Chart(
            "fire-rate", "Measured firing rate per channel",
            "Fraction of positions where each BN channel's output fires on the probe data (log counts), "
            "per modality; red, left: channels at or below dead_rate; the dotted line is rare_rate.",
            lambda: plots.fire_rate_histogram(res), lambda: [_fire_table(res)]))
    if acc.has_measured(res):
        out.append(Chart(
            "measured-vs-predicted", "Dead channels per BN layer: predicted vs measured",
            "Static prediction (blue) next to the measurement on data (orange) for each probed BN layer.",
            lambda: plots.measured_vs_predicted(res), None))
    return out


def _z_table(res: dict) -> Table:
    dead_z = acc.dead_threshold(res)
    buckets = plots.z_buckets(dead_z)
    rows = []
    for m, (feeding, other) in acc.per_channel_values(res, "z").items():
        for label, part in (("feeds activation", feeding), ("other layers", other)):
            if part.size:
                rows.append([f"{m}, {label}"] + [str(n) for n in plots.z_bucket_counts(part, dead_z)])
    return Table(f"Channels per z range (dead_z = {dead_z:g})", ["channels"] + [b[0] for b in buckets], rows,
                 "l" + "r" * len(buckets), collapsed=False)


def _fire_table(res: dict) -> Table:
    dead_rate, rare_rate = acc.probe_thresholds(res)
    edges = [(f"<= {dead_rate:g}", -math.inf, dead_rate), (f"({dead_rate:g}, {rare_rate:g}]", dead_rate, rare_rate),
             (f"({rare_rate:g}, 0.5]", rare_rate, 0.5), ("(0.5, 1]", 0.5, math.inf)]
    rows = []
    for m, (feeding, other) in acc.per_channel_values(res, "fire_rate", measured=True).items():
        for label, part in (("feeds activation", feeding), ("other layers", other)):
            if part.size:
                rows.append([f"{m}, {label}"] + [str(int(((part > lo) & (part <= hi)).sum())) for _, lo, hi in edges])
    return Table("Channels per measured firing rate", ["channels"] + [e[0] for e in edges], rows, "lrrrr",
                 collapsed=False)


def _agreement_row(name: str, agree: dict) -> list[str]:
    tp, fp, fn = (acc.finite_num(agree.get(k)) for k in ("true_positive", "false_positive", "false_negative"))
    return [name, fmt_num(None if tp is None or fp is None else int(tp + fp)),
            fmt_num(None if tp is None or fn is None else int(tp + fn)),
            fmt_num(agree.get("true_positive")), fmt_num(agree.get("false_positive")),
            fmt_num(agree.get("false_negative")), fmt_fixed(agree.get("precision")), fmt_fixed(agree.get("recall"))]


def _probe_tables(res: dict, layers: list[dict], probe: dict) -> list[Block]:
    out: list[Block] = []
    agreements = [(str(m), acc.agreement(res, m)) for m in acc.obj(res.get("modalities"))]
    agreements.append(("all", acc.obj(probe.get("agreement"))))
    rows = [_agreement_row(name, agree) for name, agree in agreements if agree]
    if rows:
        out.append(Table("Prediction vs measurement (probed layers)",
                         ["modality", "predicted dead", "measured dead", "both", "predicted only", "measured only",
                          "precision", "recall"], rows, "lrrrrrrr", collapsed=False))
    mismatched = [layer for layer in layers
                  if acc.count(layer.get("predicted_not_measured")) or acc.count(layer.get("measured_not_predicted"))]
    if mismatched:
        out.append(Table(f"BN layers where prediction and measurement disagree ({len(mismatched)})",
                         ["layer", "predicted", "measured", "predicted only", "measured only"],
                         [[str(layer.get("name")), fmt_num(acc.count(layer.get("dead_channels"))),
                           fmt_num(acc.count(layer.get("measured_dead_channels"))),
                           preview(layer.get("predicted_not_measured")) or NONE,
                           preview(layer.get("measured_not_predicted")) or NONE] for layer in mismatched], "crrll"))
    missing = acc.items(probe.get("missing_layers"))
    if missing:
        out.append(Text(f"{len(missing)} BN layer(s) never ran on the data: " + ", ".join(map(str, missing[:12]))
                        + (" ..." if len(missing) > 12 else ""), "warning"))
    return out


def _activation(layer: dict) -> str:
    feeds = layer.get("feeds_activation")
    if feeds == "yes":
        return str(layer.get("activation") or "yes")
    return "none" if feeds == "no" else "unknown"


def _flagged_table(layers: list[dict], probe: bool) -> Table:
    headers = ["layer", "modality", "channels", "activation", "dead", "abnormal", "constant", "low gain",
               "collapsed", "possibly dead", "worst z", "dead channels"]
    kinds = "clrlrrrrrrrl"
    if probe:
        headers[-1:-1] = ["measured dead", "rarely active"]
        kinds = "clrlrrrrrrrrrl"
    rows = []
    for layer in layers:
        row = [str(layer.get("name")), str(layer.get("modality")), fmt_num(layer.get("channels")), _activation(layer)]
        row += [fmt_num(acc.count(layer.get(k))) for k in FLAG_KEYS[:5]]
        row += [fmt_num(acc.count(layer.get("possibly_dead_channels"))), fmt_fixed(acc.worst_z(layer))]
        if probe:
            row += [fmt_num(acc.count(layer.get("measured_dead_channels"))),
                    fmt_num(acc.count(layer.get("rarely_active_channels")))]
        row.append(preview(layer.get("dead_channels")) or NONE)
        rows.append(row)
    return Table(f"BN layers with flagged channels ({len(layers)})", headers, rows, kinds)


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
               str(layer.get("activation_source") or NONE),
               f"{fmt_num(layer.get('eps'))} ({layer.get('eps_source', '?')})",
               fmt_num(acc.count(layer.get("dead_channels"))), fmt_fixed(acc.worst_z(layer)),
               fmt_num(layer.get("min_fire_prob"))]
        if probe:
            measured = layer.get("measured_dead_channels")
            row += [fmt_num(acc.count(measured)) if measured is not None else NONE,
                    fmt_num(layer.get("positions_seen"))]
        rows.append(row)
    return Table(f"All BN layers ({len(layers)})", headers, rows, kinds, collapsed=True)


def _dormant_blocks(dormant: dict) -> list[Block]:
    """The ReDo dormant units of the probed activation, MLP, conv and attention layers (inspect --data)."""
    if not dormant:
        return []
    tau = acc.finite_num(dormant.get("tau"))
    test = "output exactly 0" if not tau else f"score <= {tau:g}"
    layers = acc.dicts(dormant.get("layers"))
    out: list[Block] = [Text(f"Dormant units (ReDo, {test}): {fmt_num(dormant.get('n_dormant'))} of "
                             f"{fmt_num(dormant.get('n_units'))} units in {len(layers)} layers"
                             + (f"; {dormant['note']}" if dormant.get("note") else ""), "text")]
    rows = []
    for name, m in acc.obj(dormant.get("modalities")).items():
        m = acc.obj(m)
        kinds = ", ".join(f"{k} {fmt_num(acc.obj(v).get('dormant'))}/{fmt_num(acc.obj(v).get('units'))}"
                          for k, v in acc.obj(m.get("by_kind")).items())
        rows.append([str(name), fmt_num(m.get("n_layers")), fmt_num(m.get("n_units")), fmt_num(m.get("n_dormant")),
                     fmt_pct(m.get("dormant_ratio")), kinds])
    if rows:
        out.append(Table("Dormant units per modality", ["modality", "layers", "units", "dormant", "ratio", "by kind"],
                         rows, "lrrrrl", collapsed=False))
    if layers:
        out.append(Table(f"Dormant units per layer ({len(layers)})",
                         ["layer", "kind", "modality", "module", "units", "dormant", "min score", "dormant units"],
                         [[str(x.get("name")), str(x.get("kind")), str(x.get("modality")), str(x.get("module_type")),
                           fmt_num(x.get("units")), fmt_num(x.get("n_dormant")), fmt_fixed(x.get("min_score")),
                           preview(x.get("dormant_units")) or NONE] for x in layers], "cllcrrrl"))
    return out


def _layernorm_blocks(scan: dict) -> list[Block]:
    """The static LayerNorm scan: per modality, then the layers with flagged features or feeding rows."""
    if not scan:
        return []
    rows = []
    for name, t in acc.obj(scan.get("modalities")).items():
        t = acc.obj(t)
        rows.append([str(name)] + [fmt_num(t.get(k)) for k in ("n_layers", "n_features", "n_constant", "n_low_gain",
                                                              "n_nonfinite", "n_collapsed_rows")])
    out: list[Block] = [Table("LayerNorm layers per modality (static: constant means |gamma| * sqrt(D-1) < "
                              f"{fmt_num(acc.obj(scan.get('thresholds')).get('constant_scale'))})",
                              ["modality", "layers", "features", "constant", "low gain", "non-finite",
                               "collapsed feeding rows"], rows, "lrrrrrr", collapsed=False)]
    flagged = [x for x in acc.dicts(scan.get("layers"))
               if acc.count(x.get("constant_features")) or acc.count(x.get("low_gain_features"))
               or acc.count(x.get("nonfinite_features"))
               or any(acc.count(acc.obj(f).get("collapsed_rows")) for f in acc.obj(x.get("feeding_linears")).values())]
    if flagged:
        out.append(Table(f"LayerNorm layers with flagged features ({len(flagged)})",
                         ["layer", "modality", "features", "constant", "low gain", "non-finite", "min |gamma|"],
                         [[str(x.get("name")), str(x.get("modality")), fmt_num(x.get("features")),
                           preview(x.get("constant_features")) or NONE, preview(x.get("low_gain_features")) or NONE,
                           preview(x.get("nonfinite_features")) or NONE, fmt_num(x.get("min_abs_gain"))]
                          for x in flagged], "clrlllr"))
    return out
