"""Layout detection for the transformer audio-visual families: state dicts generated with the real key
names (and the real shapes' structure, at a small width) get the right modality for every tensor, the
joint blocks the modality ``shared``."""

from __future__ import annotations

import pytest
import torch

from avdiag.workflows.inspect import inspect

D, CLASSES = 8, 5
AUDIO, VISUAL, SHARED, TEXT, OTHER = "audio", "visual", "shared", "text", "other"


def _vit_block(prefix: str, modality: str, extra_norms: dict[str, str] | None = None) -> list:
    """timm Block keys (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), and per-modality norms."""
    rows = [(f"{prefix}.norm1.weight", (D,), modality), (f"{prefix}.norm1.bias", (D,), modality),
            (f"{prefix}.attn.qkv.weight", (3 * D, D), modality), (f"{prefix}.attn.qkv.bias", (3 * D,), modality),
            (f"{prefix}.attn.proj.weight", (D, D), modality), (f"{prefix}.attn.proj.bias", (D,), modality),
            (f"{prefix}.norm2.weight", (D,), modality), (f"{prefix}.norm2.bias", (D,), modality),
            (f"{prefix}.mlp.fc1.weight", (4 * D, D), modality), (f"{prefix}.mlp.fc1.bias", (4 * D,), modality),
            (f"{prefix}.mlp.fc2.weight", (D, 4 * D), modality), (f"{prefix}.mlp.fc2.bias", (D,), modality)]
    for norm, m in (extra_norms or {}).items():
        rows += [(f"{prefix}.{norm}.weight", (D,), m), (f"{prefix}.{norm}.bias", (D,), m)]
    return rows


def _norm(name: str, modality: str) -> list:
    return [(f"{name}.weight", (D,), modality), (f"{name}.bias", (D,), modality)]


def cav_mae() -> list:
    """CAV-MAE fine-tuning model (CAVMAEFT), saved under DataParallel."""
    rows = [("patch_embed_a.proj.weight", (D, 1, 16, 16), AUDIO), ("patch_embed_a.proj.bias", (D,), AUDIO),
            ("patch_embed_v.proj.weight", (D, 3, 16, 16), VISUAL), ("patch_embed_v.proj.bias", (D,), VISUAL),
            ("pos_embed_a", (1, 512, D), AUDIO), ("pos_embed_v", (1, 196, D), VISUAL),
            ("modality_a", (1, 1, D), AUDIO), ("modality_v", (1, 1, D), VISUAL)]
    for i in range(2):
        rows += _vit_block(f"blocks_a.{i}", AUDIO) + _vit_block(f"blocks_v.{i}", VISUAL)
    rows += _vit_block("blocks_u.0", SHARED, {"norm1_a": AUDIO, "norm1_v": VISUAL, "norm2_a": AUDIO, "norm2_v": VISUAL})
    rows += _norm("norm_a", AUDIO) + _norm("norm_v", VISUAL) + _norm("norm", SHARED)
    rows += [("mlp_head.0.weight", (D,), OTHER), ("mlp_head.0.bias", (D,), OTHER),
             ("mlp_head.1.weight", (CLASSES, D), OTHER), ("mlp_head.1.bias", (CLASSES,), OTHER)]
    return [("module." + k, s, m) for k, s, m in rows]


def mavil() -> list:
    rows = [("patch_embed_a.proj.weight", (D, 1, 16, 16), AUDIO), ("patch_embed_v.proj.weight", (D, 3, 2, 16, 16), VISUAL),
            ("pos_embed_a", (1, 64, D), AUDIO), ("pos_embed_v", (1, 98, D), VISUAL)]
    rows += _vit_block("blocks_a.0", AUDIO) + _vit_block("blocks_v.0", VISUAL) + _vit_block("blocks_av.0", SHARED)
    rows += _vit_block("blocks_av.1", SHARED)
    rows += _norm("norm_a", AUDIO) + _norm("norm_v", VISUAL)
    for head in ("head_a", "head_v", "head_av"):
        rows += [(f"{head}.weight", (CLASSES, D), OTHER), (f"{head}.bias", (CLASSES,), OTHER)]
    return rows


def imagebind() -> list:
    rows = []
    for m, modality, stem in (("vision", VISUAL, (D, 3, 2, 14, 14)), ("audio", AUDIO, (D, 1, 16, 16)),
                              ("text", TEXT, None)):
        pre = f"modality_preprocessors.{m}"
        if stem is None:
            rows += [(f"{pre}.token_embedding.weight", (100, D), modality),
                     (f"{pre}.pos_embed", (1, 77, D), modality)]
        else:
            rows += [(f"{pre}.rgbt_stem.proj.1.weight" if m == "vision" else f"{pre}.rgbt_stem.proj.weight", stem, modality),
                     (f"{pre}.cls_token", (1, 1, D), modality),
                     (f"{pre}.pos_embedding_helper.pos_embed", (1, 50, D), modality)]
        trunk = f"modality_trunks.{m}"
        rows += [(f"{trunk}.blocks.0.attn.in_proj_weight", (3 * D, D), modality),
                 (f"{trunk}.blocks.0.attn.out_proj.weight", (D, D), modality),
                 (f"{trunk}.blocks.0.norm_1.weight", (D,), modality), (f"{trunk}.blocks.0.mlp.fc1.weight", (4 * D, D), modality),
                 (f"{trunk}.blocks.0.norm_2.weight", (D,), modality)]
        rows += [(f"modality_heads.{m}.0.weight", (D,), modality), (f"modality_heads.{m}.2.weight", (4, D), modality),
                 (f"modality_postprocessors.{m}.1.log_logit_scale", (), modality)]
    return rows


def _bn(prefix: str, c: int, modality: str, prelu: str | None = None) -> list:
    rows = [(f"{prefix}.{r}", (c,), modality) for r in ("weight", "bias", "running_mean", "running_var")]
    rows.append((f"{prefix}.num_batches_tracked", (), modality))
    if prelu:
        rows.append((f"{prelu}.weight", (c,), modality))
    return rows


def av_hubert() -> list:
    v = "feature_extractor_video.resnet"
    rows = [("feature_extractor_audio.proj.weight", (D, 104), AUDIO), ("feature_extractor_audio.proj.bias", (D,), AUDIO),
            (f"{v}.frontend3D.0.weight", (4, 1, 5, 7, 7), VISUAL)]
    rows += _bn(f"{v}.frontend3D.1", 4, VISUAL, f"{v}.frontend3D.2")
    rows += [(f"{v}.trunk.layer1.0.conv1.weight", (4, 4, 3, 3), VISUAL)]
    rows += _bn(f"{v}.trunk.layer1.0.bn1", 4, VISUAL, f"{v}.trunk.layer1.0.relu1")
    rows += [(f"{v}.trunk.layer1.0.conv2.weight", (4, 4, 3, 3), VISUAL)] + _bn(f"{v}.trunk.layer1.0.bn2", 4, VISUAL)
    rows += [("feature_extractor_video.proj.weight", (D, 4), VISUAL),
             ("post_extract_proj.weight", (D, 2 * D), OTHER), ("mask_emb", (D,), OTHER),
             ("encoder.pos_conv.0.weight_v", (D, D // 4, 3), SHARED),
             ("encoder.layers.0.self_attn.k_proj.weight", (D, D), SHARED),
             ("encoder.layers.0.self_attn.q_proj.weight", (D, D), SHARED),
             ("encoder.layers.0.self_attn_layer_norm.weight", (D,), SHARED),
             ("encoder.layers.0.fc1.weight", (4 * D, D), SHARED), ("encoder.layers.0.final_layer_norm.weight", (D,), SHARED),
             ("encoder.layer_norm.weight", (D,), SHARED), ("layer_norm.weight", (2 * D,), OTHER),
             ("final_proj.weight", (CLASSES, D), OTHER)]
    return rows


def audioclip() -> list:
    rows = [("audio.conv1.weight", (4, 1, 7, 7), AUDIO)] + _bn("audio.bn1", 4, AUDIO)
    rows += [("audio.layer1.0.conv1.weight", (4, 4, 1, 1), AUDIO)] + _bn("audio.layer1.0.bn1", 4, AUDIO)
    rows += [("audio.fc.weight", (D, 4), AUDIO), ("visual.conv1.weight", (4, 3, 3, 3), VISUAL)]
    rows += _bn("visual.bn1", 4, VISUAL)
    rows += [("visual.attnpool.positional_embedding", (50, 4), VISUAL), ("visual.attnpool.q_proj.weight", (4, 4), VISUAL),
             ("transformer.resblocks.0.attn.in_proj_weight", (3 * D, D), TEXT),
             ("transformer.resblocks.0.ln_1.weight", (D,), TEXT), ("transformer.resblocks.0.mlp.c_fc.weight", (4 * D, D), TEXT),
             ("token_embedding.weight", (100, D), TEXT), ("positional_embedding", (77, D), TEXT),
             ("ln_final.weight", (D,), TEXT), ("text_projection", (D, D), TEXT),
             ("logit_scale", (), OTHER), ("logit_scale_ai", (), OTHER), ("logit_scale_at", (), OTHER)]
    return rows


FAMILIES = {"cav-mae": cav_mae, "mavil": mavil, "imagebind": imagebind, "av-hubert": av_hubert, "audioclip": audioclip}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_tensor_gets_its_modality(tmp_path, family):
    rows = FAMILIES[family]()
    path = tmp_path / f"{family}.pt"
    torch.save({k: torch.zeros(s) for k, s, _ in rows}, path)
    result = inspect(path, hash_file=False)
    assert result.layout.name == family
    wrong = {k: (result.layout.modality_of(k), m) for k, _, m in rows if result.layout.modality_of(k) != m}
    assert wrong == {}
    expected = [m for m in dict.fromkeys(m for _, _, m in rows) if m != OTHER]
    assert list(result.layout.modalities) == expected
    for v in result.layers:  # BatchNorm layers take their modality from the layout as well
        assert v.layer.modality == next(m for k, _, m in rows if k.startswith(v.layer.name + "."))


def test_outer_prefixes_do_not_hide_the_layout(tmp_path):
    rows = av_hubert()
    path = tmp_path / "finetuned.pt"
    torch.save({"w2v_encoder.w2v_model." + k: torch.zeros(s) for k, s, _ in rows}, path)
    result = inspect(path, hash_file=False)
    assert result.layout.name == "av-hubert"
    assert all(result.layout.modality_of("w2v_encoder.w2v_model." + k) == m for k, _, m in rows)
    assert {v.layer.modality for v in result.layers} == {VISUAL}
    assert list(result.to_dict()["layout"]["modalities"]) == [AUDIO, VISUAL, SHARED]


def test_cav_mae_shared_modality_is_reported_on_its_own(tmp_path):
    path = tmp_path / "cav.pt"
    torch.save({k: torch.zeros(s) for k, s, _ in cav_mae()}, path)
    doc = inspect(path, hash_file=False).to_dict()
    assert doc["layout"]["modalities"] == {"audio": "patch_embed_a.", "visual": "patch_embed_v.", "shared": "blocks_u."}
    assert [h["name"] for h in doc["layout"]["heads"]] == ["mlp_head.1"]  # DataParallel's module. unwrapped


def _relearned(rows: list, modality: str) -> set[str]:
    """What D&R re-initialises in ``modality``'s encoder, read off the rows: every layer weight (two or
    more dimensions) and the gamma/beta of every normalisation layer (one-dimensional weight)."""
    shapes = {k: s for k, s, _ in rows}
    out = set()
    for k, s, m in rows:
        module, _, leaf = k.rpartition(".")
        norm = len(shapes.get(f"{module}.weight", ())) == 1
        if m == modality and (leaf.endswith("weight") and len(s) >= 2 or norm and leaf in ("weight", "bias")):
            out.add(k)
    return out


@pytest.mark.parametrize("family", ["cav-mae", "mavil"])
def test_relearn_reinitialises_every_tensor_of_each_encoder_by_the_layout(tmp_path, cli, family):
    """Given alphas and initial weights, relearn on a transformer layout rewrites exactly each uni-modal
    encoder's layer weights and norm gamma/beta, wherever the layout's name patterns put them (not only
    under one prefix); the shared blocks and the heads stay."""
    rows = FAMILIES[family]()
    gen = torch.Generator().manual_seed(0)
    current = {k: torch.randn(s, generator=gen) for k, s, _ in rows}
    initial = {k: torch.randn(s, generator=gen) for k, s, _ in rows}
    src, init, out = tmp_path / "model.pt", tmp_path / "init.pt", tmp_path / "relearned.pt"
    torch.save(current, src)
    torch.save(initial, init)
    result = cli("reinit", src, "--out", out, "--method", "relearn", "--alpha-audio", "0.5", "--alpha-visual",
                 "0.25", "--init-ckpt", init, "--json", "-", "-q").json()
    written = torch.load(out, weights_only=True)
    alphas = {AUDIO: 0.5, VISUAL: 0.25}
    targets = {m: _relearned(rows, m) for m in alphas}
    assert targets[AUDIO] and targets[VISUAL] and any(".blocks_" in f".{k}" for k in targets[AUDIO])
    for k, _, m in rows:
        if k in targets.get(m, set()):
            want = (alphas[m] * initial[k].double() + (1 - alphas[m]) * current[k].double()).float()
            assert torch.equal(written[k], want), k
        else:
            assert torch.equal(written[k], current[k]), k
    assert set(result["parameters"]["per_modality"]) == {AUDIO, VISUAL}


def test_relearn_on_the_built_in_transformer_diagnoses_on_data_and_rewrites_its_layers(tmp_path, cli):
    """D&R end to end on a BatchNorm-free model: the learning state from the encoders' pooled features,
    then every attention / MLP weight and LayerNorm gamma/beta of a moving encoder pulled towards the
    architecture's seeded initialisation; biases, the head and the other encoder's tensors stay."""
    from avdiag.models.arch.av_transformer import AVTransformer

    torch.manual_seed(5)  # not the initialisation's seed (--init-seed 0)
    model = AVTransformer(4, dim=16, depth=1)
    with torch.no_grad():  # as after training: LayerNorms away from their initial 1 / 0
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    src, out = tmp_path / "avt.pt", tmp_path / "relearned.pt"
    torch.save(model.state_dict(), src)
    spec = "synthetic:n=16,classes=4,audio=0.9,visual=0.3,seed=1,f=16,t=16,size=16,frames=2"  # the encoder pools 2 frames itself
    result = cli("reinit", src, "--out", out, "--method", "relearn", "--data", spec, "--device", "cpu",
                 "--batch-size", "8", "--alpha-visual", "0", "--json", "-", "-q").json()
    alpha = result["diagnosis"]["audio"]["alpha"]
    assert 0 < alpha < 1 and result["parameters"]["per_modality"]["visual"] == "alpha 0: unchanged"
    before, after = model.state_dict(), torch.load(out, weights_only=True)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    shapes = {k: tuple(v.shape) for k, v in before.items()}
    want = {k for k in before if k.startswith("audio_encoder.") and (
        k.endswith("weight") and len(shapes[k]) >= 2
        or len(shapes.get(k.rsplit(".", 1)[0] + ".weight", ())) == 1 and k.endswith((".weight", ".bias")))}
    assert {"audio_encoder.blocks.0.attn.in_proj_weight", "audio_encoder.blocks.0.mlp.fc1.weight",
            "audio_encoder.norm.weight", "audio_encoder.norm.bias"} <= want
    assert changed == want
