"""knee-demo's domain-randomised training samples, its evaluation conditions and their
scoring (issue 14), on real phantom renders (no network trained here)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from aiworker.infer.manifest_sections import Input
from aiworker.models.knee_demo import randomise, train
from aiworker.models.knee_demo.conditions import condition_seeds, render_case
from aiworker.models.knee_demo.data import HELD_OUT_SEEDS
from aiworker.models.knee_demo.evaluate import summary
from aiworker.models.knee_demo.labels import CLASSES

SPEC = Input.model_validate(train.input_spec())
# coarse pixels keep a sample under a second; every other range as in training
QUICK = replace(randomise.TRAINING, pixel_mm=(1.2, 1.5))


def test_a_random_contrast_gives_every_tissue_its_own_signal_brightest_one():
    first = randomise.random_table(np.random.default_rng(1))
    second = randomise.random_table(np.random.default_rng(2))
    tissues = list(randomise.TISSUES)
    assert first.shape == (256,) and first.max() == pytest.approx(1.0)
    assert first[0] <= first[tissues].max() and (first[tissues] >= 0).all()
    assert len(np.unique(first[tissues])) == len(tissues)  # drawn per tissue
    assert not np.allclose(first[tissues], second[tissues])
    assert first[200] == 0.0  # values the anatomy never paints stay dark


def test_prescriptions_span_the_randomised_ranges():
    rng = np.random.default_rng(0)
    settings = randomise.TRAINING
    drawn = [randomise.random_geometry(np.zeros(3), rng, settings) for _ in range(300)]
    thickness = [g.slice_thickness for g in drawn]
    spacing = [g.spacing_between_slices for g in drawn]
    slices = [g.slices for g in drawn]
    tilt = [np.degrees(np.arccos(abs(g.normal[0]))) for g in drawn]  # from true sagittal
    assert 1.5 <= min(thickness) < 1.8 and 4.7 < max(thickness) <= 5.0
    assert all(t <= s + 1e-9 <= 5.0 + 1e-9 for t, s in zip(thickness, spacing, strict=True))
    assert min(slices) == 12 and max(slices) == 44
    assert max(tilt) > 25.0 and max(tilt) < 34.0  # up to 30 and 15 degrees about two axes
    pixels = [g.row_spacing for g in drawn]
    assert min(pixels) < 0.4 and max(pixels) > 1.3


def test_a_sample_is_model_input_with_aligned_labels_and_a_seed_repeats_it():
    [sample] = randomise.random_samples(100_002, SPEC, 1, QUICK)
    [again] = randomise.random_samples(100_002, SPEC, 1, QUICK)
    assert np.array_equal(sample.array, again.array)
    assert np.array_equal(sample.labels, again.labels)
    assert sample.array.dtype == np.float32 and sample.array.shape[0] == 1
    assert sample.array.shape[1:] == sample.labels.shape
    assert 0.0 <= sample.array.min() and sample.array.max() <= 1.0
    assert sample.spacing == pytest.approx((1.0, 1.0, 3.0))
    present = set(np.unique(sample.labels))
    assert present <= set(range(CLASSES)) and {1, 2} <= present


def test_real_pd_fs_samples_show_bright_fluid_dark_marrow_as_the_scanner_would():
    settings = replace(randomise.REAL_PD_FS, pixel_mm=(1.2, 1.5), snr=(30.0, 40.0))
    [sample] = randomise.random_samples(100_004, SPEC, 1, settings)
    image, labels = sample.array[0], sample.labels
    assert image[labels == 1].mean() < 0.35  # fat-suppressed marrow
    brightest = image > 0.8  # fluid: joint effusion, the fluid film, a tear's gap
    assert brightest.any() and np.isin(labels[brightest], (1, 2, 3, 4)).mean() < 0.1


def test_the_elastic_warp_moves_image_and_labels_together():
    [sample] = randomise.random_samples(100_006, SPEC, 1,
                                        replace(QUICK, elastic=0.0, bias=0.0, gamma=0.0))
    reference = sitk.Image([int(n) for n in sample.labels.shape], sitk.sitkUInt8)
    reference.SetSpacing(sample.spacing)
    same, same_labels = randomise.elastic(sample.array, sample.labels, reference,
                                          np.random.default_rng(0), sd_mm=0.0)
    assert np.allclose(same, sample.array, atol=1e-5)
    assert np.array_equal(same_labels, sample.labels)
    warped, warped_labels = randomise.elastic(sample.array, sample.labels, reference,
                                              np.random.default_rng(0), sd_mm=3.0)
    assert not np.array_equal(warped_labels, sample.labels)
    femur = (sample.labels == 1).sum()
    assert abs(int((warped_labels == 1).sum()) - int(femur)) < 0.25 * femur
    # the image went where its labels went: femur pixels keep their mean brightness
    assert abs(warped[0][warped_labels == 1].mean()
               - sample.array[0][sample.labels == 1].mean()) < 0.05


def test_conditions_change_what_they_say_and_use_their_own_held_out_seeds():
    seeds = condition_seeds("slices16", 6)
    assert seeds[0] in HELD_OUT_SEEDS and seeds[0] >= HELD_OUT_SEEDS[0] + 1000
    assert not set(seeds) & set(condition_seeds("t1", 6))
    partial = render_case(seeds[0], "slices16")
    assert partial.image.GetSize()[2] == 16 and partial.labels.shape[0] == 16
    t1 = render_case(seeds[0], "t1")
    pixels = sitk.GetArrayFromImage(t1.image)
    high = np.percentile(pixels, 99.5)
    assert pixels[t1.labels == 1].mean() > 0.5 * high  # fatty marrow bright on T1
    with pytest.raises(ValueError, match="condition"):
        render_case(seeds[0], "sideways")


def test_a_condition_summary_counts_failures_and_scores_the_rest():
    def record(femur, p, torn):
        return {"dice": {"Femur": femur}, "probability": p, "torn": torn, "seconds": 1.0}

    records = [record(0.9, 0.8, True), record(0.8, 0.3, False), record(0.7, 0.6, False),
               {"dice": {"Femur": 0.0}, "probability": None, "torn": True, "seconds": None}]
    result = summary(records, [5, 8], 0.5)
    assert result["cases"] == 4 and result["failed"] == 1
    assert result["dice"]["Femur"]["mean"] == pytest.approx(0.6)
    assert result["dice"]["Femur"]["min"] == 0.0
    assert result["acl"]["auc"] == 1.0  # the torn case outranks both intact ones
    assert (result["acl"]["sensitivity"], result["acl"]["specificity"]) == (1.0, 0.5)
