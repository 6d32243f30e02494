"""`avdiag check`: a CI gate over many checkpoints, driven by a policy.

The section below is written to be pasted into the README as it is.

## `avdiag check`: a policy gate for CI

```bash
avdiag check models/                                   # every checkpoint under models/ (recursively)
avdiag check 'runs/*/best.pt' extra.safetensors        # globs (quoted: avdiag expands them), files, folders
avdiag check models/ --sarif avdiag.sarif --junit avdiag.xml --json report.json
avdiag check model.pt --baseline old/model.pt          # fail when dead channels grew versus OLD
avdiag check models/ --baseline old_models/            # OLD: a folder holding same-named checkpoints
avdiag check models/ --policy ci/avdiag.toml
avdiag check model.pt --data cremad:/data/CREMA-D --split test --limit 512     # + contribution and conflict rules
avdiag check model.pt --baseline old/model.pt --data vggsound:/data/vggsound --limit 256  # + contribution fall
```

Options: `--policy PATH`, `--baseline OLD`, `--json PATH` (`-`: stdout), `--junit PATH`,
`--sarif PATH`, `--fail-on error|warning` and `--on-nothing-analysed error|violation|pass` (override
the policy), `--allow-global pkg.Class` (repeatable), `-q/--quiet` (the summary line only), `--debug`,
and the data options of `inspect --data` (`--data SPEC`, `--model`, `--device`, `--split`,
`--batch-size`, `--limit`, `--seed`, `--amp`, preprocessing) with `--ogm-alpha`.
A pre-commit hook (`avdiag-check`, in `.pre-commit-hooks.yaml`) and a GitHub Actions workflow
(`examples/ci/github-actions.yml`: CPU torch, SARIF upload to code scanning) are included. The hook
is `language: system`: it runs the `avdiag` installed in the environment you commit from (installed
with the CPU torch, as `make` does), so pre-commit builds no environment of its own and never pulls
the multi-GB CUDA build of torch that an unpinned `pip install torch` would.

Every checkpoint is analysed in one process (the static scan of `inspect`, without the file's
SHA-256 unless the policy says `hash = true`), with progress on stderr (a bar on a terminal, a
plain line every 10 s when piped; none with `-q`). A file that cannot be
analysed never stops the run: it becomes a violation of its rule in that file's report.

Folders are searched recursively (hidden folders skipped) for files named `*.pt *.pth *.bin *.ckpt
*.safetensors *.pt2 *.pth.tar` and for other files whose first bytes are a torch zip, a legacy torch
pickle, a safetensors header or the pre-1.0 torch tar format (which avdiag refuses: `unreadable`); a folder holding a `*.index.json` is one sharded checkpoint. A file
named on the command line is always checked, whatever its name. Each file is checked once.

### Exit codes

| code | meaning |
|---|---|
| 0 | every checkpoint passed the policy |
| 1 | policy violations: a violation at or above `fail_on` (including `unsafe-pickle`), or a path that analysed nothing with `on_nothing_analysed = "violation"` |
| 2 | errors: a checkpoint that could not be analysed (`unreadable`, `analysis-error`, a baseline that could not be read), a path that analysed nothing (`lfs-pointer`, `nothing-analysed`, with the default `on_nothing_analysed = "error"`), or a usage error (bad option or policy: one line on stderr) |

2 wins over 1. An unsafe pickle is a **finding**, not an error: avdiag read the pickle's opcodes,
found globals outside torch's weights-only allow-list and refused to load it, so the file's verdict
is conclusive (it must not be loaded). This follows the convention of model-file scanners, which
exit 1 when they find a dangerous file and 2 when they could not scan one. A truncated or corrupt
file, by contrast, could not be analysed at all: exit 2.

A path that matches no checkpoint, a folder without checkpoints, a Git LFS pointer (the weights
were never fetched) or a checkpoint without tensors is never a silent pass: `on_nothing_analysed`
decides whether it is an error (default, exit 2), a violation (exit 1) or a pass (still reported,
as info).

### Rules

Rule ids are stable (never renamed or reused). Content rules share their ids with the findings of
`avdiag inspect`, and `inspect` reports a finding at the severity of its rule's default here.
Severities: `error`, `warning`, `info` (`note` is accepted as another name for it), or `off` (not
evaluated). A violation fails the run when its severity is at least `fail_on` (default `error`) and
it is not suppressed.

| id | default | what fails | parameters [defaults] |
|---|---|---|---|
| `unsafe-pickle` | error (fixed) | a pickle names globals outside torch's weights-only allow-list (a torch checkpoint, a plain pickle, a shard of a sharded folder); the file is refused, nothing in it runs | - |
| `unreadable` | error (fixed, exit 2) | missing, empty, truncated or corrupt file, or not a format avdiag reads | - |
| `analysis-error` | error (fixed, exit 2) | the file loaded but could not be analysed (e.g. a policy `modality` prefix that matches no tensor of it) | - |
| `lfs-pointer` | `on_nothing_analysed` | a Git LFS pointer file instead of the weights (`git lfs pull`) | - |
| `nothing-analysed` | `on_nothing_analysed` | a path or glob that matches no checkpoint, a folder without checkpoints, a checkpoint without tensors, or a run in which every path was excluded | - |
| `nonfinite-tensor` | error | a tensor holds NaN or Inf (one violation per tensor) | - |
| `dead-channels` | error | the dead BatchNorm channel ratio of a modality, or of a layer matched by a glob, is above its threshold | `max_ratio` [0.05] per modality; `modalities` {name = ratio} overrides it for one modality; `layers` {glob = ratio} adds per-layer checks (first matching glob wins) |
| `abnormal-affine` | warning | the ratio of abnormal affine pairs (\\|gamma\\| and \\|beta\\| < threshold) is above its threshold | as `dead-channels`; `max_ratio` [0.0: any abnormal pair] |
| `collapsed-filters` | warning | conv filters feeding a BN are ~0 (one violation per layer) | - |
| `no-batchnorm` | warning | no BatchNorm layer: the dead-channel scan had nothing to look at | - |
| `dead-channels-growth` | error | with `--baseline`: a modality has more dead channels than in OLD | `max_growth` [0] channels; `modalities` {name = channels}; `max_ratio_growth` [unset]: also fail when the dead ratio grew by more |
| `constant-channels`, `low-gain-channels`, `possibly-dead-channels`, `prediction-mismatch` | off | the informational findings of `inspect` (any occurrence) | - |
| `measured-dead-channels`, `layer-not-probed` | warning | findings of a probe on data (only when the checkpoint was run on data) | - |
| `measured-nonfinite-outputs` | error | BN channels whose outputs were NaN or infinite on the data; their other measured verdicts are withheld | - |
| `dormant-units` | warning | with `--data`: the share of a modality's dormant units (ReDo score <= tau on activation, MLP, conv and attention outputs, measured by the probe) is above its threshold | `max_ratio` [0.05] per modality; `modalities` {name = ratio} |
| `modality-contribution` | warning | with `--data`: a modality contributes too little to the prediction (one violation per modality, every threshold it breaks in the message) | `min_share` [0.2]: the modality's contribution share (below); `modalities` {name = share} overrides it; `value` ["accuracy"] or "probability"; `min_unimodal_accuracy` [unset]: a ratio, or {name = ratio}; `max_rho` [unset]: fail the weaker modality when the other's OGM-GE score is more than this many times its own |
| `modality-conflict` | warning | with `--data`: the multimodal and uni-modal gradients of a modality's encoder conflict (MMPareto cosine, per batch) | `min_cos_mean` [0.0]: the mean cosine over batches below it; `max_conflict_rate` [0.5]: the share of batches with cosine <= 0 above it; `min_head_cos` [unset]: the cosine of the two uni-modal losses' gradients on the shared head below it (location `head`) |
| `modality-contribution-drop` | error | with `--baseline` and `--data`: a modality's contribution share fell versus OLD on the same data | `max_drop` [0.05]; `modalities` {name = drop}; `value` as above; `max_accuracy_drop` [unset]: also fail when its uni-modal accuracy fell by more |
| `run-imbalance` | warning | a training run log (`RUN.jsonl` of `avdiag.monitor`): one modality's epoch-mean OGM-GE rho (its score over the other's) stayed above `max_rho` in each of the last `epochs` epochs | `max_rho` [3.0]; `epochs` [3] |
| `run-conflict` | warning | a run log: a modality's MMPareto cosine was below `min_cos` in more than `max_share` of the last `steps` logged steps with a cosine | `min_cos` [0.0]; `max_share` [0.5]; `steps` [20] |
| `run-dead-channels-growth` | error | a run log: a modality's dead BatchNorm channels at the last epoch exceed those at the start (or the first epoch) by more than `max_growth` | `max_growth` [0] |

A path ending in `.jsonl` is a training run log written by `avdiag.monitor`: only the `run-*` rules
apply to it (it is reported with `kind = "run-log"`; a file that is not a run log is `unreadable`),
and the `run-*` rules never apply to checkpoints.

Violations are located: `location` is a tensor name (`nonfinite-tensor`), a BN layer name, or
`modality:NAME`; empty for file-level rules.

### Policy

`avdiag.toml` (table `[check]`) in the current folder, else `[tool.avdiag.check]` in
`pyproject.toml` there, else the defaults above; `--policy PATH` names either kind of file.
Unknown keys, rule ids or parameters are errors, not ignored.

```toml
[tool.avdiag.check]            # in avdiag.toml: [check]
fail_on = "error"              # "error" or "warning": the lowest severity that fails the run
on_nothing_analysed = "error"  # "error" | "violation" | "pass"
exclude = ["models/archive/*"] # globs of paths not to check (relative to the policy file's folder)
allow_globals = []             # pickle globals admitted as inert placeholders (as --allow-global)
hash = false                   # compute each file's SHA-256 (reported in the JSON and SARIF)

[tool.avdiag.check.inspect]    # the static scan's settings, as inspect's options
dead_z = -3.0
abnormal_threshold = 1e-10
modality = ["audio=enc_a", "visual=enc_v"]
assume_activation = "relu"

[tool.avdiag.check.rules]
nonfinite-tensor = "error"                                   # a string sets the severity
dead-channels = { max_ratio = 0.05, modalities = { audio = 0.10 }, layers = { "visual_net.layer4.*" = 0.25 } }
abnormal-affine = { severity = "error", max_ratio = 0.01 }
dead-channels-growth = { max_growth = 2 }
possibly-dead-channels = "info"
modality-contribution = { severity = "error", min_share = 0.25, max_rho = 3.0 }   # with --data
modality-conflict = { min_cos_mean = -0.05, max_conflict_rate = 0.6 }

[[tool.avdiag.check.suppress]]
path = "models/legacy/*.pt"         # glob on the path relative to the policy file's folder ('*' crosses '/')
rules = ["dead-channels"]           # default: every suppressible rule
locations = ["modality:audio"]      # optional globs on the location
reason = "audio encoder initialised from ImageNet; tracked in #12"   # required
```

`[inspect]` keys: `dead_z`, `abnormal_threshold`, `constant_scale`, `low_gain`, `collapsed_filter`,
`bn_eps`, `assume_activation`, `modality`. Suppressed violations stay in every report (SARIF
`suppressions`, JSON `suppressed`), but never fail the run. `unsafe-pickle`, `unreadable`,
`analysis-error`, `lfs-pointer` and `nothing-analysed` cannot be suppressed: skip a path with
`exclude`, or set `on_nothing_analysed`. `check` never loads with full pickle.

`--baseline OLD`: OLD is one checkpoint (when one checkpoint is checked) or a folder; for each
checked file, `OLD/<path relative to the folder given>` and then `OLD/<file name>` are tried. A file
without a counterpart reports `dead-channels-growth` as *not evaluated*; a baseline that cannot be
read is an error (exit 2), reported under `unreadable` / `unsafe-pickle` with location `baseline`.
With `--data` as well, OLD runs on the same data and `modality-contribution-drop` compares the
contribution shares (JSON: `files[].baseline.contribution`).

### On data: `--data SPEC`

With `--data`, each checkpoint's model (resolved as for `inspect --data`: the registry, or `--model`)
runs on the data: the probe findings (`measured-dead-channels`, `measured-nonfinite-outputs`,
`layer-not-probed`) and the data rules
are evaluated. Their figures are those of `avdiag conflict` (per-batch gradients only, no per-sample
pass, no held-out learning state) and are in the JSON as `files[].data`: per modality
`share_accuracy`, `share_probability`, `shapley_accuracy`, `shapley_probability`,
`unimodal_accuracy`, `ogm_score`, `rho`, `cos_mean`, `conflict_rate`; and `fused_accuracy`,
`empty_accuracy`, `head_cos_mean`, `n_samples`, `n_batches`. The terminal shows them in one line per
checkpoint.

The **contribution share** of a modality is its exact two-player Shapley value in the *gain* game
`g(S) = 1[correct_S] - 1[correct_empty]` (a modality removed by zeroing its pooled feature, as in
`avdiag conflict`), divided by the sum of both, `fused accuracy - empty-coalition accuracy`: a
modality the fused head ignores gets 0, two modalities that contribute alike get 0.5 each, and a
modality that hurts the prediction gets a negative share. It is computed exactly from the paper's
sample-level values (`phi'_a = ((phi_a - phi_v) + acc_fused - acc_empty) / 2`). The paper's own game,
`v(S) = |S| * 1[correct_S]`, is not used for thresholds because it gives a modality the head ignores
about a quarter of the value. When the fused model does no better than its head's biases the share
does not exist and the rule reports *not evaluated* for that modality.

A checkpoint whose model cannot be built (not an audio-visual classifier the registry knows, and no
`--model`) keeps its static verdict; its probe and data rules are *not evaluated*, with the reason. A
data spec that cannot be opened is a usage error (exit 2). Without `--data`, the data rules are not
checked at all, unless the policy names them: then each checkpoint reports them as *not evaluated*
("needs data").

### Reports

All at once: the terminal (one line per checkpoint, its violations, a summary line), `--json PATH`
(`-`: stdout, nothing else there; schema 1.1, `tool.command = "check"`, `checkpoints`: one
`{path, format, sha256}` per checkpoint checked), `--junit PATH` (one
`testsuite` per checkpoint, one `testcase` per enabled rule: `failure` for violations that fail the
run, `error` for files that could not be analysed, `skipped` for rules not evaluated), `--sarif PATH`
(SARIF 2.1.0, validated against the OASIS schema in the tests: rules with their configured level (`info` is
SARIF's `note`),
one result per violation with the checkpoint's path, the tensor / layer / modality as a logical
location, and `partialFingerprints["avdiag/v1"]` = a hash of rule id, path and location, stable
across runs). Under GitHub Actions (`GITHUB_ACTIONS=true`) each unsuppressed violation is also an
annotation line (`::error file=...,title=...::message`; `::notice` for info) on stdout (on stderr with `--json -`), and a
Markdown summary is appended to `$GITHUB_STEP_SUMMARY`.

From Python, `avdiag.check(paths, policy=None, *, baseline=None, allow_globals=(), data=None,
ogm_alpha=0.8, inspect_options=None)` returns a `CheckResult` (`exit_code`, `files`, `violations`,
`to_dict()`, `to_frame()`: one row per violation); `data` is an `avdiag.DataSource`, decoded once for
every checkpoint and the baseline.
"""

from avdiag.workflows.check.figures import DataFigures
from avdiag.workflows.check.paths import CHECKPOINT_SUFFIXES, expand_paths, looks_like_checkpoint
from avdiag.workflows.check.policy import FAIL_ON, Policy, Rule, Suppression
from avdiag.workflows.check.results import CheckResult, FileReport, Violation, fingerprint
from avdiag.workflows.check.rules import REGISTRY, RULE_IDS, SUPPRESSIBLE, CheckRule
from avdiag.workflows.check.run import check

__all__ = ["check", "CheckResult", "FileReport", "Violation", "Policy", "Rule", "Suppression", "CheckRule",
           "DataFigures", "REGISTRY", "RULE_IDS", "SUPPRESSIBLE", "FAIL_ON", "CHECKPOINT_SUFFIXES", "expand_paths",
           "looks_like_checkpoint", "fingerprint"]
