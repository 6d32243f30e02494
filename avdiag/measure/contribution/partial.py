"""Every contribution measure in one pass over the batches (the encoders run once per batch), as a
:class:`ContributionPartial` that shards merge exactly and that :meth:`ContributionPartial.result`
turns into a :class:`~avdiag.measure.contribution.results.Contribution`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from avdiag.measure.contribution.learning_state import (
    RELEARN_LAMBDA, FeatureCollector, LearningStateResult, PooledFeatures,
)
from avdiag.measure.contribution.modality_gap import GapCollector, ModalityGap
from avdiag.measure.contribution.ogm import OGM_ALPHA, OGMResult, as_batch_scores
from avdiag.measure.contribution.opm import OPM_EXECUTE_PROBABILITY, OPM_LAMBDA, OPM_Q_BASE, OPMResult
from avdiag.measure.contribution.passes import run
from avdiag.measure.contribution.results import Contribution
from avdiag.measure.contribution.shapley import ShapleyCollector, ShapleyValues
from avdiag.measure.contribution.unimodal import UnimodalCollector, UnimodalPredictions
from avdiag.models.parts import AVParts


@dataclass(eq=False)
class ContributionPartial:
    """What one shard contributes: each measure's records, before the parameters (OGM-GE alpha,
    OPM, k-means seed, D&R lambda) are applied. Picklable; round-trips through to_dict / from_dict."""

    shapley: ShapleyValues
    shapley_input: ShapleyValues | None
    unimodal: UnimodalPredictions
    modality_gap: ModalityGap
    features: PooledFeatures | None  # None when not kept (no learning state)
    heldout: PooledFeatures | None = None

    @property
    def n(self) -> int:
        return self.unimodal.n

    @property
    def n_classes(self) -> int:
        return self.unimodal.n_classes

    @property
    def unimodal_source(self) -> str:
        return self.unimodal.unimodal_source

    @property
    def input_ablation(self) -> bool:
        return self.shapley_input is not None

    @property
    def dims(self) -> dict[str, int]:
        return self.modality_gap.dims

    @classmethod
    def combine(cls, partials: Sequence["ContributionPartial"]) -> "ContributionPartial":
        """The shards together; ValueError when they disagree (classes, uni-modal source, options) or
        share a sample index (a ``DistributedSampler`` without ``drop_last`` pads shards with
        repeated samples: drop the repeats)."""
        if not partials:
            raise ValueError("nothing to combine")
        first = partials[0]
        for p in partials[1:]:
            for name in ("n_classes", "unimodal_source", "dims", "input_ablation"):
                if getattr(p, name) != getattr(first, name):
                    raise ValueError(f"shards disagree on {name}: {getattr(first, name)!r} vs {getattr(p, name)!r}")
            if (p.features is None) != (first.features is None) or (p.heldout is None) != (first.heldout is None):
                raise ValueError("shards disagree on whether features / held-out data were kept")
        return cls(
            ShapleyValues.combine([p.shapley for p in partials]),
            ShapleyValues.combine([p.shapley_input for p in partials]) if first.input_ablation else None,
            UnimodalPredictions.combine([p.unimodal for p in partials]),
            ModalityGap.combine([p.modality_gap for p in partials]),
            PooledFeatures.combine([p.features for p in partials]) if first.features is not None else None,
            PooledFeatures.combine([p.heldout for p in partials], "held-out shards")
            if first.heldout is not None else None)

    def to_dict(self) -> dict:
        return {"shapley": self.shapley.to_dict(),
                "shapley_input": self.shapley_input.to_dict() if self.shapley_input else None,
                "unimodal": self.unimodal.to_dict(), "modality_gap": self.modality_gap.to_dict(),
                "features": self.features.to_dict() if self.features is not None else None,
                "heldout": self.heldout.to_dict() if self.heldout is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "ContributionPartial":
        optional = lambda kind, x: None if x is None else kind.from_dict(x)  # noqa: E731
        return cls(ShapleyValues.from_dict(d["shapley"]), optional(ShapleyValues, d["shapley_input"]),
                   UnimodalPredictions.from_dict(d["unimodal"]), ModalityGap.from_dict(d["modality_gap"]),
                   optional(PooledFeatures, d["features"]), optional(PooledFeatures, d["heldout"]))

    def result(self, ogm_alpha: float = OGM_ALPHA, *, seed: int = 0, opm_q_base: float = OPM_Q_BASE,
               opm_lambda: float = OPM_LAMBDA, opm_execute_probability: float = OPM_EXECUTE_PROBABILITY,
               relearn_lambda: float = RELEARN_LAMBDA) -> Contribution:
        """The dataset-level result, the parameters applied (``seed`` seeds the k-means)."""
        if self.n == 0:
            raise ValueError("no samples were measured")
        scores = as_batch_scores(self.unimodal.batch_scores)
        learning_state = None
        if self.features is not None:
            learning_state = LearningStateResult.from_features(self.features, self.heldout, self.n_classes,
                                                               relearn_lambda, seed)
        return Contribution(self.shapley, self.shapley_input, self.unimodal, OGMResult(ogm_alpha, scores),
                            OPMResult(opm_q_base, opm_lambda, opm_execute_probability, scores), learning_state,
                            self.modality_gap)


def contribution_partial(parts: AVParts, batches: Iterable[dict], device: torch.device | str,
                         heldout_batches: Iterable[dict] | None = None, *, input_ablation: bool = True,
                         keep_features: bool = True, tf32: bool = False) -> ContributionPartial:
    """Measure one shard (eval mode, no gradients); combine shards with ContributionPartial.combine.

    ``input_ablation`` adds the raw-input-zeroed Shapley values (one extra encoder pass on a single
    zero sample per batch). ``keep_features=False`` skips the learning state (which needs every
    pooled feature; ``heldout_batches`` are then not read); the modality gap comes from running
    sums and is always computed. Empty ``batches`` or ``heldout_batches`` raise ValueError.
    ``tf32`` allows TF32 matmuls and convolutions on CUDA (off by default: full float32).
    """
    shapley, unimodal, gap = ShapleyCollector("feature"), UnimodalCollector(), GapCollector()
    shapley_input = ShapleyCollector("input") if input_ablation else None
    features = FeatureCollector() if keep_features else None
    collectors = [c for c in (shapley, shapley_input, unimodal, gap, features) if c is not None]
    run(parts, batches, device, collectors, tf32=tf32)
    heldout = None
    if heldout_batches is not None and keep_features:
        held = FeatureCollector()
        run(parts, heldout_batches, device, [held], empty="the held-out data has no batches", tf32=tf32)
        heldout = held.result()
    return ContributionPartial(shapley.result(), shapley_input.result() if shapley_input else None,
                               unimodal.result(parts.unimodal_source), gap.result(),
                               features.result() if features else None, heldout)


def measure_contribution(parts: AVParts, batches: Iterable[dict], device: torch.device | str,
                         ogm_alpha: float = OGM_ALPHA, heldout_batches: Iterable[dict] | None = None,
                         seed: int = 0, *, input_ablation: bool = True, keep_features: bool = True,
                         opm_q_base: float = OPM_Q_BASE, opm_lambda: float = OPM_LAMBDA,
                         opm_execute_probability: float = OPM_EXECUTE_PROBABILITY,
                         relearn_lambda: float = RELEARN_LAMBDA, tf32: bool = False) -> Contribution:
    """Shapley valuation (both value functions; feature and, by default, input ablation), OGM-GE,
    OPM, uni-modal and fused accuracies, learning state and modality gap over ``batches``.
    Equal to ``contribution_partial(...).result(...)``."""
    partial = contribution_partial(parts, batches, device, heldout_batches, input_ablation=input_ablation,
                                   keep_features=keep_features, tf32=tf32)
    return partial.result(ogm_alpha, seed=seed, opm_q_base=opm_q_base, opm_lambda=opm_lambda,
                          opm_execute_probability=opm_execute_probability, relearn_lambda=relearn_lambda)
