"""The synthetic knee study writer: DICOM geometry, vendor conventions, ground truth,
determinism, transfer syntaxes, the Enhanced MR variant (checked with dciodvfy) and the
``aiworker phantom`` command."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers.tools import dciodvfy_errors
from typer.testing import CliRunner

from aiworker.cli import app
from aiworker.phantom import anatomy, render
from aiworker.phantom.geometry import SliceGeometry
from aiworker.phantom.protocol import ROLES, SLICE_RANGE, Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, study_plan, write_study

SMALL = Overrides(matrix=(48, 64), slices=6)
VOXEL_MM = 1.5  # a coarser label volume than the default keeps these tests fast
FAT_SUPPRESSED = {"PD_FS", "T2_FS", "STIR"}
# (TR, TE) ranges in ms per weighting, as the issue states them
TIMING = {"PD_FS": ((2000, 4000), (20, 45)), "PD": ((2000, 4000), (20, 45)),
          "T1": ((400, 800), (8, 20)), "T2_FS": ((3000, 5000), (60, 100)),
          "STIR": ((3000, 6000), (20, 60))}
HAVE_DCIODVFY = shutil.which("dciodvfy") is not None
needs_dciodvfy = pytest.mark.skipif(not HAVE_DCIODVFY, reason="dciodvfy (dicom3tools) missing")


def write(tmp_path: Path, name: str = "case", **options) -> WrittenStudy:
    options.setdefault("overrides", SMALL)
    options.setdefault("rescan", False)
    options.setdefault("derived", False)
    options.setdefault("volume_spacing", VOXEL_MM)
    return write_study(tmp_path / name, StudyOptions(**options))


def headers(series) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in series.files]


def tokens(value) -> set[str]:
    """The values of a multi-valued CS attribute as a set (empty for an empty value)."""
    if value in (None, ""):
        return set()
    return {str(v) for v in (value if isinstance(value, pydicom.multival.MultiValue)
                             else [value])}


def geometry_of(datasets: list[pydicom.Dataset]) -> SliceGeometry:
    """The SliceGeometry a stack of single-frame headers describes."""
    first = datasets[0]
    iop = [float(v) for v in first.ImageOrientationPatient]
    return SliceGeometry(tuple(iop[:3]), tuple(iop[3:]),
                         tuple(float(v) for v in first.ImagePositionPatient), int(first.Rows),
                         int(first.Columns), len(datasets), float(first.PixelSpacing[0]),
                         float(first.PixelSpacing[1]), float(first.SliceThickness),
                         float(first.SpacingBetweenSlices))


def centre(stack: SliceGeometry) -> np.ndarray:
    """The middle of a stack, in patient mm."""
    return (np.asarray(stack.first_position)
            + (stack.columns - 1) / 2 * stack.column_spacing * np.asarray(stack.row_dir)
            + (stack.rows - 1) / 2 * stack.row_spacing * np.asarray(stack.col_dir)
            + (stack.slices - 1) / 2 * stack.spacing_between_slices * stack.normal)


# --- geometry ------------------------------------------------------------------------------


def test_every_series_steps_along_its_normal_in_one_frame_of_reference(tmp_path: Path) -> None:
    study = write(tmp_path, seed=3, max_oblique=20.0)
    frames, studies = set(), set()
    for series in study.series:
        datasets = headers(series)
        frames |= {d.FrameOfReferenceUID for d in datasets}
        studies |= {d.StudyInstanceUID for d in datasets}
        assert [int(d.InstanceNumber) for d in datasets] == list(range(1, len(datasets) + 1))
        for stack in series.stacks:
            stack_sets = [d for d in datasets
                          if np.allclose(d.ImageOrientationPatient, stack.orientation, atol=1e-6)]
            assert len(stack_sets) == stack.slices
            iop = np.asarray(stack_sets[0].ImageOrientationPatient, float)
            row, col = iop[:3], iop[3:]
            assert np.isclose(row @ col, 0, atol=1e-6)
            assert np.allclose([np.linalg.norm(row), np.linalg.norm(col)], 1, atol=1e-6)
            normal = np.cross(row, col)
            positions = np.array([d.ImagePositionPatient for d in stack_sets], float)
            steps = np.diff(positions, axis=0)
            spacing = float(stack_sets[0].SpacingBetweenSlices)
            assert np.allclose(steps, spacing * normal, atol=1e-5)
            locations = np.array([float(d.SliceLocation) for d in stack_sets])
            assert np.allclose(locations, positions @ normal, atol=1e-5)
            assert float(stack_sets[0].SliceThickness) <= spacing
            assert [float(v) for v in stack_sets[0].PixelSpacing] == pytest.approx(
                stack.pixel_spacing, abs=1e-6)
    assert len(frames) == 1 and len(studies) == 1


def test_truth_nifti_matches_the_dicom_series_as_simpleitk_reads_it(tmp_path: Path) -> None:
    study = write(tmp_path, seed=4, max_oblique=20.0)
    facts = json.loads(study.truth.facts.read_text())
    target = next(s for s in study.series if s.uid == facts["ground_truth"]["series_uid"])
    assert target.plan.role == "sag_pd_fs"

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(target.files[0].parent), target.uid)
    reader.SetFileNames(names)
    dicom = reader.Execute()
    labels = sitk.ReadImage(str(study.truth.labels))
    assert labels.GetSize() == dicom.GetSize() == (target.plan.columns, target.plan.rows,
                                                   target.plan.slices)
    assert np.allclose(labels.GetOrigin(), dicom.GetOrigin(), atol=1e-4)
    assert np.allclose(labels.GetSpacing(), dicom.GetSpacing(), atol=1e-4)
    assert np.allclose(labels.GetDirection(), dicom.GetDirection(), atol=1e-5)

    # a voxel's physical point is the centre of the same DICOM pixel
    for index in [(0, 0, 0), (5, 3, 2), (target.plan.columns - 1, target.plan.rows - 1,
                                         target.plan.slices - 1)]:
        column, row, k = index
        ds = pydicom.dcmread(target.files[k])
        iop = np.asarray(ds.ImageOrientationPatient, float)
        centre = (np.asarray(ds.ImagePositionPatient, float)
                  + column * float(ds.PixelSpacing[1]) * iop[:3]
                  + row * float(ds.PixelSpacing[0]) * iop[3:])
        assert np.allclose(labels.TransformIndexToPhysicalPoint(index), centre, atol=1e-4)


def test_truth_labels_are_the_anatomy_at_each_dicom_pixel(tmp_path: Path) -> None:
    study = write(tmp_path, seed=5, acl="torn")
    target = next(s for s in study.series if s.plan.role == "sag_pd_fs")
    datasets = headers(target)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(study.truth.labels)))
    volume = anatomy.build_volume(anatomy.make_case(5, acl="torn"), spacing_mm=VOXEL_MM)
    # the labels render.label_series gives for the geometry the DICOM headers describe
    assert np.array_equal(labels, render.label_series(volume, geometry_of(datasets)))
    # and each label is the anatomy at that pixel's centre
    geometry = geometry_of(datasets)
    for k in (0, geometry.slices // 2):
        assert np.array_equal(labels[k], volume.label_at(geometry.slice_points(k)))
    assert set(np.unique(labels)) <= set(anatomy.LABELS)
    assert len(np.unique(labels)) > 2, "the sagittal stack should cut through the knee"


def test_label_table_and_facts(tmp_path: Path) -> None:
    study = write(tmp_path, seed=6, acl="intact", side="L", rescan=True)
    table = json.loads(study.truth.label_table.read_text())
    assert table == {str(k): v for k, v in anatomy.LABELS.items()}
    facts = json.loads(study.truth.facts.read_text(encoding="utf-8"))
    assert facts["case"]["acl_torn"] is False and facts["case"]["side"] == "L"
    assert facts["study_uid"] == study.study_uid
    by_uid = {entry["series_uid"]: entry for entry in facts["series"]}
    for series in study.series:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        entry = by_uid[ds.SeriesInstanceUID]
        assert entry["series_number"] == ds.SeriesNumber
        assert entry["role"] == series.plan.role
        assert entry["sequence"] == ROLES[entry["role"]].kind
        assert entry["plane"] == ROLES[entry["role"]].plane
        assert entry["fat_suppressed"] == (entry["sequence"] in FAT_SUPPRESSED)
        assert entry["series_description"] == ds.SeriesDescription
        assert (study.root / entry["folder"] / series.files[0].name).is_file()
        assert ds.Laterality == "L"


# --- the protocol and vendor conventions ---------------------------------------------------


def test_default_protocol_is_a_routine_knee_exam_in_realistic_ranges(tmp_path: Path) -> None:
    study = write_study(tmp_path / "full",
                        StudyOptions(seed=11, rescan=False, derived=False, truth=False))
    roles = [s.plan.role for s in study.series]
    assert roles[0] == "localizer" and len(roles) == len(set(roles)) == 6
    assert {"sag_pd_fs", "sag_t1", "cor_t1"} <= set(roles)
    assert len({"cor_pd_fs", "cor_stir"} & set(roles)) == 1
    assert len({"ax_pd_fs", "ax_t2_fs"} & set(roles)) == 1
    localizer = headers(study.series[0])
    assert len({tuple(d.ImageOrientationPatient) for d in localizer}) == 3
    for series in study.series[1:]:
        ds = pydicom.dcmread(series.files[0])
        assert 256 <= ds.Columns <= 512 and 224 <= ds.Rows <= 512
        assert SLICE_RANGE[0] <= len(series.files) <= SLICE_RANGE[1]
        assert 2.5 <= float(ds.SliceThickness) <= 4.0
        assert ds.BodyPartExamined == "KNEE"
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert ds.pixel_array.max() > 0
    # the series of one plane share its (oblique) prescription
    sagittal = [s.stacks[0] for s in study.series if s.plan.plane == "sagittal"]
    assert sagittal[0].orientation == sagittal[1].orientation
    assert centre(sagittal[0]) == pytest.approx(centre(sagittal[1]), abs=1e-6)
    assert sagittal[0].slices == sagittal[1].slices


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_vendor_header_conventions(tmp_path: Path, vendor: str) -> None:
    study = write(tmp_path, seed=21, vendor=vendor, descriptions="vendor", rescan=False,
                  overrides=Overrides(roles=tuple(ROLES), matrix=32, slices=3), truth=False)
    numbers = []
    for series in study.series:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        kind, plane = series.plan.kind, series.plan.plane
        numbers.append(int(ds.SeriesNumber))
        options, scanning = tokens(ds.ScanOptions), tokens(ds.ScanningSequence)
        assert ds.Manufacturer == study.plan.scanner.manufacturer
        assert ds.ManufacturerModelName == study.plan.scanner.model
        assert float(ds.MagneticFieldStrength) in (1.5, 3.0)
        assert ds.MRAcquisitionType == "2D"
        assert ds.SeriesDescription and ds.ProtocolName and ds.SequenceName
        assert ds.SequenceVariant and ds.ImageType[0] == "ORIGINAL"
        assert int(ds.AcquisitionNumber) >= 1
        assert ("ImagesInAcquisition" in ds) == (vendor != "siemens")
        if "ImagesInAcquisition" in ds:
            assert int(ds.ImagesInAcquisition) == len(series.files)
        assert ("FS" in options) == (kind in ("PD_FS", "T2_FS")), (vendor, kind, options)
        if kind in TIMING:
            (tr_low, tr_high), (te_low, te_high) = TIMING[kind]
            assert tr_low <= float(ds.RepetitionTime) <= tr_high
            assert te_low <= float(ds.EchoTime) <= te_high
        if kind == "STIR":
            assert "IR" in scanning and 130 <= float(ds.InversionTime) <= 170
        else:
            assert "IR" not in scanning and "InversionTime" not in ds
        if vendor == "siemens":
            assert ds.SeriesDescription == ds.ProtocolName
            assert ds.SequenceName.startswith("*tir2d1" if kind == "STIR" else
                                              "*fl2d1" if kind == "LOC" else "*tse2d1")
        if vendor == "ge":
            assert ds.ProtocolName == "KNEE ROUTINE"
            if kind in ("T1", "PD"):  # spatial saturation bands, no fat suppression
                assert "SAT_GEMS" in options and "FS" not in options
        if vendor == "philips":
            assert ds.ImageType[2].startswith("M_")
        plane_word = {"siemens": {"sagittal": "sag", "coronal": "cor", "axial": "tra"},
                      "ge": {"sagittal": "Sag", "coronal": "Cor", "axial": "Ax"},
                      "philips": {"sagittal": "SAG", "coronal": "COR", "axial": "TRA"}}[vendor]
        if plane in plane_word:
            assert plane_word[plane] in ds.SeriesDescription
    step = 100 if vendor == "philips" else 1
    assert numbers == [step * i + (1 if vendor == "philips" else 0)
                       for i in range(1, len(numbers) + 1)]


@pytest.mark.parametrize("mode", ["generic", "empty"])
def test_plain_descriptions_leave_fat_suppression_to_the_technique(tmp_path: Path,
                                                                   mode: str) -> None:
    study = write(tmp_path, seed=22, vendor="ge", descriptions=mode,
                  overrides=Overrides(roles=("sag_pd_fs", "sag_t1", "cor_stir"), matrix=32,
                                      slices=3), truth=False)
    datasets = [pydicom.dcmread(s.files[0], stop_before_pixels=True) for s in study.series]
    assert len({d.SeriesDescription for d in datasets}) == 1
    assert len({d.ProtocolName for d in datasets}) == 1
    if mode == "empty":
        assert datasets[0].SeriesDescription == "" and datasets[0].ProtocolName == ""
    else:
        assert "PD" not in datasets[0].SeriesDescription
    pd_fs, t1, stir = datasets
    assert "FS" in tokens(pd_fs.ScanOptions) and "FS" not in tokens(t1.ScanOptions)
    assert "IR" in tokens(stir.ScanningSequence) and float(stir.InversionTime) < 200


def test_descriptions_and_rescans_are_drawn_with_their_probabilities() -> None:
    plans = [study_plan(StudyOptions(seed=seed, plain_descriptions_probability=0.5,
                                     rescan_probability=0.3)) for seed in range(400)]
    modes = [plan.descriptions for plan in plans]
    assert 0.4 < modes.count("vendor") / len(modes) < 0.6
    assert abs(modes.count("generic") - modes.count("empty")) < 0.1 * len(modes)
    rescans = [any(s.rescan_of for s in plan.series) for plan in plans]
    assert 0.2 < sum(rescans) / len(rescans) < 0.4
    vendors = [plan.vendor.key for plan in plans]
    assert all(vendors.count(v) > 80 for v in ("siemens", "ge", "philips"))


def test_rescanned_series_comes_later_with_a_higher_number(tmp_path: Path) -> None:
    study = write(tmp_path, seed=23, vendor="siemens", rescan=True)
    first, again = [s for s in study.series if s.plan.role == "sag_pd_fs"]
    assert again is study.series[-1] and again.plan.rescan_of == "sag_pd_fs"
    a, b = (pydicom.dcmread(s.files[0], stop_before_pixels=True) for s in (first, again))
    assert b.SeriesNumber > max(int(pydicom.dcmread(s.files[0], stop_before_pixels=True)
                                    .SeriesNumber) for s in study.series[:-1])
    assert b.SeriesInstanceUID != a.SeriesInstanceUID
    assert b.SeriesDescription == a.SeriesDescription
    when = {s: datetime.strptime(ds.SeriesDate + ds.SeriesTime.split(".")[0], "%Y%m%d%H%M%S")
            for s, ds in (("a", a), ("b", b))}
    assert when["b"] > when["a"]
    assert b.AcquisitionTime > a.AcquisitionTime
    assert b.ImageOrientationPatient == a.ImageOrientationPatient  # the same prescription
    facts = json.loads(study.truth.facts.read_text())
    assert facts["series"][-1]["rescan_of"] == first.number


def test_a_reformat_is_the_sagittal_pd_fs_saved_again_as_derived(tmp_path: Path) -> None:
    study = write(tmp_path, seed=29, vendor="ge", descriptions="vendor", derived=True)
    source, reformat = [s for s in study.series if s.plan.role == "sag_pd_fs"]
    assert reformat is study.series[-1] and reformat.plan.derived and not source.plan.derived
    a, b = (pydicom.dcmread(s.files[0], stop_before_pixels=True) for s in (source, reformat))
    assert list(a.ImageType[:2]) == ["ORIGINAL", "PRIMARY"]
    assert list(b.ImageType) == ["DERIVED", "SECONDARY", "MPR"]
    assert b.SeriesDescription == f"{a.SeriesDescription} MPR"
    assert b.ImageOrientationPatient == a.ImageOrientationPatient
    assert (b.EchoTime, b.ScanOptions) == (a.EchoTime, a.ScanOptions)  # same contrast
    facts = json.loads(study.truth.facts.read_text())
    assert facts["ground_truth"]["series_uid"] == source.uid  # the labels are the acquisition's
    assert [s["derived"] for s in facts["series"]][-1] is True


def test_oblique_angles_stay_within_the_limit(tmp_path: Path) -> None:
    for limit in (0.0, 20.0):
        study = write(tmp_path, f"o{limit}", seed=24, max_oblique=limit, truth=False)
        for series in study.series:
            stack = series.stacks[0]
            base = {"sagittal": 0, "coronal": 1, "axial": 2}.get(series.plan.plane, 0)
            tilt = np.degrees(np.arccos(min(1.0, abs(stack.normal[base]))))
            assert tilt <= limit * 1.13 + 1e-6  # two rotations: full and half the limit
            if limit == 0.0:
                assert tilt < 1e-6
    with pytest.raises(ValueError, match="max_oblique"):
        StudyOptions(max_oblique=25.0).check()
    with pytest.raises(ValueError, match="jpeg2000 needs a matrix of at least 32"):
        StudyOptions(transfer_syntax="jpeg2000", overrides=Overrides(matrix=16)).check()


def test_non_ascii_patient_name_round_trips_in_utf8(tmp_path: Path) -> None:
    name = "YAMADA^TARO=山田^太郎"
    study = write(tmp_path, seed=25, patient_name=name, truth=False,
                  overrides=Overrides(roles=("sag_pd_fs",), matrix=16, slices=2))
    ds = pydicom.dcmread(study.files[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == name
    assert "山田".encode() in study.files[0].read_bytes()
    default = write(tmp_path, "drawn", seed=26, truth=False,
                    overrides=Overrides(roles=("sag_pd_fs",), matrix=16, slices=1))
    assert str(pydicom.dcmread(default.files[0]).PatientName)


# --- determinism and encodings ---------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a", seed=31, rescan=True)
    second = write(tmp_path, "b", seed=31, rescan=True)
    other = write(tmp_path, "c", seed=32, rescan=True)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second.root) for p in second.root.rglob("*")
                           if p.is_file())
    for relative in files:
        assert (first.root / relative).read_bytes() == (second.root / relative).read_bytes(), \
            relative
    assert first.study_uid == second.study_uid != other.study_uid


@pytest.mark.parametrize("syntax", ["implicit", "rle", "jpeg2000", "jpegls"])
def test_every_transfer_syntax_decodes_to_the_same_pixels(tmp_path: Path, syntax: str) -> None:
    if syntax == "jpegls":
        pytest.importorskip("jpeg_ls", reason="JPEG-LS encoding needs pyjpegls")
    options = dict(seed=41, truth=False, overrides=Overrides(roles=("localizer", "sag_pd_fs"),
                                                             matrix=(40, 48), slices=3))
    reference = write(tmp_path, "explicit", **options)
    encoded = write(tmp_path, syntax, transfer_syntax=syntax, **options)
    expected_uid = {"implicit": pydicom.uid.ImplicitVRLittleEndian,
                    "rle": pydicom.uid.RLELossless, "jpeg2000": pydicom.uid.JPEG2000Lossless,
                    "jpegls": pydicom.uid.JPEGLSLossless}[syntax]
    assert len(encoded.files) == len(reference.files)
    for ours, theirs in zip(encoded.files, reference.files, strict=True):
        a, b = pydicom.dcmread(ours), pydicom.dcmread(theirs)
        assert a.file_meta.TransferSyntaxUID == expected_uid
        assert a.SOPInstanceUID == b.SOPInstanceUID
        assert np.array_equal(a.pixel_array, b.pixel_array)


def test_enhanced_variant_is_one_multiframe_instance_per_series(tmp_path: Path) -> None:
    study = write(tmp_path, seed=42, enhanced=True,
                  overrides=Overrides(roles=("localizer", "sag_pd_fs", "cor_stir"),
                                      matrix=(40, 48), slices=5))
    classic = write(tmp_path, "classic", seed=42,
                    overrides=Overrides(roles=("localizer", "sag_pd_fs", "cor_stir"),
                                        matrix=(40, 48), slices=5))
    for multi, single in zip(study.series, classic.series, strict=True):
        [path] = multi.files
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage
        frames = ds.PerFrameFunctionalGroupsSequence
        assert int(ds.NumberOfFrames) == len(frames) == len(single.files)
        pixels = ds.pixel_array
        for frame, item, source in zip(range(len(frames)), frames, single.files, strict=True):
            reference = pydicom.dcmread(source)
            assert np.allclose(item.PlanePositionSequence[0].ImagePositionPatient,
                               reference.ImagePositionPatient, atol=1e-5)
            orientation = (item if "PlaneOrientationSequence" in item else
                           ds.SharedFunctionalGroupsSequence[0]).PlaneOrientationSequence[0]
            assert np.allclose(orientation.ImageOrientationPatient,
                               reference.ImageOrientationPatient, atol=1e-6)
            assert np.array_equal(pixels[frame], reference.pixel_array)
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert float(measures.SpacingBetweenSlices) == float(
            pydicom.dcmread(single.files[0]).SpacingBetweenSlices)
    stir = pydicom.dcmread(study.series[2].files[0], stop_before_pixels=True)
    assert stir.AcquisitionContrast == "STIR"
    pd_fs = pydicom.dcmread(study.series[1].files[0], stop_before_pixels=True)
    assert pd_fs.SpectrallySelectedSuppression == "FAT"


@needs_dciodvfy
@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_dciodvfy_finds_no_errors(tmp_path: Path, vendor: str) -> None:
    overrides = Overrides(roles=("localizer", "sag_pd_fs", "cor_stir", "ax_t2_fs"),
                          matrix=(32, 40), slices=2)
    for enhanced in (False, True):
        study = write(tmp_path, f"{vendor}-{enhanced}", seed=43, vendor=vendor,
                      enhanced=enhanced, derived=True, overrides=overrides, truth=False,
                      transfer_syntax="jpeg2000" if enhanced else "explicit")
        for series in study.series:
            assert dciodvfy_errors(series.files[0]) == [], series.files[0]


# --- the command line ----------------------------------------------------------------------


def test_phantom_command_writes_cases_with_truth(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "phantom", str(tmp_path / "out"), "--cases", "2", "--seed", "7", "--vendor", "philips",
        "--series", "sag_pd_fs,cor_t1", "--matrix", "32", "--slices", "4",
        "--rescan-probability", "0", "--acl", "torn"])
    assert result.exit_code == 0, result.output
    for index in range(2):
        case = tmp_path / "out" / f"case-{index:04d}"
        assert sorted(p.name for p in (case / "dicom").iterdir()) == ["101", "201"]
        assert len(list((case / "dicom").rglob("*.dcm"))) == 8
        facts = json.loads((case / "truth" / "facts.json").read_text())
        assert facts["seed"] == 7 + index and facts["case"]["acl_torn"] is True
        assert (case / "truth" / "labels.nii.gz").is_file()
    assert "case-0001: philips" in result.output

    bad = CliRunner().invoke(app, ["phantom", str(tmp_path / "bad"), "--series", "sag_foo"])
    assert bad.exit_code == 2
    assert "unknown series role 'sag_foo'" in bad.output
