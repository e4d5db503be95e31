"""A model's confidence in each structure it segments: what the quality gate's
``min_confidence`` reads (:mod:`aiworker.infer.gate`).

The confidence in a structure is the mean, over the voxels labelled with it, of the largest
class probability of each voxel ("mean max-softmax"): near 1 where the model is sure of
every voxel, near 1/classes where it hesitates. It is measured from the network's logits
(:func:`structure_confidence`: a softmax over the class axis) or, for a model whose
predictor hands out probabilities itself (nnU-Net's ``return_probabilities``, resampled by
nnU-Net onto the input's grid), from those (:func:`probability_confidence`). The mean
entropy of the probabilities (:func:`probability_entropy`, in nats) says the same from the
whole distribution and is kept beside it in the findings.
"""

from __future__ import annotations

import numpy as np


def structure_confidence(logits: np.ndarray, labels: np.ndarray, values: list[int]
                         ) -> dict[int, float]:
    """Mean max-softmax of the network's ``logits`` (classes, ...) over the voxels of each
    label value in ``labels`` (same spatial shape); a label with no voxel is left out."""
    peak = logits.max(axis=0)
    total = np.zeros_like(peak)
    for channel in logits:
        total += np.exp(channel - peak)
    return _mean_per_label(1.0 / total, labels, values)  # 1/total: the largest softmax


def probability_confidence(probabilities: np.ndarray, labels: np.ndarray, values: list[int]
                           ) -> dict[int, float]:
    """Mean largest class probability of ``probabilities`` (classes, ...; each voxel's
    probabilities sum to 1) over the voxels of each label value in ``labels``."""
    return _mean_per_label(probabilities.max(axis=0), labels, values)


def probability_entropy(probabilities: np.ndarray, labels: np.ndarray, values: list[int]
                        ) -> dict[int, float]:
    """Mean entropy (nats) of each voxel's class probabilities over the voxels of each label
    value in ``labels``: 0 where the model is certain, log(classes) where it cannot tell."""
    clipped = np.clip(probabilities, 1e-12, 1.0)
    entropy = -(probabilities * np.log(clipped)).sum(axis=0)
    return _mean_per_label(entropy, labels, values)


def _mean_per_label(values_per_voxel: np.ndarray, labels: np.ndarray, values: list[int]
                    ) -> dict[int, float]:
    """Mean of ``values_per_voxel`` over each label value's voxels (absent labels left out)."""
    flat = labels.ravel().astype(np.int64, copy=False)
    sums = np.bincount(flat, weights=values_per_voxel.ravel().astype(np.float64),
                       minlength=256)
    counts = np.bincount(flat, minlength=256)
    return {value: float(sums[value] / counts[value]) for value in values if counts[value]}
