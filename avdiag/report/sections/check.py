"""The report section of `avdiag check`: per-checkpoint status, the violations and the rule checks
not evaluated, and with ``--data`` the measurements on data and the contribution-share figure."""

from __future__ import annotations

from avdiag.report import access as acc
from avdiag.report import plots
from avdiag.report.blocks import Block, Chart, Section, Table, Text, section_builder
from avdiag.report.cells import fmt_num, fmt_pct


@section_builder("check")
def check_section(res: dict, anchor: str) -> Section:
    files = acc.dicts(res.get("files"))
    n = acc.summary_fields(res).get("n_checkpoints", len(files))
    title = f"check: {fmt_num(n)} checkpoint(s)" + (f" on {res['data']}" if res.get("data") else "")
    section = Section(anchor, "check", title)
    section.add(Text(acc.summary_text(res) or "check", "summary"),
                Table("Checkpoints", ["path", "status", "violations", "not evaluated", "summary"],
                      [_file_row(f) for f in files], "clrrl"))
    violations = [v for f in files for v in acc.dicts(f.get("violations"))]
    if violations:
        section.add(Table("Violations", ["severity", "rule", "path", "location", "message", "outcome"],
                          [_violation_row(v) for v in violations], "sccclc"))
    skipped = [(str(f.get("path")), n) for f in files for n in acc.dicts(f.get("not_evaluated"))]
    if skipped:
        section.add(Table("Not evaluated", ["path", "rule", "reason"],
                          [[path, str(n.get("rule_id")), str(n.get("reason"))] for path, n in skipped], "ccl"))
    if acc.check_data_files(res):
        section.add(*_data_blocks(res))
    return section


def _file_row(f: dict) -> list[str]:
    summary = f.get("error") or acc.obj(f.get("inspection")).get("text") or ""
    return [str(f.get("path")), str(f.get("status")), fmt_num(acc.count(f.get("violations"))),
            fmt_num(acc.count(f.get("not_evaluated"))), str(summary)]


def _violation_row(v: dict) -> list[str]:
    outcome = f"suppressed: {v.get('suppression_reason')}" if v.get("suppressed") else str(v.get("outcome"))
    return [str(v.get("severity")), str(v.get("rule_id")), str(v.get("path")), str(v.get("location")),
            str(v.get("message")), outcome]


def _data_blocks(res: dict) -> list[Block]:
    rows = []
    for f in acc.check_data_files(res):
        for m, x in acc.obj(acc.path(f, "data", "modalities")).items():
            x = acc.obj(x)
            rows.append([str(f.get("path")), str(m), fmt_num(x.get("share_accuracy")),
                         fmt_num(x.get("unimodal_accuracy")), fmt_num(x.get("rho")), fmt_num(x.get("cos_mean")),
                         fmt_pct(x.get("conflict_rate"))])
    return [Table("On the data", ["path", "modality", "contribution share", "uni-modal acc", "OGM rho", "cos mean",
                                  "conflict rate"], rows, "clrrrrr", collapsed=False),
            Chart("check-shares", "Contribution share per checkpoint",
                  "Each modality's Shapley share of the gain over the head's biases (0: ignored, 0.5: balanced); "
                  "the dashed line is the policy's min_share.", lambda: plots.check_shares(res))]
