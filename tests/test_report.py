"""Reports: the document model (`avdiag.report.document`, `avdiag.report.sections`), its renderers
(`avdiag.report.html`, `avdiag.report.markdown`), the figures (`avdiag.report.plots`, read through
`avdiag.report.access`) and `avdiag.workflows.report` (reading --json files, writing a report).

The result dicts come from the library on a generated checkpoint (a width-8 OGM-GE model with
planted dead and abnormal channels, plus one constant channel whose z is -inf): inspect without and
with per-channel arrays, inspect with a probe on synthetic data, reinit (ABRi fold) and diff of the
input against the rewritten file. Each is round-tripped through strict JSON, as `avdiag report`
reads them from files. conflict and check documents are small hand-written dicts of their JSON
shape (the commands themselves need a model run on data). The HTML is parsed with html.parser;
every image is decoded and verified with PIL.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

from avdiag.errors import UsageError
from avdiag.report import access
from avdiag.report.blocks import registered_commands, section_builder
from avdiag.report.document import Chart, Table, build_document
from avdiag.report.html import render_html
from avdiag.report.markdown import render_markdown
from avdiag.report.plots import write_conflict_plots
from avdiag.workflows.datasource import DataSource
from avdiag.workflows.diff import diff as run_diff
from avdiag.workflows.inspect import inspect as run_inspect
from avdiag.workflows.reinit import reinit as run_reinit
from avdiag.workflows.report import load_results, report
from helpers.checkpoints import av_model
from helpers.cli import strict_json
from layout_fixtures import N_CLASSES, state_dict
from test_layering import GRAPH, MODULES

CONSTANT = ("audio_net.layer2.0.bn1", 5)  # gamma 0, beta < 0: s = 0, z = -inf, dead
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# figures per section of the combined report (inspect with probe and per-channel arrays, reinit, diff)
INSPECT_CHARTS = ["dead-ratio", "z-histogram", "fire-rate", "measured-vs-predicted"]
REINIT_CHARTS = ["dead-before-after"]
DIFF_CHARTS = ["dead-before-after", "bn-layers"]


def _json(d: dict) -> dict:
    return strict_json(json.dumps(d, allow_nan=False))


def html_of(results, title: str | None = None) -> str:
    return render_html(build_document(results, title))


def markdown_of(results, title: str | None = None) -> str:
    return render_markdown(build_document(results, title)).text


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("report")
    sd = state_dict(av_model("ogm-ge", planted=True)[0])
    sd[CONSTANT[0] + ".weight"][CONSTANT[1]] = 0.0
    sd[CONSTANT[0] + ".bias"][CONSTANT[1]] = -0.1
    ckpt = folder / "model.pt"
    torch.save({"model": sd, "epoch": 3}, ckpt)
    static = run_inspect(ckpt)
    probed = run_inspect(ckpt, data=DataSource(f"synthetic:n=16,classes={N_CLASSES}", limit=16, batch_size=16,
                                               device="cpu"))
    fixed = folder / "fixed.pt"
    rewrite = run_reinit(ckpt, fixed)
    compared = run_diff(ckpt, fixed)
    return {"static": _json(static.to_dict()), "static_pc": _json(static.to_dict(per_channel=True)),
            "probed": _json(probed.to_dict(per_channel=True)), "reinit": _json(rewrite.to_dict()),
            "diff": _json(compared.to_dict())}


@pytest.fixture(scope="module")
def combined(results) -> str:
    return html_of([results["probed"], results["reinit"], results["diff"]])


def _conflict_doc(samples: bool = True) -> dict:
    """A schema-1.1 `avdiag conflict` document: two modalities, a null (non-finite) cosine std and
    per-layer cosine, per-sample rows, and with ``samples`` the per-sample Shapley table."""
    def entry(cos, std, shapley, layers):
        return {"conflict": {"cos_mean": cos, "cos_std": std, "conflict_rate": 0.25, "magnitude_ratio_mean": 0.7,
                             "sample_conflict_rate": 0.5, "per_layer": layers},
                "contribution": {"shapley_mean": {"accuracy": shapley, "probability": 0.2},
                                 "unimodal_accuracy": 0.6},
                "ogm": {"score": 3.5}}
    doc = {"schema_version": "1.1", "tool": {"name": "avdiag", "version": "x", "command": "conflict"},
           "checkpoints": [{"path": "runs/av.pt", "format": "torch-zip", "sha256": None}],
           "checkpoint": {"path": "runs/av.pt", "format": "torch-zip", "sha256": None}, "data": "synthetic",
           "modalities": {"audio": entry(0.4, None, 0.3, {"audio_net.layer1": 0.5, "audio_net.layer2": -0.2}),
                          "visual": entry(-0.1, 0.2, None, {"visual_net.layer1": None, "visual_net.layer2": 0.1})},
           "ogm": {"rho": {"audio": 1.2, "visual": 0.8}, "coefficients": {"audio": 0.9, "visual": 1.0},
                   "dominant": "audio"},
           "opm": {"drop_probability": {"audio": 0.3, "visual": None}},
           "conflict": {"samples": [{"index": i, "label": i % 3, "cos_audio": 0.5 - 0.1 * i,
                                     "cos_visual": None if i == 2 else 0.2} for i in range(6)]},
           "contribution": {},
           "summary": {"text": "audio: cos +0.400 (conflict 25%); OGM-GE dominant: audio", "dominant": "audio"}}
    if samples:
        doc["contribution"]["samples"] = {"index": list(range(6)),
                                          "phi_audio_probability": [0.1, 0.2, None, 0.3, 0.1, 0.0],
                                          "phi_visual_probability": [0.0, 0.1, 0.1, 0.2, None, 0.3]}
    return doc


def _check_doc() -> dict:
    """A schema-1.1 `avdiag check --data` document over two checkpoints, one share null (not finite)."""
    def entry(path, share):
        return {"path": path, "status": "fail" if share is None else "pass", "error": None,
                "violations": [{"rule_id": "modality-contribution", "severity": "error", "path": path,
                                "location": "modality:visual", "message": "visual share below 0.1",
                                "outcome": "fail", "suppressed": False, "suppression_reason": None}]
                if share is None else [],
                "not_evaluated": [{"rule_id": "layer-not-probed", "reason": "no probe"}],
                "inspection": {"text": f"{path}: 3 dead"},
                "data": {"modalities": {"audio": {"share_accuracy": 0.7, "unimodal_accuracy": 0.5, "rho": 1.1,
                                                  "cos_mean": 0.3, "conflict_rate": 0.1},
                                        "visual": {"share_accuracy": share, "unimodal_accuracy": 0.4, "rho": 0.9,
                                                   "cos_mean": None, "conflict_rate": None}}}}
    return {"schema_version": "1.1", "tool": {"name": "avdiag", "version": "x", "command": "check"},
            "checkpoints": [{"path": "a.pt", "format": None, "sha256": None},
                            {"path": "b.pt", "format": None, "sha256": None}],
            "data": "synthetic",
            "policy": {"rules": {"modality-contribution": {"severity": "error", "params": {"min_share": 0.1}}}},
            "files": [entry("a.pt", 0.3), entry("b.pt", None)],
            "summary": {"n_checkpoints": 2, "text": "check fail: 2 checkpoint(s): 1 passed, 1 failed"}}


# ---- parsing the HTML ----------------------------------------------------------------------------


class Page(HTMLParser):
    """Sections (with their images, charts, headings and tables) and every tag's attributes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self.depth = 0  # nesting of <section>
        self._text_target: list[str] | None = None
        self._table: dict | None = None
        self._cell: list[str] | None = None

    @property
    def current(self) -> dict | None:
        return self.sections[-1] if self.depth else None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self.depth += 1
            self.sections.append({"command": a.get("data-command"), "id": a.get("id"), "images": [], "charts": [],
                                  "h2": [], "h3": [], "tables": [], "text": []})
        sec = self.current
        if sec is None:
            return
        if tag == "img":
            sec["images"].append(a)
        elif tag == "figure":
            sec["charts"].append(a.get("data-chart"))
        elif tag in ("h2", "h3", "summary"):
            self._text_target = []
        elif tag == "table":
            self._table = {"headers": [], "rows": []}
        elif tag == "tr" and self._table is not None:
            self._table["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        sec = self.current
        if tag == "section":
            self.depth -= 1
            return
        if sec is None:
            return
        if tag in ("h2", "h3", "summary") and self._text_target is not None:
            sec["h2" if tag == "h2" else "h3"].append("".join(self._text_target).strip())
            self._text_target = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            text = "".join(self._cell).strip()
            if tag == "th":
                self._table["headers"].append(text)
            else:
                self._table["rows"][-1].append(text)
            self._cell = None
        elif tag == "table" and self._table is not None:
            self._table["rows"] = [r for r in self._table["rows"] if r]
            sec["tables"].append(self._table)
            self._table = None

    def handle_data(self, data):
        if self._text_target is not None:
            self._text_target.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self.current is not None:
            self.current["text"].append(data)


def _parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def _png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(PNG_MAGIC)
    Image.open(io.BytesIO(data)).verify()
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def _table(section: dict, first_header: str, *also: str) -> dict:
    for t in section["tables"]:
        if t["headers"] and t["headers"][0] == first_header and all(h in t["headers"] for h in also):
            return t
    raise AssertionError(f"no table starting with {first_header!r} {also} in {section['command']}")


def _column(table: dict, name: str) -> dict[str, str]:
    i = table["headers"].index(name)
    return {row[0]: row[i] for row in table["rows"]}


# ---- HTML ----------------------------------------------------------------------------------------


def test_html_combined_sections_and_images(combined, results):
    page = _parse(combined)
    assert combined.startswith("<!DOCTYPE html>")
    assert [s["command"] for s in page.sections] == ["inspect", "reinit", "diff"]
    inspect, reinit, diff = page.sections
    assert inspect["charts"] == INSPECT_CHARTS
    assert reinit["charts"] == REINIT_CHARTS
    assert diff["charts"] == DIFF_CHARTS
    for section in page.sections:
        assert len(section["images"]) == len(section["charts"])
        for img in section["images"]:
            image = _png(img["src"])
            assert image.size == (int(img["width"]), int(img["height"]))
            assert 600 <= image.size[0] <= 800 and 200 <= image.size[1] <= 400  # ~ 7 x 3 inches at 100 dpi
            assert img.get("alt")
    assert len(combined.encode()) < 1_000_000
    # the table of contents links to every section
    links = [a["href"] for tag, a in page.tags if tag == "a"]
    assert links == [f"#{s['id']}" for s in page.sections]


def test_html_is_self_contained(combined):
    page = _parse(combined)
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed", "base"), tag
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)  # no inline event handlers
            if name in ("src", "href", "srcset", "poster", "action", "data") and value:
                assert value.startswith(("data:image/png;base64,", "#")), (tag, name, value[:60])
    style = re.search(r"<style>(.*?)</style>", combined, re.S).group(1)
    assert "url(" not in style and "@import" not in style
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", combined)


def test_html_inspect_tables_match_the_json(combined, results):
    probed = results["probed"]
    constant = next(layer for layer in probed["layers"] if layer["name"] == CONSTANT[0])
    assert constant["per_channel"]["z"][CONSTANT[1]] is None  # schema 1.1: a non-finite float is null
    assert access.channel_z(constant["per_channel"])[CONSTANT[1]] == -math.inf  # restored from s = 0, beta < 0
    inspect = _parse(combined).sections[0]
    assert inspect["h2"] == [f"inspect: {probed['checkpoint']['path']}"]
    for heading in ("Checkpoint", "Per modality", "Dead-channel ratio per BN layer", "Distribution of z = beta / s",
                    "Measured firing rate per channel", "Dead channels per BN layer: predicted vs measured",
                    "Prediction vs measurement (probed layers)", f"All BN layers ({len(probed['layers'])})"):
        assert heading in inspect["h3"], heading
    assert probed["summary"]["text"] in "".join(inspect["text"])
    modalities = _table(inspect, "modality", "dead (ratio)", "measured dead")
    dead = _column(modalities, "dead (ratio)")
    measured = _column(modalities, "measured dead")
    for name, m in probed["modalities"].items():
        assert dead[name].startswith(f"{m['n_dead']} (")
        assert measured[name] == str(m["n_measured_dead"])
    layers = _table(inspect, "layer", "activation source")
    assert [row[0] for row in layers["rows"]] == [layer["name"] for layer in probed["layers"]]
    flagged = {row[0] for row in _table(inspect, "layer", "abnormal", "dead channels")["rows"]}
    assert CONSTANT[0] in flagged
    findings = _table(inspect, "severity", "message")
    assert len(findings["rows"]) == len(probed["findings"])


def test_html_reinit_and_diff_tables(combined, results):
    _, reinit, diff = _parse(combined).sections
    before_after = _table(reinit, "modality", "before", "after")
    assert _column(before_after, "before") == {m: str(n) for m, n in results["reinit"]["dead_before"].items()}
    assert _column(before_after, "after") == {m: str(n) for m, n in results["reinit"]["dead_after"].items()}
    rewritten = _table(reinit, "tensor", "norm before")
    assert [row[0] for row in rewritten["rows"]] == [c["name"] for c in results["reinit"]["changes"]]
    d = results["diff"]
    per_modality = _table(diff, "modality", "dead in A", "revived")
    assert _column(per_modality, "revived") == {m: str(v["n_revived"]) for m, v in d["modalities"].items()}
    changed_layers = _table(diff, "layer", "status", "revived")
    expected = [layer["name"] for layer in d["bn_layers"] if layer["status"] != "unchanged"]
    assert expected and [row[0] for row in changed_layers["rows"]] == expected
    tensors = _table(diff, "tensor", "reasons")
    assert {row[0] for row in tensors["rows"]} == {c["name"] for c in d["changed"]}


def test_html_without_per_channel_arrays_says_so(results):
    page = _parse(html_of([results["static"]]))
    (section,) = page.sections
    assert section["charts"] == ["dead-ratio"]
    assert "no per-channel arrays" in "".join(section["text"])
    _png(section["images"][0]["src"])
    with_arrays = _parse(html_of([results["static_pc"]])).sections[0]
    assert with_arrays["charts"] == ["dead-ratio", "z-histogram"]
    assert "no per-channel arrays" not in "".join(with_arrays["text"])
    assert not any("predicted vs measured" in h or "firing rate" in h for h in with_arrays["h3"])


def test_html_title_and_escaping(results):
    weird = json.loads(json.dumps(results["static"]))
    weird["checkpoint"]["path"] = weird["checkpoints"][0]["path"] = "<script>alert(1)</script>.pt"
    weird["layers"] = []  # no figure: this test is about text
    text = html_of([weird], title="A & B <report>")
    assert "<script>" not in text
    page = _parse(text)
    assert page.sections[0]["h2"] == ["inspect: <script>alert(1)</script>.pt"]
    assert "<title>A &amp; B &lt;report&gt;</title>" in text


def test_unknown_command_gets_a_generic_section():
    other = {"schema_version": "1.0", "tool": {"name": "avdiag", "version": "9", "command": "calibrate"},
             "summary": {"text": "3 conflicting pairs"}, "pairs": [[1, 2]], "score": "inf"}
    future = {"schema_version": "2.0", "tool": {"name": "avdiag", "command": "inspect"}, "layers": "?"}
    page = _parse(html_of([other, future]))
    assert [s["command"] for s in page.sections] == ["calibrate", "inspect"]
    first, second = page.sections
    assert first["images"] == [] and second["images"] == []
    assert "3 conflicting pairs" in "".join(first["text"])
    assert "JSON" in first["h3"]  # the folded JSON dump
    assert "no dedicated view" in "".join(first["text"])
    assert "schema '2.0'" in "".join(second["text"])
    md = markdown_of([other])
    assert "3 conflicting pairs" in md and "```json" in md


def test_sparse_and_odd_results_render():
    """Only what the JSON has is rendered: a minimal inspect dict, a layerless one, and the
    non-finite floats of schema 1.0 files written as strings."""
    minimal = {"schema_version": "1.0", "tool": {"command": "inspect"},
               "modalities": {"audio": {"n_dead": 1, "n_bn_channels": 2, "dead_ratio": 0.5}},
               "layers": [{"name": "enc.bn", "modality": "audio", "channels": 2, "feeds_activation": "yes",
                           "dead_channels": [1], "worst_z": "-inf",
                           "per_channel": {"z": ["-inf", "nan"], "fire_prob": [0.0, "nan"]}}]}
    empty = {"schema_version": "1.0", "tool": {"command": "inspect"}, "layers": [], "modalities": {}}
    page = _parse(html_of([minimal, empty]))
    assert page.sections[0]["charts"] == ["dead-ratio", "z-histogram"]
    for img in page.sections[0]["images"]:
        _png(img["src"])
    assert page.sections[1]["images"] == []
    assert "No BatchNorm layer" in "".join(page.sections[1]["text"])
    assert "-inf" in markdown_of([minimal])


# ---- Markdown ------------------------------------------------------------------------------------


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _md_tables(text: str) -> list[list[list[str]]]:
    """GFM tables: lists of rows (header, separator, body), each a list of cells."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append([c.strip() for c in _CELL_SPLIT.split(line)[1:-1]])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def test_markdown_summary_tables_and_text_charts(results):
    probed, reinit, diff = results["probed"], results["reinit"], results["diff"]
    md = markdown_of([probed, reinit, diff])
    assert md.startswith("## ")
    assert "![" not in md and "data:image" not in md
    for title in ("### 1. inspect:", "### 2. reinit:", "### 3. diff:"):
        assert title in md
    assert probed["summary"]["text"].replace("_", "\\_") in md
    tables = _md_tables(md)
    assert tables
    for table in tables:
        assert len(table) >= 3 and set("".join(table[1])) <= set("-:")  # header, separator, rows
        assert all(len(row) == len(table[0]) for row in table), table[0]
    per_modality = next(t for t in tables if t[0][:2] == ["modality", "BN layers"])
    for name, m in probed["modalities"].items():
        row = next(r for r in per_modality[2:] if r[0] == name)
        assert row[3].startswith(f"{m['n_dead']} (")
    before_after = next(t for t in tables if t[0] == ["modality", "before", "after", "change"])
    assert {r[0]: (r[1], r[2]) for r in before_after[2:]} == {
        m: (str(n), str(reinit["dead_after"][m])) for m, n in reinit["dead_before"].items()}
    assert any(t[0][:3] == ["layer", "modality", "status"] for t in tables)  # diff: BN layers that changed
    # Unicode charts in text blocks: dead ratio per layer, before -> after, diff per layer
    blocks = re.findall(r"```text\n(.*?)```", md, re.S)
    assert len(blocks) == 4
    assert all("█" in b for b in blocks)
    # findings with |gamma| keep their pipes escaped inside the table
    assert "\\|gamma\\|" in md
    assert "<details><summary>All BN layers" in md


def test_markdown_with_images_returns_the_pngs(results):
    rendered = render_markdown(build_document([results["reinit"], results["diff"]]), image_prefix="img")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", rendered.text)
    assert len(links) == len(REINIT_CHARTS + DIFF_CHARTS)
    assert "```text" not in rendered.text  # figures as images, not as Unicode charts
    assert sorted(links) == sorted(f"img/{name}" for name in rendered.images)
    for png in rendered.images.values():
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
    assert render_markdown(build_document([results["reinit"]])).images == {}  # text charts: nothing drawn


# ---- one document, two renderers -----------------------------------------------------------------


def _markdown_sections(md: str) -> list[dict]:
    """Per "### n. title" section: its title and the headings of its tables and figures."""
    sections: list[dict] = []
    for line in md.splitlines():
        heading = re.match(r"### \d+\. (.*)", line)
        if heading:
            sections.append({"title": heading.group(1), "headings": []})
        elif sections and (line.startswith("#### ") or line.startswith("<details><summary>")):
            text = line[5:] if line.startswith("#### ") else line[len("<details><summary>"):-len("</summary>")]
            sections[-1]["headings"].append(text)
    return sections


def _unescape_md(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


@pytest.mark.slow
def test_html_and_markdown_render_the_same_sections(results):
    document = build_document([results["probed"], results["reinit"], results["diff"], _conflict_doc(),
                               _check_doc()])
    page = _parse(render_html(document))
    md = render_markdown(document, image_prefix="img")
    md_sections = _markdown_sections(md.text)
    assert [s["command"] for s in page.sections] == [s.command for s in document.sections] == \
        ["inspect", "reinit", "diff", "conflict", "check"]
    assert [s["h2"][0] for s in page.sections] == [_unescape_md(s["title"]) for s in md_sections] == \
        [s.title for s in document.sections]
    for section, html_section, md_section in zip(document.sections, page.sections, md_sections):
        expected = [b.title for b in section.blocks if isinstance(b, (Table, Chart))]
        assert html_section["h3"] == expected, section.command
        assert [_unescape_md(h) for h in md_section["headings"]] == expected, section.command
        charts = [b.key for b in section.blocks if isinstance(b, Chart)]
        assert html_section["charts"] == charts
        assert sorted(name for name in md.images if name.startswith(section.anchor + "-")) == \
            sorted(f"{section.anchor}-{key}.png" for key in charts)


def test_every_command_has_a_section_builder():
    assert registered_commands() == ["check", "conflict", "diff", "inspect", "monitor", "reinit"]
    with pytest.raises(ValueError, match="already registered"):
        section_builder("inspect")(lambda res, anchor: None)


# ---- schema 1.1 nulls and schema 1.0 strings -----------------------------------------------------


def test_null_values_render(results):
    """Schema 1.1 writes non-finite floats as null: every view shows them as an empty cell."""
    doc = json.loads(json.dumps(results["probed"]))
    for m in doc["modalities"].values():
        m["worst_z"] = m["dead_ratio"] = None
    for layer in doc["layers"]:
        layer["worst_z"] = layer["eps"] = None
        layer["per_channel"]["z"] = layer["per_channel"]["scale"] = [None] * len(layer["per_channel"]["z"])
        layer["fire_rate"] = [None, *layer["fire_rate"][1:]]
    rendered = [doc, _conflict_doc(), _check_doc()]
    page = _parse(html_of(rendered))
    inspect_section, conflict, check = page.sections
    assert inspect_section["charts"] == INSPECT_CHARTS
    for section in page.sections:
        for img in section["images"]:
            _png(img["src"])
    per_modality = _table(inspect_section, "modality", "worst z")
    assert set(_column(per_modality, "worst z").values()) == {"–"}
    assert _column(_table(conflict, "modality", "cos std"), "cos std") == {"audio": "–", "visual": "0.2"}
    assert _column(_table(conflict, "modality", "Shapley (acc)"), "Shapley (acc)")["visual"] == "–"
    assert conflict["charts"] == ["conflict-per-layer", "contribution"]
    assert _column(_table(check, "path", "status"), "status") == {"a.pt": "pass", "b.pt": "fail"}
    shares = [row for row in _table(check, "path", "contribution share")["rows"] if row[1] == "visual"]
    assert [row[2] for row in shares] == ["0.3", "–"]
    md = markdown_of(rendered)
    assert "None" not in md and "None" not in "".join(t for s in page.sections for t in s["text"])


def test_schema_1_0_strings_read_like_1_1_nulls():
    assert access.num("-inf") == -math.inf and access.num("inf") == math.inf and math.isnan(access.num("nan"))
    assert access.num(None) is None and access.num("x") is None and access.num(True) == 1.0
    values = access.floats([1, None, "nan", "-inf", "junk"])
    assert values[0] == 1 and values[3] == -math.inf and math.isnan(values[1]) and math.isnan(values[4])
    assert access.summary_text({"summary": "a string (1.0 reinit)"}) == "a string (1.0 reinit)"
    assert access.summary_text({"summary": {"text": "an object"}}) == "an object"
    legacy = {"source": {"path": "in.pt", "format": "torch-zip"}, "target": "out.pt"}
    assert access.checkpoint_path(legacy) == "in.pt"
    assert access.checkpoint_path({"checkpoints": [{"path": "a.pt"}, {"path": "b.pt"}]}, 1) == "b.pt"
    # a constant channel: z null in 1.1, restored from scale 0 and the sign of beta; other nulls stay NaN
    z = access.channel_z({"z": [None, None, None, 1.5], "scale": [0.0, 0.0, None, 1.0],
                          "beta": [-0.1, 0.2, 0.3, 1.5]})
    assert z[0] == -math.inf and z[1] == math.inf and math.isnan(z[2]) and z[3] == 1.5


def test_legacy_reinit_and_conflict_summaries_render():
    """Schema 1.0 reinit and conflict documents had a plain string summary."""
    reinit_doc = {"schema_version": "1.0", "tool": {"name": "avdiag", "command": "reinit"},
                  "source": {"path": "in.pt", "format": "torch-zip", "sha256": None}, "target": "out.pt",
                  "method": "abri", "dead_before": {"audio": 3}, "dead_after": {"audio": 0},
                  "summary": "abri: 2 tensors rewritten into out.pt"}
    conflict_doc = _conflict_doc()
    conflict_doc["schema_version"] = "1.0"
    conflict_doc["summary"] = "audio: cos +0.400 (legacy)"
    conflict_doc["modalities"]["audio"]["conflict"]["cos_std"] = "nan"
    del conflict_doc["checkpoints"]
    page = _parse(html_of([reinit_doc, conflict_doc]))
    reinit_section, conflict = page.sections
    assert reinit_section["h2"] == ["reinit: in.pt → out.pt"]
    assert "abri: 2 tensors rewritten into out.pt" in "".join(reinit_section["text"])
    assert conflict["h2"] == ["conflict: runs/av.pt on synthetic"]
    assert "audio: cos +0.400 (legacy)" in "".join(conflict["text"])
    assert _column(_table(conflict, "modality", "cos std"), "cos std")["audio"] == "nan"


# ---- avdiag conflict --plots ------------------------------------------------------------------------


def test_write_conflict_plots(tmp_path):
    written = write_conflict_plots(_conflict_doc(), tmp_path / "plots")
    assert [p.name for p in written] == ["per_sample_cosine.png", "shapley.png", "per_layer_conflict.png"]
    for path in written:
        with Image.open(path) as image:
            image.verify()
    # without the per-sample table (to_dict() without samples) there is no Shapley histogram
    without = write_conflict_plots(_conflict_doc(samples=False), tmp_path / "no-samples")
    assert [p.name for p in without] == ["per_sample_cosine.png", "per_layer_conflict.png"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot create") as err:
        write_conflict_plots(_conflict_doc(), tmp_path / "file" / "plots")
    assert "\n" not in str(err.value)


# ---- writing a report --------------------------------------------------------------------------------


def test_report_by_suffix(results, tmp_path):
    rs = [results["reinit"]]  # one figure: cheap to draw
    assert report(rs, tmp_path / "r.html") == tmp_path / "r.html"
    report(rs, tmp_path / "r.HTM")
    report(rs, tmp_path / "r.md")
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "r.HTM").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "r.md").read_text().startswith("## ")
    assert not (tmp_path / "r_files").exists()
    # Markdown with images: PNGs beside it, linked relatively
    report(rs, tmp_path / "pr.md", images=True)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (tmp_path / "pr.md").read_text())
    assert links and all(link.startswith("pr_files/") for link in links)
    assert all((tmp_path / link).is_file() for link in links)
    # an existing report is replaced, and no temporary file is left behind
    (tmp_path / "r.html").write_text("old")
    report(rs, tmp_path / "r.html", title="again")
    assert "<title>again</title>" in (tmp_path / "r.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pr.md", "pr_files", "r.HTM", "r.html", "r.md"]


@pytest.mark.parametrize("name", ["r.txt", "r", "r.json", "r.pdf"])
def test_report_refuses_other_suffixes(results, tmp_path, name):
    with pytest.raises(UsageError, match=r"\.html, \.htm or \.md") as err:
        report([results["static"]], tmp_path / name)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_report_unwritable_targets(results, tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        report([results["static"]], tmp_path)
    (tmp_path / "d.html").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        report([results["static"]], tmp_path / "d.html")
    with pytest.raises(UsageError, match="does not exist"):
        report([results["static"]], tmp_path / "missing" / "r.html")


def test_report_never_overwrites_an_input(results, tmp_path):
    source = tmp_path / "input.html"
    source.write_text("an input")
    (tmp_path / "link.html").symlink_to(source)
    for target in (source, tmp_path / "link.html", tmp_path / "." / "input.html"):
        with pytest.raises(UsageError, match="is an input of this command") as err:
            report([results["reinit"]], target, protect=(source,))
        assert "\n" not in str(err.value)
    assert source.read_text() == "an input"


@pytest.mark.parametrize("bad, message", [
    ([{"tool": {"command": "inspect"}, "layers": []}], "result 1 has no schema_version"),
    ([], "no results"),
    (None, "no results"),
    (["inspect.json"], "result 1 is not a JSON object"),
])
def test_bad_input_is_a_usage_error(results, tmp_path, bad, message):
    if bad and isinstance(bad[0], dict):
        bad = [results["static"], *bad]
        message = message.replace("result 1", "result 2")
    with pytest.raises(UsageError, match=message) as err:
        build_document(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=message):
        report(bad, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    (b"\xff\xfe not text", "not a UTF-8 text file"),
    (b"{not json", r"not JSON \(line 1"),
    (b"[1, 2]", "not an avdiag JSON result"),
    (b'{"schema_version": "1.1", "tool": {"name": "other"}}', "of 'other', not of avdiag"),
])
def test_load_results_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        load_results([path])
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_load_results_reads_what_the_commands_wrote(results, tmp_path):
    paths = []
    for name in ("static", "reinit"):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(results[name]))
    assert load_results(paths) == [results["static"], results["reinit"]]


# ---- layering --------------------------------------------------------------------------------------


def test_report_modules_layering():
    """Renderers import the document, never each other; the document reaches the section builders
    only through the sections package; nothing in report/ imports a workflow or the CLI."""
    report_modules = [m for m in MODULES if m.startswith("avdiag.report.")]
    for renderer, other in (("avdiag.report.html", "avdiag.report.markdown"),
                            ("avdiag.report.markdown", "avdiag.report.html")):
        assert "avdiag.report.document" in GRAPH[renderer]
        assert other not in GRAPH[renderer]
        assert "avdiag.report.plots" not in GRAPH[renderer]
    assert not {m for m in GRAPH["avdiag.report.document"] if m.startswith("avdiag.report.sections.")}
    for module in report_modules:
        assert not {m for m in GRAPH[module] if m.startswith(("avdiag.workflows", "avdiag.cli"))}, module
        if module.startswith("avdiag.report.sections.") or module == "avdiag.report.plots":
            assert "avdiag.report.document" not in GRAPH[module], module
    assert "avdiag.load.write" not in {m for r in report_modules for m in GRAPH[r]}  # writing is the workflow's


def test_importing_avdiag_does_not_import_matplotlib():
    code = ("import sys, avdiag, avdiag.report.document, avdiag.report.html, avdiag.report.markdown, "
            "avdiag.report.plots, avdiag.workflows.report\n"
            "print('matplotlib' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MPLBACKEND": "svg"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_rendering_leaves_matplotlib_state_alone(results):
    import matplotlib

    backend, rc = matplotlib.get_backend(), dict(matplotlib.rcParams)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    figures = sys.modules["matplotlib.pyplot"].get_fignums() if had_pyplot else None
    html_of([results["static"]])
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc
    if had_pyplot:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == figures  # nothing left open in pyplot
    else:
        assert "matplotlib.pyplot" not in sys.modules  # drawn on a bare Agg canvas, pyplot never imported
