"""Loading a selected series as a volume, and labels back onto its slices.

Phantom studies are small (64 x 64, 12 slices) and written once per module; every test
that damages files works on copies.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from scipy.spatial.transform import Rotation

from aiworker.infer.volume import LoadedSeries, VolumeError, labels_to_series, load_series
from aiworker.phantom import anatomy, render
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenSeries, WrittenStudy, write_study
from aiworker.phantom.truth import label_image

SLICES = 12
VOXEL_MM = 1.0
OBLIQUE_SEED = 7  # its sagittal series is tilted about 15° (checked below)
STRUCTURES = {"femur": 1, "tibia": 2, "medial_meniscus": 8, "acl": 10, "pcl": 11}
# least Dice of each structure resampled from 3 mm sagittal slices onto coronal ones: thin
# structures lose more to the coarse sampling
LEAST_DICE = {"femur": 0.9, "tibia": 0.9, "medial_meniscus": 0.6, "acl": 0.5, "pcl": 0.5}


def options(**changes) -> StudyOptions:
    changes.setdefault("seed", 3)
    changes.setdefault("max_oblique", 0.0)
    roles = changes.pop("roles", ("sag_pd_fs", "cor_pd_fs"))
    matrix = changes.pop("matrix", 64)
    return StudyOptions(vendor="siemens", rescan=False, volume_spacing=VOXEL_MM,
                        overrides=Overrides(roles=roles, matrix=matrix, slices=SLICES),
                        **changes)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, WrittenStudy]:
    """The same study in each encoding, plus an oblique one, a 128 matrix and a truthless
    Enhanced MR variant."""
    root = tmp_path_factory.mktemp("studies")
    variants = {
        "explicit": options(),
        "jpeg2000": options(transfer_syntax="jpeg2000", truth=False),
        "jpegls": options(transfer_syntax="jpegls", truth=False),
        "rle": options(transfer_syntax="rle", truth=False),
        "enhanced": options(enhanced=True, truth=False),
        "matrix128": options(matrix=128, truth=False),
        "oblique": options(seed=OBLIQUE_SEED, max_oblique=15.0, roles=("sag_pd_fs",)),
    }
    return {name: write_study(root / name, opts) for name, opts in variants.items()}


def series_of(study: WrittenStudy, role: str = "sag_pd_fs") -> WrittenSeries:
    return next(s for s in study.series if s.plan.role == role)


def volume_of(study: WrittenStudy) -> anatomy.KneeVolume:
    return anatomy.build_volume(study.case, spacing_mm=VOXEL_MM)


def copy_series(series: WrittenSeries, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(path, folder / path.name)) for path in series.files]


def raised(paths: list[Path]) -> str:
    with pytest.raises(VolumeError) as caught:
        load_series(paths)
    assert caught.value.kind == "data"
    message = str(caught.value)
    assert "\n" not in message and message
    return message


# --- geometry and pixels -------------------------------------------------------------------


def test_sagittal_series_matches_the_ground_truth_geometry_and_pixels(
        studies: dict[str, WrittenStudy]) -> None:
    study = studies["explicit"]
    series = series_of(study)
    loaded = load_series(series.files)
    truth = sitk.ReadImage(str(study.truth.labels))

    assert loaded.image.GetSize() == truth.GetSize() == (64, 64, SLICES)
    np.testing.assert_allclose(loaded.image.GetOrigin(), truth.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(loaded.image.GetSpacing(), truth.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(loaded.image.GetDirection(), truth.GetDirection(), atol=1e-3)

    datasets = [pydicom.dcmread(path) for path in series.files]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, float), (2, 3)))
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)))
    expected = np.stack([ds.pixel_array for ds in datasets]).astype(np.float32)
    assert loaded.image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(loaded.array(), expected)
    assert loaded.sop_instance_uids == [ds.SOPInstanceUID for ds in datasets]
    assert loaded.frame_numbers is None
    assert loaded.series_uid == series.uid
    assert loaded.study_uid == study.study_uid
    assert loaded.frame_of_reference_uid == datasets[0].FrameOfReferenceUID


def test_spacing_along_the_normal_comes_from_positions_not_slice_thickness(
        studies: dict[str, WrittenStudy], tmp_path: Path) -> None:
    series = series_of(studies["oblique"])
    files = copy_series(series, tmp_path)
    for path in files:
        edit(path, lambda ds: setattr(ds, "SliceThickness", 7.5))
    loaded = load_series(files)
    assert loaded.image.GetSpacing()[2] == pytest.approx(series.plan.spacing, abs=1e-4)


def test_oblique_fixture_is_tilted_about_fifteen_degrees(studies: dict[str, WrittenStudy]) -> None:
    normal = series_of(studies["oblique"]).stacks[0].normal
    tilt = math.degrees(math.acos(abs(normal[0])))
    assert 12.0 <= tilt <= 20.0


@pytest.mark.parametrize(("name", "role"), [("explicit", "sag_pd_fs"), ("explicit", "cor_pd_fs"),
                                            ("oblique", "sag_pd_fs")])
def test_labels_in_the_series_geometry_land_on_their_own_slices(
        studies: dict[str, WrittenStudy], name: str, role: str) -> None:
    study = studies[name]
    series = series_of(study, role)
    [geometry] = series.stacks
    labels = render.label_series(volume_of(study), geometry)
    loaded = load_series(series.files)

    resampled = labels_to_series(label_image(labels, geometry), loaded)

    assert resampled.dtype == np.uint8
    np.testing.assert_array_equal(resampled, labels)
    for label in STRUCTURES.values():
        assert set(np.flatnonzero((labels == label).any(axis=(1, 2)))) == set(
            np.flatnonzero((resampled == label).any(axis=(1, 2))))
    # slice k of the labels belongs to instance k + 1 of the phantom, the one at position k
    uids = [pydicom.dcmread(p, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
            for p in series.files]
    assert loaded.sop_instance_uids == uids


def test_labels_of_another_geometry_land_where_the_phantom_has_each_structure(
        studies: dict[str, WrittenStudy]) -> None:
    """Sagittal truth labels resampled onto the coronal series agree, where the sagittal
    slices reach, with the coronal labels the phantom renders, up to the coarser sampling
    of 3 mm sagittal slices."""
    study = studies["explicit"]
    coronal = series_of(study, "cor_pd_fs")
    loaded = load_series(coronal.files)
    expected = render.label_series(volume_of(study), coronal.stacks[0])
    truth = sitk.ReadImage(str(study.truth.labels))
    reach = sitk.Image(truth.GetSize(), sitk.sitkUInt8) + 1
    reach.CopyInformation(truth)
    covered = labels_to_series(reach, loaded) == 1
    assert 0.1 < covered.mean() < 0.9  # the two stacks cross, neither holds the other

    resampled = labels_to_series(truth, loaded)

    for name, label in STRUCTURES.items():
        want, got = (expected == label) & covered, resampled == label
        assert want.any(), name
        dice = 2 * np.sum(want & got) / (np.sum(want) + np.sum(got))
        slices_agree = np.mean(want.any(axis=(1, 2)) == got.any(axis=(1, 2)))
        assert dice > LEAST_DICE[name], (name, dice)
        assert slices_agree >= 0.8, (name, slices_agree)


def test_shuffled_file_order_gives_the_same_volume(studies: dict[str, WrittenStudy]) -> None:
    files = list(series_of(studies["explicit"]).files)
    reference = load_series(files)
    random.Random(1).shuffle(files)
    shuffled = load_series(files)
    assert_same_volume(shuffled, reference)
    assert shuffled.sop_instance_uids == reference.sop_instance_uids


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpegls", "rle"])
def test_compressed_syntaxes_give_the_voxels_of_explicit_little_endian(
        studies: dict[str, WrittenStudy], syntax: str) -> None:
    compressed = load_series(series_of(studies[syntax]).files)
    assert_same_volume(compressed, load_series(series_of(studies["explicit"]).files))


def test_enhanced_mr_equals_the_classic_volume(studies: dict[str, WrittenStudy]) -> None:
    [path] = series_of(studies["enhanced"]).files
    enhanced = load_series([path])
    assert_same_volume(enhanced, load_series(series_of(studies["explicit"]).files))
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert enhanced.sop_instance_uids == [uid] * SLICES
    assert enhanced.frame_numbers == list(range(1, SLICES + 1))


def test_enhanced_mr_frames_in_reverse_order_are_sorted_by_position(
        studies: dict[str, WrittenStudy], tmp_path: Path) -> None:
    [path] = series_of(studies["enhanced"]).files
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array[::-1].copy()
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(
        list(ds.PerFrameFunctionalGroupsSequence)[::-1])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(tmp_path / "reversed.dcm")

    reversed_ = load_series([tmp_path / "reversed.dcm"])

    assert_same_volume(reversed_, load_series([path]))
    assert reversed_.frame_numbers == list(range(SLICES, 0, -1))


def assert_same_volume(got: LoadedSeries, want: LoadedSeries) -> None:
    np.testing.assert_array_equal(got.array(), want.array())
    np.testing.assert_allclose(got.image.GetOrigin(), want.image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(got.image.GetSpacing(), want.image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(got.image.GetDirection(), want.image.GetDirection(), atol=1e-6)


# --- rescale -------------------------------------------------------------------------------


def test_rescale_slope_and_intercept_are_applied_per_image(
        studies: dict[str, WrittenStudy], tmp_path: Path) -> None:
    files = copy_series(series_of(studies["explicit"]), tmp_path)
    plain = load_series(files).array()
    ds = pydicom.dcmread(files[4])
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    ds.save_as(files[4])

    rescaled = load_series(files).array()

    np.testing.assert_array_equal(rescaled[4], plain[4] * 2 - 10)
    np.testing.assert_array_equal(np.delete(rescaled, 4, axis=0), np.delete(plain, 4, axis=0))


def test_enhanced_rescale_comes_from_the_pixel_value_transformation_group(
        studies: dict[str, WrittenStudy], tmp_path: Path) -> None:
    [path] = series_of(studies["enhanced"]).files
    plain = load_series([path]).array()
    ds = pydicom.dcmread(path)
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    transform.RescaleSlope, transform.RescaleIntercept = 2, 5
    ds.save_as(tmp_path / "scaled.dcm")
    np.testing.assert_array_equal(load_series([tmp_path / "scaled.dcm"]).array(), plain * 2 + 5)


# --- geometry problems ---------------------------------------------------------------------


@pytest.fixture
def sagittal(studies: dict[str, WrittenStudy], tmp_path: Path) -> list[Path]:
    """A copy of the sagittal series to damage."""
    return copy_series(series_of(studies["explicit"]), tmp_path / "sag")


def edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def test_a_deleted_slice_is_a_gap(sagittal: list[Path]) -> None:
    del sagittal[5]
    assert raised(sagittal).startswith("missing slice: gap of ")


def test_an_image_without_position_is_named(sagittal: list[Path]) -> None:
    edit(sagittal[3], lambda ds: delattr(ds, "ImagePositionPatient"))
    uid = pydicom.dcmread(sagittal[3]).SOPInstanceUID
    message = raised(sagittal)
    assert "lacks a valid ImagePositionPatient" in message and uid in message


def test_an_image_without_orientation_is_named(sagittal: list[Path]) -> None:
    edit(sagittal[0], lambda ds: delattr(ds, "ImageOrientationPatient"))
    assert "lacks a valid ImageOrientationPatient" in raised(sagittal)


def test_mixed_matrix_sizes(studies: dict[str, WrittenStudy], sagittal: list[Path]) -> None:
    reference = pydicom.dcmread(sagittal[2], stop_before_pixels=True)
    sagittal[2] = Path(shutil.copy(series_of(studies["matrix128"]).files[2], sagittal[2]))

    def same_series(ds: pydicom.Dataset) -> None:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            setattr(ds, keyword, reference[keyword].value)
    edit(sagittal[2], same_series)
    assert raised(sagittal) == "image size varies: 64x64, 128x128"


def test_a_rotated_orientation_is_not_parallel(sagittal: list[Path]) -> None:
    def rotate(ds: pydicom.Dataset) -> None:
        turn = Rotation.from_euler("x", 5.0, degrees=True)
        both = turn.apply(np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3)))
        ds.ImageOrientationPatient = [round(float(v), 6) for v in both.ravel()]
    edit(sagittal[7], rotate)
    assert raised(sagittal).startswith("slices not parallel:")


def test_uneven_spacing(sagittal: list[Path]) -> None:
    def shift(ds: pydicom.Dataset) -> None:
        normal = np.cross(*np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3)))
        position = np.asarray(ds.ImagePositionPatient, float) + 0.8 * normal
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
    edit(sagittal[6], shift)
    assert raised(sagittal).startswith("non-uniform spacing: step of ")


def test_sideways_shifted_slice_is_a_sheared_stack(sagittal: list[Path]) -> None:
    def shift(ds: pydicom.Dataset) -> None:
        row = np.asarray(ds.ImageOrientationPatient[:3], float)
        ds.ImagePositionPatient = [round(float(v), 6)
                                   for v in np.asarray(ds.ImagePositionPatient, float) + 2 * row]
    edit(sagittal[6], shift)
    assert raised(sagittal).startswith("slices not stacked along their normal")


def test_duplicate_positions(sagittal: list[Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.dcm"
    shutil.copy(sagittal[4], copy)
    edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()))
    assert raised([*sagittal, copy]).startswith("duplicate positions:")


def test_another_series_is_refused(studies: dict[str, WrittenStudy], sagittal: list[Path]) -> None:
    sagittal.append(series_of(studies["explicit"], "cor_pd_fs").files[0])
    assert "SeriesInstanceUID" in raised(sagittal)


def test_undecodable_pixels(studies: dict[str, WrittenStudy], tmp_path: Path) -> None:
    files = copy_series(series_of(studies["jpegls"]), tmp_path)

    def truncate(ds: pydicom.Dataset) -> None:
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(60)])
    edit(files[1], truncate)
    message = raised(files)
    assert "cannot be decoded (JPEG-LS Lossless" in message


def test_a_file_that_is_not_dicom(sagittal: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    assert raised([*sagittal, junk]) == "file junk.dcm is not readable as DICOM (InvalidDicomError)"


def test_no_files() -> None:
    assert raised([]) == "no images to load"


def test_enhanced_frame_without_position(studies: dict[str, WrittenStudy], tmp_path: Path) -> None:
    [path] = series_of(studies["enhanced"]).files
    target = Path(shutil.copy(path, tmp_path / "enhanced.dcm"))
    edit(target, lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[3],
                                    "PlanePositionSequence"))
    assert "frame 4 lacks a valid ImagePositionPatient" in raised([target])
