"""Geometry round trip: a known phantom structure, taken to the model's grid and back, lands
on the right source slices of a sagittal, a coronal and a 15° oblique series.

The model grid is knee-demo's (orientation PIL, 1 x 1 x 3 mm). A perfect "prediction" is the
truth resampled onto that grid by nearest neighbour, exactly where the network's labels lie;
:func:`labels_to_series` brings it back. The series are realistic: 256 x 256 pixels of about
0.6 mm, and slices 2.5 mm apart in the sagittal and coronal series (closer than the grid's
3 mm, so one source slice in six has no grid slice of its own: a structure may gain or lose
its first or last slice, never one inside) and 3.3 mm in the oblique one.

The engine-level version runs :class:`Engine` with :class:`Threshold` (label 1 where the
input exceeds one half) on each series with its voxels replaced by the indicator of a
structure: an oracle model, so the labels it returns on the source slices must be the
structure.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers.infer import (
    KNEE_INPUT,
    Threshold,
    dice,
    manifest,
    series_of,
    slices_with,
    write_model,
)

from aiworker.infer.engine import Engine
from aiworker.infer.manifest_sections import Input
from aiworker.infer.preprocess import labels_image, model_input, resample
from aiworker.infer.volume import LoadedSeries, labels_to_series, load_series
from aiworker.phantom import anatomy, render
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study

torch.set_num_threads(1)

VOXEL_MM = 1.0  # the phantom's label volume
STRAIGHT_SEED = 12  # sagittal and coronal, both with slices 2.5 mm apart
OBLIQUE_SEED = 22  # sagittal tilted about 15°, slices 3.3 mm apart
SERIES = [("straight", "sag_pd_fs"), ("straight", "cor_pd_fs"), ("oblique", "sag_pd_fs")]
BONES = {"femur": 1, "tibia": 2, "patella": 3}
THIN = {"medial_meniscus": 8, "lateral_meniscus": 9, "acl": 10, "pcl": 11}
THIN_DICE = 0.75  # a 1 x 1 x 3 mm grid blurs structures a few millimetres thick
SLIVER_MM2 = 6.0  # two grid voxels' 1 x 3 mm face: less of a structure may vanish from a slice
SPEC = Input.model_validate(KNEE_INPUT)


def options(seed: int, max_oblique: float, roles: tuple[str, ...]) -> StudyOptions:
    return StudyOptions(seed=seed, vendor="siemens", rescan=False, derived=False,
                        max_oblique=max_oblique, volume_spacing=VOXEL_MM,
                        overrides=Overrides(roles=roles, matrix=256))


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, WrittenStudy]:
    root = tmp_path_factory.mktemp("geometry")
    straight = options(STRAIGHT_SEED, 0.0, ("sag_pd_fs", "cor_pd_fs"))
    oblique = options(OBLIQUE_SEED, 15.0, ("sag_pd_fs",))
    return {"straight": write_study(root / "straight", straight),
            "oblique": write_study(root / "oblique", oblique)}


@pytest.fixture(scope="module")
def cases(studies: dict[str, WrittenStudy]) -> dict[tuple[str, str], tuple[LoadedSeries,
                                                                           np.ndarray]]:
    """Each series loaded from its DICOM files, with the truth's labels on its slices: the
    written truth for the sagittal PD FS, the phantom's labels rendered on the others."""
    loaded = {}
    for name, role in SERIES:
        study = studies[name]
        series = next(s for s in study.series if s.plan.role == role)
        if role == "sag_pd_fs":
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(study.truth.labels)))
        else:
            volume = anatomy.build_volume(study.case, spacing_mm=VOXEL_MM)
            truth = render.label_series(volume, series.stacks[0])
        loaded[name, role] = (load_series(series.files), truth)
    return loaded


def test_the_series_are_what_the_round_trip_needs(studies, cases):
    straight = {s.plan.role: s.plan for s in studies["straight"].series}
    assert straight["sag_pd_fs"].spacing < 3.0 and straight["cor_pd_fs"].spacing < 3.0
    loaded, _ = cases["oblique", "sag_pd_fs"]
    normal = np.reshape(loaded.image.GetDirection(), (3, 3))[:, 2]
    assert 13.0 <= math.degrees(math.acos(abs(normal[0]))) <= 17.0


@pytest.mark.parametrize(("name", "role"), SERIES)
def test_the_model_grid_keeps_the_series_obliquity_and_covers_it(cases, name, role):
    loaded, _ = cases[name, role]
    grid = model_input([loaded.image], SPEC).reference
    axes, source = (np.reshape(image.GetDirection(), (3, 3))
                    for image in (grid, loaded.image))
    assert grid.GetSpacing() == (1.0, 1.0, 3.0)
    # DICOMOrient permutes and flips the series' axes to PIL: no turn, no interpolation
    np.testing.assert_allclose(np.abs(axes.T @ source).max(axis=1), 1.0, atol=1e-6)
    assert axes[1, 0] > 0.9 and axes[2, 1] < -0.9 and axes[0, 2] > 0.9  # toward P, I, L
    corners = [loaded.image.TransformIndexToPhysicalPoint([i, j, k])
               for i in (0, loaded.image.GetSize()[0] - 1)
               for j in (0, loaded.image.GetSize()[1] - 1)
               for k in (0, loaded.image.GetSize()[2] - 1)]
    for corner in corners:
        index = np.array(grid.TransformPhysicalPointToContinuousIndex(corner))
        assert np.all(index > -0.5) and np.all(index < np.array(grid.GetSize()) - 0.5)


def assert_lands_on_its_slices(got: np.ndarray, truth: np.ndarray, name: str, least: float,
                               pixel_mm2: float) -> None:
    """``got`` overlaps ``truth`` with Dice >= ``least`` and holds the structure on the
    truth's slices: it may gain or lose a slice at either end, and lose a slice where the
    truth has only a sliver (under :data:`SLIVER_MM2`), never more."""
    assert truth.any(), name
    assert dice(got, truth) >= least, (name, dice(got, truth))
    want, have = slices_with(truth), slices_with(got)
    first, last = min(want), max(want)
    slivers = {k for k in want if (truth[k].sum() * pixel_mm2) < SLIVER_MM2}
    shown = (name, sorted(want), sorted(have))
    assert have - want <= {first - 1, last + 1}, shown
    assert want - have <= {first, last} | slivers, shown
    assert len((want ^ have) & {first - 1, first}) <= 1, shown
    assert len((want ^ have) & {last, last + 1}) <= 1, shown


def centre_shift(got: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """How far apart the centres of two (slices, rows, columns) masks lie, in voxels along
    each axis: a slip of half a voxel in the round trip shows here, not in Dice."""
    return np.argwhere(got).mean(axis=0) - np.argwhere(truth).mean(axis=0)


@pytest.mark.parametrize(("name", "role"), SERIES)
def test_a_perfect_prediction_on_the_model_grid_lands_on_the_source_slices(cases, name, role):
    loaded, truth = cases[name, role]
    prepared = model_input([loaded.image], SPEC)
    truth_image = sitk.GetImageFromArray(truth)
    truth_image.CopyInformation(loaded.image)
    prediction = sitk.GetArrayFromImage(resample(truth_image, prepared.reference,
                                                 sitk.sitkNearestNeighbor)).transpose(2, 1, 0)
    assert prediction.shape == prepared.array.shape[1:]  # (x, y, z), as the network's labels

    back = labels_to_series(labels_image(prediction, prepared.reference), loaded)

    assert back.shape == truth.shape
    pixel_mm2 = math.prod(loaded.image.GetSpacing()[:2])
    for structure, value in BONES.items():
        assert_lands_on_its_slices(back == value, truth == value, structure, 0.95, pixel_mm2)
        assert len(slices_with(back == value) ^ slices_with(truth == value)) <= 1, structure
        assert np.all(np.abs(centre_shift(back == value, truth == value)) < 0.35), structure
    for structure, value in THIN.items():
        assert_lands_on_its_slices(back == value, truth == value, structure, THIN_DICE,
                                   pixel_mm2)
    assert np.mean(back == truth) >= 0.95


@pytest.fixture(scope="module")
def oracles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Engine]:
    """:class:`Threshold` as knee-demo would run it (percentile normalization: fine for a
    bone's indicator) and without normalization (for a ligament's indicator, below the
    99.5th percentile of the grid)."""
    root = tmp_path_factory.mktemp("oracles")
    raw = manifest()
    plain = manifest(name="plain", input=KNEE_INPUT | {"normalization": {"method": "none"}})
    return {"femur": Engine(write_model(root, Threshold(), raw), "cpu"),
            "acl": Engine(write_model(root, Threshold(), plain), "cpu")}


@pytest.mark.parametrize(("name", "role"), SERIES)
@pytest.mark.parametrize("structure", ["femur", "acl"])
def test_an_oracle_model_segments_its_structure_on_the_source_slices(cases, oracles, name,
                                                                     role, structure):
    loaded, truth = cases[name, role]
    value = {**BONES, **THIN}[structure]
    indicator = series_of((truth == value).astype(np.float32), (1, 1, 1), np.eye(3),
                          like=loaded)

    result = oracles[structure].run([indicator])

    assert result.labels.shape == truth.shape
    bone = structure in BONES
    spacing = loaded.image.GetSpacing()
    assert_lands_on_its_slices(result.labels == 1, truth == value, structure,
                               0.95 if bone else THIN_DICE, spacing[0] * spacing[1])
    assert result.findings["volumes_ml"]["Femur"] == pytest.approx(
        (truth == value).sum() * math.prod(spacing) / 1000, rel=0.05 if bone else 0.2)
    assert result.findings["series_uid"] == loaded.series_uid


def test_the_sagittal_truth_is_the_phantom_on_those_slices(studies, cases):
    """The written truth and the rendered labels agree, so the sagittal and the other
    series are held to the same truth."""
    study = studies["straight"]
    series = next(s for s in study.series if s.plan.role == "sag_pd_fs")
    volume = anatomy.build_volume(study.case, spacing_mm=VOXEL_MM)
    _, truth = cases["straight", "sag_pd_fs"]
    np.testing.assert_array_equal(render.label_series(volume, series.stacks[0]), truth)

