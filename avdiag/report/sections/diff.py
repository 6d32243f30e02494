"""The report section of `avdiag diff`: the two checkpoints, per-modality changes, dead channels
A -> B (per modality and per BN layer), the BN layers and tensors that changed."""

from __future__ import annotations

from avdiag.report import access as acc
from avdiag.report import plots
from avdiag.report.blocks import Block, Chart, Code, Section, Table, Text, section_builder
from avdiag.report.cells import NONE, fmt_bytes, fmt_num, preview


@section_builder("diff")
def diff_section(res: dict, anchor: str) -> Section:
    section = Section(anchor, "diff", f"diff: {acc.checkpoint_path(res, 0)} → {acc.checkpoint_path(res, 1)}")
    section.add(Text(acc.summary_text(res) or "diff", "summary"), _checkpoints_table(res))
    atol = acc.finite_num(res.get("atol"))
    if atol:
        section.add(Text(f"Values compared with atol {fmt_num(atol)} (elements within it count as equal).", "note"))
    mods = {str(k): acc.obj(v) for k, v in acc.obj(res.get("modalities")).items()}
    if mods:
        section.add(*_modality_blocks(mods))
    bn_layers = acc.dicts(res.get("bn_layers"))
    if bn_layers:
        section.add(*_bn_layer_blocks(res, bn_layers))
    changed = acc.dicts(res.get("changed"))
    if changed:
        section.add(Table(f"Changed tensors ({len(changed)})",
                          ["tensor", "modality", "reasons", "shape", "dtype", "changed elements", "max |Δ|",
                           "rel change", "channels changed"], [_tensor_row(c) for c in changed], "cllllrrrr",
                          collapsed=True))
    for label in ("added", "removed"):
        names = acc.items(res.get(label))
        if names:
            section.add(Table(f"Tensors {label} ({len(names)})", ["tensor"], [[str(n)] for n in names], "c"))
    return section


def _checkpoints_table(res: dict) -> Table:
    # a and b hold the size and tensor count; the 1.1 checkpoints list holds path, format and sha256
    refs = acc.checkpoint_refs(res)
    rows = []
    for i, (side, key) in enumerate((("A", "a"), ("B", "b"))):
        ref = refs[i] if i < len(refs) else {}
        ck = {**acc.obj(res.get(key)), **{k: v for k, v in ref.items() if v is not None}}
        rows.append([side, str(ck.get("path")), str(ck.get("format")), str(ck.get("sha256") or "not computed"),
                     fmt_num(ck.get("n_tensors")), fmt_bytes(ck.get("size_bytes"))])
    return Table("Checkpoints", ["side", "path", "format", "sha256", "tensors", "size"], rows, "lcllrr",
                 collapsed=False)


def _modality_blocks(mods: dict[str, dict]) -> list[Block]:
    rows = []
    for name, m in mods.items():
        cb, ca = m.get("n_bn_channels_before"), m.get("n_bn_channels_after")
        rows.append([name, fmt_num(ca) if cb == ca else f"{fmt_num(cb)} → {fmt_num(ca)}",
                     fmt_num(m.get("n_dead_before")), fmt_num(m.get("n_dead_after")), fmt_num(m.get("n_died")),
                     fmt_num(m.get("n_revived")),
                     f"{fmt_num(m.get('n_changed_tensors'))}/{fmt_num(m.get('n_tensors'))}",
                     fmt_num(m.get("n_added_tensors")), fmt_num(m.get("n_removed_tensors")),
                     fmt_num(m.get("mean_rel_change"))])
    out: list[Block] = [Table("Per modality", ["modality", "BN channels", "dead in A", "dead in B", "died", "revived",
                                               "changed tensors", "added", "removed", "mean rel change"], rows,
                              "lrrrrrrrrr", collapsed=False)]
    with_bn = [n for n, m in mods.items() if acc.integer(m.get("n_bn_channels_before"))
               or acc.integer(m.get("n_bn_channels_after"))]
    if with_bn:
        before = [acc.integer(mods[n].get("n_dead_before")) for n in with_bn]
        after = [acc.integer(mods[n].get("n_dead_after")) for n in with_bn]
        out.append(Chart(
            "dead-before-after", "Dead BN channels, A → B",
            "Channels the static scan judges dead in checkpoint A (before) and in B (after), per modality.",
            lambda: plots.dead_before_after(with_bn, before, after, "dead BN channels per modality: A → B"),
            lambda: [Code("", plots.before_after_text(with_bn, before, after))]))
    return out


def _bn_layer_blocks(res: dict, bn_layers: list[dict]) -> list[Block]:
    out: list[Block] = [Chart(
        "bn-layers", "Dead channels per BN layer, A → B",
        "For every BN layer in network order: channels dead in A and in B; x: how many of its channels "
        "changed (any of gamma, beta, running mean or variance).",
        lambda: plots.diff_layers(res), lambda: [Code("", plots.diff_layers_text(res))])]
    moved = [layer for layer in bn_layers if layer.get("status") != "unchanged" or acc.count(layer.get("died"))
             or acc.count(layer.get("revived"))]
    if not moved:
        return out + [Text("No BN layer changed.", "note")]
    rows = []
    for layer in moved:
        rel = acc.obj(layer.get("rel_change"))
        rows.append([str(layer.get("name")), str(layer.get("modality")), str(layer.get("status")),
                     fmt_num(layer.get("n_channels_changed")), fmt_num(layer.get("n_dead_before")),
                     fmt_num(layer.get("n_dead_after")), preview(layer.get("died")) or NONE,
                     preview(layer.get("revived")) or NONE]
                    + [fmt_num(rel.get(k)) for k in ("gamma", "beta", "running_mean", "running_var")])
    out.append(Table(f"BN layers that changed ({len(moved)})",
                     ["layer", "modality", "status", "channels changed", "dead in A", "dead in B", "died", "revived",
                      "rel Δ gamma", "rel Δ beta", "rel Δ mean", "rel Δ var"], rows, "cllrrrllrrrr"))
    return out


def _tensor_row(c: dict) -> list[str]:
    sa, sb = acc.items(c.get("shape_a")), acc.items(c.get("shape_b"))
    da, db = c.get("dtype_a"), c.get("dtype_b")
    channels = f"{fmt_num(c.get('n_channels_changed'))}/{fmt_num(c.get('channels'))}" \
        if c.get("channels") is not None else NONE
    return [str(c.get("name")), str(c.get("modality")), ", ".join(map(str, acc.items(c.get("reasons")))),
            str(sa) if sa == sb else f"{sa} → {sb}", str(da) if da == db else f"{da} → {db}",
            f"{fmt_num(c.get('n_changed_elements'))}/{fmt_num(c.get('n_elements'))}",
            fmt_num(c.get("max_abs_diff")), fmt_num(c.get("rel_change")), channels]
