"""Reading avdiag's JSON result documents: the one layer through which section builders and plots
look at a result dict.

A report may be rebuilt from files written by any avdiag 1.x, so every reader here accepts both
shapes of the contract:

- schema 1.1: non-finite floats are JSON ``null``; ``summary`` is an object with ``text``; a
  ``checkpoints`` list names the files the command read;
- schema 1.0: non-finite floats were the strings ``"nan"``, ``"inf"`` and ``"-inf"``; ``summary`` was a
  plain string for reinit and conflict; checkpoints sat under command-specific keys.

Missing or mistyped fields read as "nothing" (``None``, an empty dict or list, NaN in arrays) rather
than raising: a section shows what its JSON holds and nothing else.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KNOWN_SCHEMA_MAJOR = "1"
_INFINITIES = {"inf": math.inf, "+inf": math.inf, "infinity": math.inf, "+infinity": math.inf,
               "-inf": -math.inf, "-infinity": -math.inf, "nan": math.nan}


# ---- plain values --------------------------------------------------------------------------------


def num(value: Any) -> float | None:
    """A JSON number (or a schema-1.0 ``"nan"``/``"inf"``/``"-inf"`` string) as a float; None for null
    and anything else."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, str):
        return _INFINITIES.get(value.strip().lower())
    return None


def num_or_nan(value: Any) -> float:
    """Like :func:`num`, with NaN for a missing value (null in schema 1.1 means "not finite")."""
    v = num(value)
    return math.nan if v is None else v


def finite_num(value: Any) -> float | None:
    """:func:`num` when the value is finite, else None."""
    v = num(value)
    return v if v is not None and math.isfinite(v) else None


def integer(value: Any, default: int = 0) -> int:
    """A count: a finite JSON number truncated to int, else ``default``."""
    v = finite_num(value)
    return int(v) if v is not None else default


def floats(values: Any) -> np.ndarray:
    """A JSON list of numbers as a float64 array, nulls and unreadable entries as NaN."""
    if not isinstance(values, list):
        return np.zeros(0)
    return np.array([num_or_nan(v) for v in values], dtype=np.float64)


def obj(value: Any) -> dict:
    """``value`` when it is a JSON object, else an empty dict."""
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list:
    """``value`` when it is a JSON list, else an empty list."""
    return value if isinstance(value, list) else []


def dicts(value: Any) -> list[dict]:
    """The objects inside a JSON list (other entries skipped)."""
    return [v for v in items(value) if isinstance(v, dict)]


def count(value: Any) -> int:
    """The length of a JSON list (of channel indices, names ...); 0 for anything else."""
    return len(value) if isinstance(value, list) else 0


def path(result: dict, *keys: str) -> Any:
    """``result[k1][k2]...``, None where a level is missing or not an object."""
    value: Any = result
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


# ---- the envelope --------------------------------------------------------------------------------


def command_of(result: dict) -> str:
    """The command a result came from (``tool.command``), or "" when it has none."""
    command = path(result, "tool", "command")
    return command if isinstance(command, str) else ""


def schema_major(result: dict) -> str:
    """The major part of ``schema_version`` ("1" for "1.0" and "1.1")."""
    return str(result.get("schema_version")).split(".")[0]


def known_schema(result: dict) -> bool:
    """Whether this avdiag reads the result's schema (any 1.x; a later minor version only adds keys)."""
    return schema_major(result) == KNOWN_SCHEMA_MAJOR


def summary_text(result: dict) -> str | None:
    """The one-line summary: ``summary.text`` (schema 1.1, and 1.0 inspect/diff/check) or the 1.0
    string summary of reinit and conflict."""
    summary = result.get("summary")
    text = summary if isinstance(summary, str) else obj(summary).get("text")
    return text if isinstance(text, str) and text else None


def summary_fields(result: dict) -> dict:
    """The summary object's fields (empty for a schema-1.0 string summary)."""
    return obj(result.get("summary"))


def checkpoint_refs(result: dict) -> list[dict]:
    """The checkpoints a result is about, as ``{path, format, sha256}`` dicts: the 1.1 ``checkpoints``
    list, or for 1.0 files the command's own keys (``checkpoint``, reinit's ``source``, diff's ``a``/``b``)."""
    refs = dicts(result.get("checkpoints"))
    if refs:
        return refs
    legacy = [obj(result.get(k)) for k in ("checkpoint", "source", "a", "b")]
    return [r for r in legacy if isinstance(r.get("path"), str)]


def checkpoint_path(result: dict, index: int = 0, default: str = "?") -> str:
    """The path of the ``index``-th checkpoint of a result."""
    refs = checkpoint_refs(result)
    value = refs[index].get("path") if index < len(refs) else None
    return str(value) if value is not None else default


# ---- inspect (and diff, which shares the layer dicts' shape) -------------------------------------


def modality_prefixes(result: dict) -> dict[str, str]:
    """Modality -> name prefix from an inspect result's layout (diff: the first checkpoint's layout)."""
    layout = obj(result.get("layout"))
    if "modalities" not in layout and isinstance(layout.get("a"), dict):
        layout = layout["a"]
    return {str(k): str(v) for k, v in obj(layout.get("modalities")).items() if isinstance(v, str)}


def short_name(name: Any, prefix: str | None) -> str:
    """A layer name without its modality's prefix (``audio_net.layer1.0.bn1`` -> ``layer1.0.bn1``)."""
    text = str(name)
    if prefix and text.startswith(prefix) and len(text) > len(prefix):
        return text[len(prefix):]
    return text


def group_layers(result: dict, key: str = "layers") -> dict[str, list[dict]]:
    """The layer dicts of ``result[key]`` per modality, in network order; modalities in the report's order."""
    groups: dict[str, list[dict]] = {str(m): [] for m in obj(result.get("modalities"))}
    for layer in dicts(result.get(key)):
        groups.setdefault(str(layer.get("modality") or "?"), []).append(layer)
    return {m: g for m, g in groups.items() if g}


def layer_channels(layer: dict) -> int:
    """A layer's channel count (0 when missing or not positive)."""
    return max(0, integer(layer.get("channels")))


def dead_ratio_rows(result: dict) -> dict[str, list[tuple[str, int, int, int]]]:
    """Per modality: (short layer name, channels, dead, possibly dead) per BN layer, network order."""
    prefixes = modality_prefixes(result)
    return {m: [(short_name(layer.get("name"), prefixes.get(m)), layer_channels(layer),
                 count(layer.get("dead_channels")), count(layer.get("possibly_dead_channels"))) for layer in layers]
            for m, layers in group_layers(result).items()}


def channel_z(per_channel: dict) -> np.ndarray:
    """A layer's per-channel z = beta / s. Schema 1.1 writes the infinite z of a constant channel
    (s = 0) as null; it is restored as +-inf from ``scale`` and ``beta`` (the sign of beta), as the
    static scan computes it, so the two schemas draw alike. Other nulls stay NaN."""
    z = floats(per_channel.get("z"))
    scale, beta = floats(per_channel.get("scale")), floats(per_channel.get("beta"))
    if scale.shape != z.shape or beta.shape != z.shape:
        return z
    constant = np.isnan(z) & (scale == 0) & np.isfinite(beta)
    return np.where(constant, np.where(beta > 0, math.inf, -math.inf), z)


def channel_values(layer: dict, field: str, measured: bool = False) -> np.ndarray | None:
    """One per-channel array of a layer: ``layer[field]`` for probe arrays (``measured``, e.g.
    ``fire_rate``), else ``layer["per_channel"][field]``; None when the layer has no such array."""
    source = layer if measured else obj(layer.get("per_channel"))
    if not isinstance(source.get(field), list):
        return None
    return channel_z(source) if field == "z" and not measured else floats(source[field])


def per_channel_values(result: dict, field: str, measured: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per modality: one per-channel array of every layer (see :func:`channel_values`) concatenated,
    split into (layers that feed a zeroing activation, the other layers). Modalities without the
    array are left out."""
    out = {}
    for m, layers in group_layers(result).items():
        feeding, other = [], []
        for layer in layers:
            values = channel_values(layer, field, measured)
            if values is not None:
                (feeding if layer.get("feeds_activation") == "yes" else other).append(values)
        if feeding or other:
            out[m] = (np.concatenate(feeding) if feeding else np.zeros(0),
                      np.concatenate(other) if other else np.zeros(0))
    return out


def worst_z(layer: dict) -> float | None:
    """A layer's lowest z; a null in a 1.1 file is recovered from the per-channel arrays when present."""
    value = num(layer.get("worst_z"))
    if value is not None:
        return value
    z = channel_values(layer, "z")
    z = z[~np.isnan(z)] if z is not None else np.zeros(0)
    return float(z.min()) if z.size else None


def modality_worst_z(result: dict, modality: str) -> float | None:
    """A modality's lowest z; a null in a 1.1 file is recovered from its ``worst_layer``'s arrays."""
    entry = obj(path(result, "modalities", modality))
    value = num(entry.get("worst_z"))
    if value is not None:
        return value
    layer = next((x for x in dicts(result.get("layers")) if x.get("name") == entry.get("worst_layer")), None)
    return worst_z(layer) if layer is not None else None


def has_per_channel(result: dict, field: str = "z") -> bool:
    return any(isinstance(obj(layer.get("per_channel")).get(field), list) for layer in dicts(result.get("layers")))


def has_measured(result: dict) -> bool:
    return any(isinstance(layer.get("measured_dead_channels"), list) for layer in dicts(result.get("layers")))


def dead_threshold(result: dict) -> float:
    """The static scan's ``dead_z`` (-3 when the result does not say)."""
    value = finite_num(path(result, "thresholds", "dead_z"))
    return value if value is not None else -3.0


def probe_thresholds(result: dict) -> tuple[float, float]:
    """The probe's (dead_rate, rare_rate), defaults (0.001, 0.05) where missing."""
    t = obj(path(result, "probe", "thresholds"))
    dead, rare = finite_num(t.get("dead_rate")), finite_num(t.get("rare_rate"))
    return (dead if dead is not None else 1e-3, rare if rare is not None else 0.05)


def agreement(result: dict, modality: str) -> dict:
    """The probe's precision / recall figures of one modality (empty without a probe)."""
    return obj(path(result, "modalities", modality, "agreement"))


def dead_counts(mapping: Any, labels: list[str]) -> list[int]:
    """``mapping[label]`` as counts, in ``labels`` order (reinit's dead_before / dead_after)."""
    mapping = obj(mapping)
    return [integer(mapping.get(label)) for label in labels]


# ---- conflict ------------------------------------------------------------------------------------


def conflict_modalities(result: dict) -> dict[str, dict]:
    """`avdiag conflict`: modality -> its entry (conflict summary, contribution, ogm)."""
    return {str(m): obj(entry) for m, entry in obj(result.get("modalities")).items()}


def conflict_per_layer(result: dict) -> dict[str, dict[str, float]]:
    """Per modality: layer name -> mean gradient cosine (NaN where not finite); modalities without a
    per-layer breakdown are left out."""
    out = {}
    for m, entry in conflict_modalities(result).items():
        layers = obj(path(entry, "conflict", "per_layer"))
        if layers:
            out[m] = {str(name): num_or_nan(v) for name, v in layers.items()}
    return out


def contribution_series(result: dict) -> tuple[list[str], dict[str, list[float]]]:
    """The modalities with a contribution entry, and per series (Shapley accuracy, Shapley
    probability, uni-modal accuracy) one value per modality, NaN where not finite."""
    mods = {m: obj(e.get("contribution")) for m, e in conflict_modalities(result).items()
            if isinstance(e.get("contribution"), dict)}
    series = {"Shapley (accuracy)": [num_or_nan(path(c, "shapley_mean", "accuracy")) for c in mods.values()],
              "Shapley (probability)": [num_or_nan(path(c, "shapley_mean", "probability")) for c in mods.values()],
              "uni-modal accuracy": [num_or_nan(c.get("unimodal_accuracy")) for c in mods.values()]}
    return list(mods), series


def sample_cosines(result: dict) -> dict[str, np.ndarray]:
    """Per modality: the per-sample cosine of the multimodal and uni-modal gradients (``conflict.samples``
    rows with ``cos_<modality>``); empty when the run measured no per-sample gradients."""
    rows = dicts(path(result, "conflict", "samples"))
    modalities = list(conflict_modalities(result)) or sorted({k[4:] for r in rows for k in r if k.startswith("cos_")})
    out = {}
    for m in modalities:
        values = [r.get(f"cos_{m}") for r in rows if f"cos_{m}" in r]
        if values:
            out[m] = floats(values)
    return out


def sample_shapley(result: dict, value: str = "probability") -> dict[str, np.ndarray]:
    """Per modality: the per-sample Shapley values (``contribution.samples`` columns
    ``phi_<modality>_<value>``); present only in documents written with the per-sample table
    (``ConflictResult.to_dict(samples=True)``)."""
    columns = obj(path(result, "contribution", "samples"))
    out = {}
    for m in conflict_modalities(result):
        column = columns.get(f"phi_{m}_{value}")
        if isinstance(column, list):
            out[m] = floats(column)
    return out


# ---- check ---------------------------------------------------------------------------------------


def check_data_files(result: dict) -> list[dict]:
    """`avdiag check --data`: the file entries that carry measurements on data."""
    return [f for f in dicts(result.get("files")) if isinstance(f.get("data"), dict)]


def check_shares(result: dict) -> tuple[list[str], dict[str, list[float | None]]]:
    """Checkpoint paths (of the files measured on data) and per modality each file's contribution
    share (``share_accuracy``; None where it is not finite or missing)."""
    files = check_data_files(result)
    modalities = list(dict.fromkeys(str(m) for f in files for m in obj(path(f, "data", "modalities"))))
    shares = {m: [finite_num(path(f, "data", "modalities", m, "share_accuracy")) for f in files] for m in modalities}
    return [str(f.get("path")) for f in files], shares


def check_min_share(result: dict) -> float | None:
    """The policy's ``min_share`` of the modality-contribution rule, None when the rule is off or unset."""
    rule = obj(path(result, "policy", "rules", "modality-contribution"))
    if rule.get("severity") == "off":
        return None
    return finite_num(path(rule, "params", "min_share"))
