"""How much each modality contributes to an audio-visual classifier, and how imbalanced it is.

The interface
-------------
Each measure is one module with one call over the model parts and the batches::

    from avdiag.measure.contribution import shapley, unimodal, ogm, opm, learning_state, modality_gap
    result = ogm.measure(parts, batches, device, alpha=0.8)          # -> OGMResult

=====================  ======================================================  =========================
module                 what it measures                                        ``measure(...)`` returns
=====================  ======================================================  =========================
``shapley``            per-sample two-player Shapley values (Wei et al.,       :class:`ShapleyValues`
                       CVPR 2024), pooled feature or raw input zeroed
``unimodal``           uni-modal accuracy and true-class probability           :class:`UnimodalPredictions`
``ogm``                OGM-GE scores, rho and coefficients (CVPR 2022)         :class:`OGMResult`
``opm``                OPM drop probabilities (TPAMI 2024)                     :class:`OPMResult`
``learning_state``     D&R k-means purity gap (ECCV 2024)                      :class:`LearningStateResult`
``modality_gap``       distance of the feature centroids (MMCSAL)              :class:`ModalityGap`
=====================  ======================================================  =========================

``parts`` is an :class:`avdiag.models.parts.AVParts`; ``batches`` an iterable of dicts with
``audio``, ``visual``, ``label`` and ideally ``index`` (dataset indices; positions otherwise). Every
measure runs the model in eval mode under ``torch.inference_mode`` (no gradients, BatchNorm on its
running statistics) on ``device`` and restores every module's train/eval flag afterwards.

Every result keeps the records its figures derive from (per-sample rows, per-batch sums, feature
sums or pooled features) and has ``to_dict()`` (JSON-safe: a non-finite float is null),
``from_dict()`` (null reads back as NaN where a float is expected; it stays None where None has a
meaning of its own, such as a purity that was not measured, with its reason) and the classmethod
``combine(results)``: the results of disjoint shards merged so that the figures equal one run over
all the data (dataset sums run in dataset-index order or are correctly rounded; the feature
centroids of the modality gap up to float summation order). ``combine`` refuses shards that share a
sample index: a ``DistributedSampler`` without ``drop_last`` pads shards with repeats; drop them.

All the measures at once
------------------------
:func:`contribution_partial` runs every measure in ONE pass (the encoders run once per batch) and
returns a :class:`ContributionPartial`: the records of one shard, before the parameters. Shards
merge with :meth:`ContributionPartial.combine` (and travel as ``to_dict`` / ``from_dict``, e.g. over
``torch.distributed``); :meth:`ContributionPartial.result` applies the parameters (OGM-GE alpha, OPM,
k-means seed, D&R lambda) and gives the :class:`Contribution`, whose ``to_dict(samples=False)`` is the
report, ``to_frame()`` the per-sample table, and which combines too. :func:`measure_contribution`
does both steps.
"""

from avdiag.measure.contribution.learning_state import (
    RELEARN_LAMBDA, LearningState, LearningStateResult, ModalityLearningState, PooledFeatures, cluster_purity,
)
from avdiag.measure.contribution.modality_gap import ModalityGap
from avdiag.measure.contribution.ogm import OGM_ALPHA, OGMResult, ogm_coefficients
from avdiag.measure.contribution.opm import (
    OPM_EXECUTE_PROBABILITY, OPM_LAMBDA, OPM_Q_BASE, OPMResult, opm_drop_probabilities,
)
from avdiag.measure.contribution.partial import ContributionPartial, contribution_partial, measure_contribution
from avdiag.measure.contribution.results import Contribution, ModalityContribution
from avdiag.measure.contribution.shapley import (
    ABLATIONS, COALITIONS, ShapleyValues, shapley_batch, shapley_input_ablation, shapley_values,
)
from avdiag.measure.contribution.unimodal import UnimodalPredictions

__all__ = [
    "ABLATIONS", "COALITIONS", "Contribution", "ContributionPartial", "LearningState", "LearningStateResult",
    "ModalityContribution", "ModalityGap", "ModalityLearningState", "OGMResult", "OGM_ALPHA", "OPMResult",
    "OPM_EXECUTE_PROBABILITY", "OPM_LAMBDA", "OPM_Q_BASE", "PooledFeatures", "RELEARN_LAMBDA", "ShapleyValues",
    "UnimodalPredictions", "cluster_purity", "contribution_partial", "measure_contribution", "ogm_coefficients",
    "opm_drop_probabilities", "shapley_batch", "shapley_input_ablation", "shapley_values",
]
