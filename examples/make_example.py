"""Build the bundled example checkpoint ``examples/ogm_ge_planted.pt``.

An OGM-GE audio-visual classifier (Peng et al., CVPR 2022) for CREMA-D (6
classes), concat fusion, at stem width 8 so the file stays small, saved the way
the OGM-GE training script saves it: a dict with the epoch, the method's
settings, the accuracy, and the ``model`` / ``optimizer`` / ``scheduler`` state
dicts, the model keys carrying the ``module.`` prefix of ``nn.DataParallel``.

The model takes one real SGD step (momentum 0.9) on random inputs, so the
optimizer state is genuine; then every BatchNorm layer is given realistic
statistics and affine parameters, and a few channels are planted with the two
defects that a cross-modally initialised audio encoder shows:

* negative-bias dead channels: ``gamma = 0.05``, ``beta = -0.5``, so the
  normalised pre-activation sits near ``z = beta / |gamma| = -10`` and the
  following ReLU never fires;
* abnormal affine pairs: ``|gamma|`` and ``|beta|`` both around ``1e-12``
  (``gamma = 3e-13``, ``beta = -2e-13``): the channel is numerically erased.

The planted channels are written to ``examples/ogm_ge_planted.expected.json``
(layer names without the ``module.`` prefix).  Everything is seeded: two runs
give the same tensors.  Run ``python examples/make_example.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from avdiag.models import OGMGEClassifier
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from avdiag.models import OGMGEClassifier

HERE = Path(__file__).resolve().parent
CHECKPOINT_PATH = HERE / "ogm_ge_planted.pt"
EXPECTED_PATH = HERE / "ogm_ge_planted.expected.json"

SEED = 0
N_CLASSES = 6  # CREMA-D
WIDTH = 8
EPOCHS = 30
STEPS_PER_EPOCH = 105  # 6698 CREMA-D training clips, batch size 64
BN_EPS = 1e-5

NEGATIVE_BIAS_LAYERS = (
    "audio_net.bn1",
    "audio_net.layer1.0.bn1",
    "audio_net.layer2.1.bn1",
    "visual_net.layer3.0.bn1",
)
ABNORMAL_PAIR_LAYERS = (
    "audio_net.layer1.1.bn1",
    "audio_net.layer3.0.bn1",
    "audio_net.layer4.1.bn2",
)
DEAD_GAMMA, DEAD_BETA = 0.05, -0.5
TINY_GAMMA, TINY_BETA = 3e-13, -2e-13


def _n_channels(layer: str) -> int:
    """Channels of a BN layer from its name: the stem has WIDTH, layerN has WIDTH*2**(N-1)."""
    stage = layer.split(".")[1]
    return WIDTH if stage == "bn1" else WIDTH * 2 ** (int(stage.removeprefix("layer")) - 1)


def planted_channels() -> dict[str, dict[str, list[int]]]:
    """The planted channel indices: 2-5 per layer, from a seeded generator."""
    gen = torch.Generator().manual_seed(SEED + 1)
    plan: dict[str, dict[str, list[int]]] = {"negative_bias": {}, "abnormal_pair": {}}
    for kind, layers in (("negative_bias", NEGATIVE_BIAS_LAYERS), ("abnormal_pair", ABNORMAL_PAIR_LAYERS)):
        for layer in layers:
            count = int(torch.randint(2, 6, (1,), generator=gen))
            picked = torch.randperm(_n_channels(layer), generator=gen)[:count]
            plan[kind][layer] = sorted(int(i) for i in picked)
    return plan


def _train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One real training step on random inputs, so the optimizer holds momentum buffers."""
    audio = torch.randn(4, 1, 32, 32)
    visual = torch.randn(4, 3, 2, 32, 32)  # (B, C, T, H, W), two frames per clip
    labels = torch.randint(0, N_CLASSES, (4,))
    model.train()
    optimizer.zero_grad()
    _, _, logits = model(audio, visual)
    F.cross_entropy(logits, labels).backward()
    optimizer.step()


@torch.no_grad()
def _set_realistic_bn(model: nn.Module) -> None:
    """Trained-looking BN: running_var ~ U(0.5, 2), running_mean ~ N(0, 0.1),
    gamma ~ N(1, 0.1) clipped at 0.5, beta ~ N(0, 0.1)."""
    gen = torch.Generator().manual_seed(SEED)
    for _, bn in sorted((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)):
        c = bn.num_features
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
        bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        bn.weight.copy_((1.0 + 0.1 * torch.randn(c, generator=gen)).clamp_min(0.5))
        bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
        bn.num_batches_tracked.fill_(EPOCHS * STEPS_PER_EPOCH)
        z = bn.bias / (bn.weight.abs() * torch.sqrt(bn.running_var / (bn.running_var + BN_EPS)))
        assert float(z.min()) >= -2.0, "an unplanted channel already looks dead"


@torch.no_grad()
def _plant(model: nn.Module, plan: dict[str, dict[str, list[int]]]) -> None:
    modules = dict(model.named_modules())
    values = {"negative_bias": (DEAD_GAMMA, DEAD_BETA), "abnormal_pair": (TINY_GAMMA, TINY_BETA)}
    for kind, layers in plan.items():
        gamma, beta = values[kind]
        for layer, channels in layers.items():
            bn = modules[layer]
            assert bn.num_features == _n_channels(layer)
            bn.weight[channels] = gamma
            bn.bias[channels] = beta


def build_checkpoint() -> dict:
    """The checkpoint dict, exactly as ``main`` saves it.

    The caller's RNG state and thread count are restored afterwards.  The training
    step runs on one CPU thread, so the result does not depend on the thread count;
    a CPU with other SIMD kernels may still differ in the last bits of the
    conv weights and momentum buffers (the BN tensors come from the RNG alone).
    """
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return _build()
    finally:
        torch.set_num_threads(threads)


def _build() -> dict:
    model = OGMGEClassifier(n_classes=N_CLASSES, fusion="concat", width=WIDTH)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=70, gamma=0.1)
    _train_one_step(model, optimizer)
    for _ in range(EPOCHS):
        scheduler.step()
    _set_realistic_bn(model)
    _plant(model, planted_channels())
    model.eval()
    return {
        "saved_epoch": EPOCHS,
        "modulation": "OGM_GE",
        "alpha": 0.8,
        "fusion": "concat",
        "acc": 0.61,
        "model": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }


def main() -> None:
    torch.save(build_checkpoint(), CHECKPOINT_PATH)
    EXPECTED_PATH.write_text(json.dumps(planted_channels(), indent=2) + "\n")
    size = CHECKPOINT_PATH.stat().st_size
    print(f"wrote {CHECKPOINT_PATH} ({size / 1e6:.2f} MB) and {EXPECTED_PATH}")


if __name__ == "__main__":
    main()
