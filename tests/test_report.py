"""HTML and Markdown reports (`avdiag.report.html`, `avdiag.report.markdown`, `avdiag.report.plots`).

The result dicts come from the library on a generated checkpoint (a width-8 OGM-GE model with
planted dead and abnormal channels, plus one constant channel whose z is -inf): inspect without and
with per-channel arrays, inspect with a probe on synthetic data, reinit (ABRi fold) and diff of the
input against the rewritten file. Each is round-tripped through strict JSON, as `avdiag report`
reads them from files. The HTML is parsed with html.parser; every image is decoded and verified
with PIL.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from avdiag.errors import UsageError
from avdiag.inspection import ProbeOptions, inspect_checkpoint
from avdiag.measure.diff import diff_checkpoints
from avdiag.models import OGMGEClassifier
from avdiag.report.html import render_html, write_report
from avdiag.report.markdown import render_markdown
from avdiag.rewrite.reinit import reinit_checkpoint
from layout_fixtures import N_CLASSES, WIDTH, planted_av, state_dict, strict_json

CONSTANT = ("audio_net.layer2.0.bn1", 5)  # gamma 0, beta < 0: s = 0, z = -inf, dead
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# figures per section of the combined report (inspect with probe and per-channel arrays, reinit, diff)
INSPECT_CHARTS = ["dead-ratio", "z-histogram", "fire-rate", "measured-vs-predicted"]
REINIT_CHARTS = ["dead-before-after"]
DIFF_CHARTS = ["dead-before-after", "bn-layers"]


def _json(d: dict) -> dict:
    return strict_json(json.dumps(d, allow_nan=False))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = OGMGEClassifier(N_CLASSES, width=WIDTH)
    planted_av(model, "audio_net", "visual_net")
    sd = state_dict(model)
    sd[CONSTANT[0] + ".weight"][CONSTANT[1]] = 0.0
    sd[CONSTANT[0] + ".bias"][CONSTANT[1]] = -0.1
    ckpt = folder / "model.pt"
    torch.save({"model": sd, "epoch": 3}, ckpt)
    static = inspect_checkpoint(ckpt)
    probed = inspect_checkpoint(ckpt, probe=ProbeOptions(data=f"synthetic:n=16,classes={N_CLASSES}", limit=16,
                                                         batch_size=16, device="cpu"))
    fixed = folder / "fixed.pt"
    rewrite = reinit_checkpoint(ckpt, fixed)
    diff = diff_checkpoints(ckpt, fixed)
    return {"static": _json(static.to_dict()), "static_pc": _json(static.to_dict(per_channel=True)),
            "probed": _json(probed.to_dict(per_channel=True)), "reinit": _json(rewrite.to_dict()),
            "diff": _json(diff.to_dict())}


@pytest.fixture(scope="module")
def combined(results) -> str:
    return render_html([results["probed"], results["reinit"], results["diff"]])


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
    assert constant["per_channel"]["z"][CONSTANT[1]] == "-inf"  # drawn as a note, not a bar
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
    page = _parse(render_html([results["static"]]))
    (section,) = page.sections
    assert section["charts"] == ["dead-ratio"]
    assert "no per-channel arrays" in "".join(section["text"])
    _png(section["images"][0]["src"])
    with_arrays = _parse(render_html([results["static_pc"]])).sections[0]
    assert with_arrays["charts"] == ["dead-ratio", "z-histogram"]
    assert "no per-channel arrays" not in "".join(with_arrays["text"])
    assert not any("predicted vs measured" in h or "firing rate" in h for h in with_arrays["h3"])


def test_html_title_and_escaping(results):
    weird = json.loads(json.dumps(results["static"]))
    weird["checkpoint"]["path"] = "<script>alert(1)</script>.pt"
    weird["layers"] = []  # no figure: this test is about text
    text = render_html([weird], title="A & B <report>")
    assert "<script>" not in text
    page = _parse(text)
    assert page.sections[0]["h2"] == ["inspect: <script>alert(1)</script>.pt"]
    assert "<title>A &amp; B &lt;report&gt;</title>" in text


def test_unknown_command_gets_a_generic_section():
    other = {"schema_version": "1.0", "tool": {"name": "avdiag", "version": "9", "command": "calibrate"},
             "summary": {"text": "3 conflicting pairs"}, "pairs": [[1, 2]], "score": "inf"}
    future = {"schema_version": "2.0", "tool": {"name": "avdiag", "command": "inspect"}, "layers": "?"}
    page = _parse(render_html([other, future]))
    assert [s["command"] for s in page.sections] == ["calibrate", "inspect"]
    first, second = page.sections
    assert first["images"] == [] and second["images"] == []
    assert "3 conflicting pairs" in "".join(first["text"])
    assert "JSON" in first["h3"]  # the folded JSON dump
    assert "no dedicated view" in "".join(first["text"])
    assert "schema '2.0'" in "".join(second["text"])
    md = render_markdown([other])
    assert "3 conflicting pairs" in md and "```json" in md


def test_sparse_and_odd_results_render():
    """Only what the JSON has is rendered: a minimal inspect dict, a layerless one, infinities as strings."""
    minimal = {"schema_version": "1.0", "tool": {"command": "inspect"},
               "modalities": {"audio": {"n_dead": 1, "n_bn_channels": 2, "dead_ratio": 0.5}},
               "layers": [{"name": "enc.bn", "modality": "audio", "channels": 2, "feeds_activation": "yes",
                           "dead_channels": [1], "worst_z": "-inf",
                           "per_channel": {"z": ["-inf", "nan"], "fire_prob": [0.0, "nan"]}}]}
    empty = {"schema_version": "1.0", "tool": {"command": "inspect"}, "layers": [], "modalities": {}}
    page = _parse(render_html([minimal, empty]))
    assert page.sections[0]["charts"] == ["dead-ratio", "z-histogram"]
    for img in page.sections[0]["images"]:
        _png(img["src"])
    assert page.sections[1]["images"] == []
    assert "No BatchNorm layer" in "".join(page.sections[1]["text"])
    assert "-inf" in render_markdown([minimal])


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
    md = render_markdown([probed, reinit, diff])
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


def test_markdown_with_image_dir_writes_pngs(results, tmp_path):
    images = tmp_path / "img"
    md = render_markdown([results["reinit"], results["diff"]], image_dir=images)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(REINIT_CHARTS + DIFF_CHARTS)
    assert "```text" not in md  # figures as images, not as Unicode charts
    for link in links:
        path = Path(link)
        assert path.parent == images
        with Image.open(path) as image:
            image.verify()
    assert sorted(p.name for p in images.iterdir()) == sorted(Path(link).name for link in links)


# ---- write_report ----------------------------------------------------------------------------------


def test_write_report_by_suffix(results, tmp_path):
    rs = [results["reinit"]]  # one figure: cheap to draw
    write_report(rs, tmp_path / "r.html")
    write_report(rs, tmp_path / "r.HTM")
    write_report(rs, tmp_path / "r.md")
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "r.HTM").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "r.md").read_text().startswith("## ")
    assert not (tmp_path / "r_files").exists()
    # Markdown with images: PNGs beside it, linked relatively
    write_report(rs, tmp_path / "pr.md", images=True)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (tmp_path / "pr.md").read_text())
    assert links and all(link.startswith("pr_files/") for link in links)
    assert all((tmp_path / link).is_file() for link in links)
    # an existing report is replaced, and no temporary file is left behind
    (tmp_path / "r.html").write_text("old")
    write_report(rs, tmp_path / "r.html", title="again")
    assert "<title>again</title>" in (tmp_path / "r.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pr.md", "pr_files", "r.HTM", "r.html", "r.md"]


@pytest.mark.parametrize("name", ["r.txt", "r", "r.json", "r.pdf"])
def test_write_report_refuses_other_suffixes(results, tmp_path, name):
    with pytest.raises(UsageError, match=r"\.html, \.htm or \.md") as err:
        write_report([results["static"]], tmp_path / name)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_report_unwritable_targets(results, tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        write_report([results["static"]], tmp_path)
    (tmp_path / "d.html").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        write_report([results["static"]], tmp_path / "d.html")
    with pytest.raises(UsageError, match="does not exist"):
        write_report([results["static"]], tmp_path / "missing" / "r.html")


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
    for render in (render_html, render_markdown):
        with pytest.raises(UsageError, match=message) as err:
            render(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=message):
        write_report(bad, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_importing_avdiag_does_not_import_matplotlib():
    code = ("import sys, avdiag, avdiag.report.html, avdiag.report.markdown, avdiag.report.plots\n"
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
    render_html([results["static"]])
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc
    if had_pyplot:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == figures  # nothing left open in pyplot
    else:
        assert "matplotlib.pyplot" not in sys.modules  # drawn on a bare Agg canvas, pyplot never imported
