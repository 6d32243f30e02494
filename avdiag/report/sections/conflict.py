"""The report section of `avdiag conflict`: gradient conflict and contribution per modality, OGM-GE
and OPM, the per-layer conflict and contribution figures."""

from __future__ import annotations

from avdiag.report import access as acc
from avdiag.report import plots
from avdiag.report.blocks import Chart, Section, Table, Text, section_builder
from avdiag.report.cells import fmt_num, fmt_pct, kv_table


@section_builder("conflict")
def conflict_section(res: dict, anchor: str) -> Section:
    data = res.get("data")
    name = data.get("name", "?") if isinstance(data, dict) else (data or "?")  # schema 1.0: the name itself
    section = Section(anchor, "conflict", f"conflict: {acc.checkpoint_path(res)} on {name}")
    section.add(Text(acc.summary_text(res) or "conflict", "summary"), _modality_table(res))
    skipped = acc.obj(acc.obj(data).get("skipped")) if isinstance(data, dict) else {}
    if skipped.get("count"):
        section.add(Text(f"{skipped['count']} listed row(s) skipped (missing or damaged files); "
                         "the JSON lists them under data.skipped", "note"))
    ogm, opm = acc.obj(res.get("ogm")), acc.obj(res.get("opm"))
    section.add(kv_table("OGM-GE and OPM", [("rho", acc.obj(ogm.get("rho"))),
                                            ("coefficients", acc.obj(ogm.get("coefficients"))),
                                            ("dominant", ogm.get("dominant")),
                                            ("OPM drop probability", acc.obj(opm.get("drop_probability")))]))
    section.add(Chart("conflict-per-layer", "Gradient conflict per layer",
                      "Mean cosine between the multimodal and the uni-modal loss gradients over each layer's "
                      "parameters (<= 0: conflict).", lambda: plots.conflict_per_layer(res)),
                Chart("contribution", "Contribution per modality",
                      "Exact two-modality Shapley values (pooled feature zeroed) and uni-modal accuracy.",
                      lambda: plots.contribution_bars(res)))
    return section


def _modality_table(res: dict) -> Table:
    rows = []
    for m, entry in acc.conflict_modalities(res).items():
        c, k = acc.obj(entry.get("conflict")), acc.obj(entry.get("contribution"))
        shapley = acc.obj(k.get("shapley_mean"))
        rows.append([m, fmt_num(c.get("cos_mean")), fmt_num(c.get("cos_std")), fmt_pct(c.get("conflict_rate")),
                     fmt_num(c.get("magnitude_ratio_mean")), fmt_pct(c.get("sample_conflict_rate")),
                     fmt_num(shapley.get("accuracy")), fmt_num(shapley.get("probability")),
                     fmt_num(k.get("unimodal_accuracy")), fmt_num(acc.path(entry, "ogm", "score"))])
    return Table("Per modality", ["modality", "cos mean", "cos std", "conflict rate", "|g_uni| / |g_mm|",
                                  "sample conflict", "Shapley (acc)", "Shapley (prob)", "uni-modal acc", "OGM score"],
                 rows, "lrrrrrrrrr", collapsed=False)
