"""What a job reports: the volume of each segmented structure, and classification heads.

Volumes are counted on the labels as they lie on the source series (the label map a SEG
will carry), so the SR, the HL7 report and the SEG agree to the voxel.

A classification head of kind ``region`` (see
:class:`~aiworker.infer.manifest_sections.RegionClassifier`) measures one segmented region
in model space and feeds the measurements to a logistic model. The measurements, for the
region R of the head's label:

* ``volume_ml``: the volume of R;
* ``volume_ratio``: that volume over the volume of ``reference_label`` (size-free);
* ``components``: how many connected parts of R hold at least ``MIN_PART_VOXELS`` voxels;
* ``largest_fraction``: the share of R in its largest part;
* ``extent_mm``: the length of R along its main axis (first principal component);
* ``gap_mm``: the longest stretch of that axis with no voxel of R (a discontinuity);
* ``mean_intensity``: the mean of the normalized first input channel over R.

For the ACL of the bundled model these say what a radiologist looks at: a torn ligament is
shorter in continuity, broken into stumps, and oedematous (bright on fat-suppressed PD).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from aiworker.infer.manifest import Manifest
from aiworker.infer.manifest_sections import ClassificationHead, RegionClassifier

MIN_PART_VOXELS = 5
GAP_BIN_MM = 1.0


def largest_components(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """``labels`` with every label of ``values`` cut to its largest connected part."""
    kept = labels.copy()
    for value in values:
        parts, count = ndimage.label(labels == value)
        if count > 1:
            sizes = np.bincount(parts.ravel())[1:]
            kept[(parts > 0) & (parts != int(np.argmax(sizes)) + 1)] = 0
    return kept


def volumes_ml(labels: np.ndarray, voxel_ml: float, manifest: Manifest) -> dict[str, float]:
    """Volume in mL of every label of the manifest (0.0 for one that is absent)."""
    counts = np.bincount(labels.ravel(), minlength=256)
    segmentation = manifest.outputs.segmentation
    return {label.name: round(float(counts[label.value]) * voxel_ml, 3)
            for label in (segmentation.labels if segmentation else [])}


def region_features(labels: np.ndarray, intensity: np.ndarray, spacing: tuple[float, ...],
                    region: RegionClassifier) -> dict[str, float]:
    """Every measurement in :data:`~aiworker.infer.manifest_sections.REGION_FEATURES` of the region
    of ``region.label`` in the (x, y, z) arrays ``labels`` and ``intensity``."""
    mask = labels == region.label
    voxel_ml = math.prod(spacing) / 1000.0
    volume = float(mask.sum()) * voxel_ml
    reference = (float((labels == region.reference_label).sum()) * voxel_ml
                 if region.reference_label is not None else 0.0)
    parts, count = ndimage.label(mask)
    sizes = np.bincount(parts.ravel())[1:] if count else np.zeros(0, int)
    extent, gap = _extent_and_gap(np.argwhere(mask) * np.asarray(spacing, dtype=float))
    return {
        "volume_ml": volume,
        "volume_ratio": volume / reference if reference > 0 else 0.0,
        "components": float((sizes >= MIN_PART_VOXELS).sum()),
        "largest_fraction": float(sizes.max() / sizes.sum()) if count else 0.0,
        "extent_mm": extent,
        "gap_mm": gap,
        "mean_intensity": float(intensity[mask].mean()) if mask.any() else 0.0,
    }


def _extent_and_gap(points: np.ndarray) -> tuple[float, float]:
    """Length of ``points`` (mm) along their main axis, and the longest empty stretch."""
    if len(points) < 2:
        return 0.0, 0.0
    centred = points - points.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    along = np.sort(centred @ axis)
    occupied = np.unique(np.floor((along - along[0]) / GAP_BIN_MM).astype(int))
    gap = float(max(np.diff(occupied).max() - 1, 0) * GAP_BIN_MM) if len(occupied) > 1 else 0.0
    return float(along[-1] - along[0]), gap


def probability(features: dict[str, float], region: RegionClassifier) -> float:
    """P(positive class) of the head's logistic model for ``features``."""
    values = np.array([features[name] for name in region.features])
    z = (values - np.array(region.mean)) / np.array(region.scale)
    logit = region.intercept + float(np.dot(region.coefficients, z))
    return 1.0 / (1.0 + math.exp(-max(min(logit, 50.0), -50.0)))


def classify(head: ClassificationHead, labels: np.ndarray, intensity: np.ndarray,
             spacing: tuple[float, ...]) -> dict[str, Any]:
    """One head's finding: the probability of its positive class, the decision at its
    threshold, and the measurements it was made from."""
    features = region_features(labels, intensity, spacing, head.region)
    p = probability(features, head.region)
    negative = next(name for name in head.classes if name != head.positive)
    return {"probability": round(p, 4), "threshold": head.threshold,
            "decision": head.positive if p >= head.threshold else negative,
            "features": {name: round(value, 3) for name, value in features.items()}}
