"""Gradient conflict between the multimodal and the uni-modal objectives of an audio-visual model.

The interface
-------------
One call over the model parts and the batches, returning a typed result::

    from avdiag.measure.conflict import measure_conflict
    result = measure_conflict(parts, batches, device, per_sample=True, train_mode=False, **options)

``parts`` is an :class:`avdiag.models.parts.AVParts` (encoders, pooled features, fused head,
uni-modal logits and their ``unimodal_source``); ``batches`` an iterable of dicts with ``audio``,
``visual``, ``label`` and ideally ``index``. The result, :class:`GradientConflict`, keeps the
per-batch records (:class:`BatchConflict`, one :class:`BatchModalityConflict` per encoder) and the
per-sample rows (:class:`SampleConflict`); its summaries (:class:`ModalityConflict`, one per
encoder) are derived from them. Every result type has ``to_dict()`` (JSON-safe: non-finite floats
are null) and ``from_dict()`` (null reads back as NaN where a float is expected, and as None where
None has a meaning of its own, such as a head with no shared parameters);
:meth:`GradientConflict.combine` merges the results of disjoint shards so that every summary equals,
bit for bit, that of one run over all the batches (summaries use ``math.fsum``). A distributed run
measures its shard on each rank, sends ``to_dict()``, and rank 0 combines the ``from_dict()``
copies. ``to_frame()`` gives the per-sample table.

Streaming: :class:`ConflictMeter` takes one batch at a time (``meter.add(batch)``,
``meter.result()``), so a run over a whole dataset never holds more than one batch.

Memory and speed
----------------
Eval-mode passes run a chunk of samples at a time, the chunk sized from the measured memory of
one sample and the budget ``memory_bytes`` (default :data:`DEFAULT_MAX_MEMORY`, 2 GiB;
:func:`parse_memory` reads ``2G`` / ``512M``). The per-sample products of each layer use the
fastest exact method for it, timed on the first chunk (:mod:`~avdiag.measure.conflict.select`):
``result.engine`` (:class:`EngineReport`) says which, with the trial times. ``sketch=DIM`` trades
exactness for a random projection (:mod:`~avdiag.measure.conflict.sketch`); ``result.sketch``
(:class:`SketchReport`) then states its measured error.

The modules
-----------
* :mod:`~avdiag.measure.conflict.mmpareto`: the algorithm (:func:`measure`, exported here as
  :func:`measure_conflict`, and :class:`ConflictMeter`) and the MMPareto / PCGrad / cosine formulas;
* :mod:`~avdiag.measure.conflict.engine`: one batch in chunks under the memory budget;
  :mod:`~avdiag.measure.conflict.budget`: the budget and the chunk size;
* :mod:`~avdiag.measure.conflict.hooks`: the module-products engine (``hooks``);
  :mod:`~avdiag.measure.conflict.layers`: its per-layer methods; :mod:`~avdiag.measure.conflict.select`:
  the choice among them; :mod:`~avdiag.measure.conflict.sketch`: the approximate mode;
* :mod:`~avdiag.measure.conflict.per_sample`: the whole-encoder engines (``vmap``, ``loop``);
* :mod:`~avdiag.measure.conflict.gradients`: encoder bookkeeping, the saved model state, the pass
  through the head; :mod:`~avdiag.measure.conflict.products`: underflow-free float64 products;
* :mod:`~avdiag.measure.conflict.results`: the result types.

Means over batches count each batch once whatever its size (``cos_mean``, population ``cos_std``,
``conflict_rate`` the share of batches with ``cos <= 0``, ``magnitude_ratio_mean``, per-layer means).
The model is moved to ``device``; its train/eval flags, its buffers and the ``requires_grad`` flags
of its parameters are restored afterwards; ``.grad`` is not touched.
"""

from avdiag.measure.conflict.budget import DEFAULT_MAX_MEMORY, parse_memory
from avdiag.measure.conflict.mmpareto import MMPARETO_GAMMA, ConflictMeter, mmpareto_scale, mmpareto_weights, pcgrad
from avdiag.measure.conflict.mmpareto import measure as measure_conflict
from avdiag.measure.conflict.products import cosine
from avdiag.measure.conflict.results import (
    BatchConflict, BatchModalityConflict, EngineReport, GradientConflict, ModalityConflict, SampleConflict,
    SketchReport,
)

__all__ = [
    "BatchConflict", "BatchModalityConflict", "ConflictMeter", "DEFAULT_MAX_MEMORY", "EngineReport",
    "GradientConflict", "MMPARETO_GAMMA", "ModalityConflict", "SampleConflict", "SketchReport", "cosine",
    "measure_conflict", "mmpareto_scale", "mmpareto_weights", "parse_memory", "pcgrad",
]
