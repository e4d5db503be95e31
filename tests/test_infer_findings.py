"""Findings: region measurements on synthetic masks, the logistic head and its decision."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aiworker.infer import findings
from aiworker.infer.manifest_sections import REGION_FEATURES, ClassificationHead, RegionClassifier

ROD, REFERENCE = 10, 11
SHAPE = (60, 12, 8)  # (x, y, z)


def region(features: list[str], **changes) -> RegionClassifier:
    """A head's region model over ``features``: standardized with mean 0, scale 1."""
    values = {"label": ROD, "reference_label": REFERENCE, "features": features,
              "mean": [0.0] * len(features), "scale": [1.0] * len(features),
              "coefficients": [1.0] * len(features), "intercept": 0.0}
    return RegionClassifier.model_validate(values | changes)


ALL = region(list(REGION_FEATURES))


def rod(length: int, start: int = 5, hole: tuple[int, int] | None = None) -> np.ndarray:
    """Labels (x, y, z) holding a 3 x 3 voxel rod of ``length`` voxels along x, with the
    voxels ``hole`` = (first, count) along x cleared."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[start:start + length, 4:7, 3:6] = ROD
    if hole:
        labels[hole[0]:hole[0] + hole[1]] = 0
    return labels


def measure(labels: np.ndarray, spacing=(1.0, 1.0, 1.0), intensity=None) -> dict[str, float]:
    intensity = np.zeros(labels.shape, np.float32) if intensity is None else intensity
    return findings.region_features(labels, intensity, spacing, ALL)


def test_a_straight_rod_is_one_part_without_a_gap():
    features = measure(rod(40))
    assert abs(features["extent_mm"] - 40.0) <= 1.0
    assert features["gap_mm"] == 0.0
    assert features["components"] == 1.0
    assert features["largest_fraction"] == 1.0
    assert features["volume_ml"] == pytest.approx(40 * 9 / 1000)


def test_extent_follows_the_voxel_spacing():
    features = measure(rod(40), spacing=(0.5, 1.0, 1.0))
    assert abs(features["extent_mm"] - 20.0) <= 0.5
    assert features["gap_mm"] == 0.0
    assert features["volume_ml"] == pytest.approx(40 * 9 * 0.5 / 1000)


def test_a_rod_with_a_six_millimetre_hole_is_two_parts():
    features = measure(rod(40, hole=(20, 6)))
    assert features["gap_mm"] == pytest.approx(6.0, abs=1.0)
    assert features["components"] == 2.0
    assert features["largest_fraction"] == pytest.approx(19 / 34)
    assert abs(features["extent_mm"] - 40.0) <= 1.0  # the stumps still span the rod


def test_a_hole_at_half_millimetre_spacing_is_measured_in_millimetres():
    features = measure(rod(40, hole=(20, 12)), spacing=(0.5, 1.0, 1.0))
    assert features["gap_mm"] == pytest.approx(6.0, abs=1.0)
    assert features["components"] == 2.0


def test_specks_below_the_part_size_are_not_components():
    labels = rod(40)
    labels[55, 0, 0] = ROD  # a one-voxel speck, far from the rod
    features = measure(labels)
    assert features["components"] == 1.0
    assert features["largest_fraction"] == pytest.approx(360 / 361)


def test_volume_ratio_divides_by_the_reference_label():
    labels = rod(40)
    labels[:30, 0:2, 0:3] = REFERENCE  # 180 voxels against the rod's 360
    assert measure(labels)["volume_ratio"] == pytest.approx(2.0)
    assert measure(rod(40))["volume_ratio"] == 0.0  # no reference: 0, not a division by 0


def test_mean_intensity_is_taken_over_the_region_only():
    labels = rod(40, hole=(20, 6))
    intensity = np.full(SHAPE, 5.0, np.float32)
    intensity[labels == ROD] = np.linspace(0.0, 1.0, int((labels == ROD).sum()))
    assert measure(labels, intensity=intensity)["mean_intensity"] == pytest.approx(0.5)


def test_an_absent_region_measures_zero():
    features = measure(np.zeros(SHAPE, np.uint8))
    assert features == dict.fromkeys(REGION_FEATURES, 0.0)


def test_probability_is_one_half_at_the_mean_and_rises_with_a_positive_coefficient():
    model = region(["gap_mm", "components"], mean=[2.0, 1.0], scale=[3.0, 0.5],
                   coefficients=[1.5, 0.0])
    at_mean = {"gap_mm": 2.0, "components": 1.0}
    assert findings.probability(at_mean, model) == pytest.approx(0.5)
    gaps = [0.0, 2.0, 4.0, 8.0, 16.0]
    probabilities = [findings.probability({"gap_mm": g, "components": 1.0}, model)
                     for g in gaps]
    assert all(a < b for a, b in zip(probabilities, probabilities[1:], strict=False))
    z = (8.0 - 2.0) / 3.0
    assert probabilities[3] == pytest.approx(1 / (1 + math.exp(-1.5 * z)))
    flipped = region(["gap_mm", "components"], mean=[2.0, 1.0], scale=[3.0, 0.5],
                     coefficients=[-1.5, 0.0])
    assert findings.probability({"gap_mm": 8.0, "components": 1.0}, flipped) == \
        pytest.approx(1 - probabilities[3])


def test_extreme_logits_do_not_overflow():
    model = region(["gap_mm"], coefficients=[1000.0])
    assert findings.probability({"gap_mm": 1e6}, model) == pytest.approx(1.0)
    assert findings.probability({"gap_mm": -1e6}, model) == pytest.approx(0.0)


def head(threshold: float) -> ClassificationHead:
    return ClassificationHead.model_validate({
        "name": "acl", "classes": ["intact", "torn"], "positive": "torn",
        "threshold": threshold,
        "region": region(["gap_mm"], mean=[3.0], scale=[1.0]).model_dump()})


def test_classify_decides_at_the_threshold():
    labels = rod(40, hole=(20, 6))
    intensity = np.zeros(SHAPE, np.float32)
    spacing = (1.0, 1.0, 1.0)
    gap = findings.region_features(labels, intensity, spacing, ALL)["gap_mm"]
    p = 1 / (1 + math.exp(-(gap - 3.0)))

    at = findings.classify(head(round(p, 6) - 1e-6), labels, intensity, spacing)
    above = findings.classify(head(min(1.0, p + 0.01)), labels, intensity, spacing)

    assert at["probability"] == pytest.approx(p, abs=1e-4)
    assert at["decision"] == "torn" and above["decision"] == "intact"
    assert above["threshold"] == pytest.approx(p + 0.01)
    assert at["features"]["gap_mm"] == pytest.approx(gap, abs=1e-3)
    assert set(at["features"]) == set(REGION_FEATURES)
    intact = findings.classify(head(0.5), rod(40), intensity, spacing)
    assert intact["decision"] == "intact" and intact["probability"] < 0.5


def test_largest_components_keeps_the_biggest_part_of_each_label():
    labels = rod(40, hole=(30, 4))  # parts of 25 and 11 voxels along x
    labels[0:2, 0:2, 0:2] = REFERENCE
    labels[50:52, 0:2, 0:2] = REFERENCE
    labels[50:55, 0:2, 0:2] = REFERENCE
    kept = findings.largest_components(labels, [ROD, REFERENCE])
    np.testing.assert_array_equal(kept == ROD, rod(25) == ROD)
    assert (kept == REFERENCE).sum() == 20 and not kept[0:2, 0:2, 0:2].any()


def test_volumes_are_counted_per_manifest_label():
    from test_infer_registry import VALID

    from aiworker.infer.manifest import Manifest

    manifest = Manifest.model_validate(VALID)
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, :2] = 1
    assert findings.volumes_ml(labels, 0.0015, manifest) == {"Femur": 0.018, "Tibia": 0.0}
