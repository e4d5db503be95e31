"""The DICOM Segmentation of a job, built from a phantom study's truth labels (as if the
model had predicted them perfectly), written to a file and read back with pydicom and
highdicom: codes, references, frame-to-slice placement, UIDs and dciodvfy."""

from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers.results import truth_series_labels
from helpers.tools import dciodvfy_errors
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

import aiworker
from aiworker.infer.manifest import Manifest
from aiworker.infer.manifest_sections import Code
from aiworker.infer.registry import Registry, model_id
from aiworker.results.seg import SERIES_DESCRIPTION, SegError, build_seg
from aiworker.results.uids import result_uid

SEED = 3  # a GE study (ImageLaterality, series number 2 for the sagittal PD FS)
LABELMAP_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
SIDES = {"R": "24028007", "L": "7771000"}


class Case:
    """One source series with its datasets, its loaded volume, the truth labels on its
    slices and the knee-demo model."""

    def __init__(self, root: Path, enhanced: bool):
        files, self.loaded, self.labels = truth_series_labels(root, SEED, 256,
                                                              enhanced=enhanced)
        # shuffled: build_seg must pair each label slice with its instance, not file order
        self.datasets = [pydicom.dcmread(path) for path in files]
        random.Random(SEED).shuffle(self.datasets)
        spec = Registry().get("knee-demo")
        self.manifest: Manifest = spec.manifest
        self.model_id = model_id(spec)
        self.enhanced = enhanced

    def build(self, **kwargs) -> Dataset:
        return build_seg(self.datasets, self.loaded, self.labels, self.manifest,
                         self.model_id, **kwargs)

    def source_position(self, k: int) -> list[float]:
        """ImagePositionPatient of source slice k."""
        uid = self.loaded.sop_instance_uids[k]
        source = next(ds for ds in self.datasets if ds.SOPInstanceUID == uid)
        if self.loaded.frame_numbers is None:
            return [float(v) for v in source.ImagePositionPatient]
        frame = source.PerFrameFunctionalGroupsSequence[self.loaded.frame_numbers[k] - 1]
        return [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]

    def slice_of(self, frame: Dataset) -> int:
        """The source slice index a SEG frame's derivation references."""
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
        uids = self.loaded.sop_instance_uids
        if self.loaded.frame_numbers is None:
            return uids.index(ref.ReferencedSOPInstanceUID)
        frames = list(zip(uids, self.loaded.frame_numbers, strict=True))
        return frames.index((ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber)))


@pytest.fixture(scope="module", params=["classic", "enhanced"])
def case(request, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(tmp_path_factory.mktemp(request.param), request.param == "enhanced")


@pytest.fixture(scope="module")
def binary(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    case.build().save_as(path, enforce_file_format=True)
    return path


def test_the_labels_are_a_real_prediction_in_shuffled_instances(case):
    if not case.enhanced:
        order = [ds.SOPInstanceUID for ds in case.datasets]
        assert order != case.loaded.sop_instance_uids
    present = set(np.unique(case.labels))
    assert {label.value for label in case.manifest.outputs.segmentation.labels} <= present
    assert max(present) > 11  # the phantom's other structures must not become segments


def test_the_binary_seg_carries_every_manifest_segment_with_its_codes(case, binary):
    ds = pydicom.dcmread(binary)
    assert ds.SOPClassUID == SegmentationStorage and ds.SegmentationType == "BINARY"
    labels = case.manifest.outputs.segmentation.labels
    assert [item.SegmentNumber for item in ds.SegmentSequence] == list(
        range(1, len(labels) + 1))
    source = case.datasets[0]
    side = (source.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0].FrameLaterality
            if case.enhanced else source.get("Laterality") or source.get("ImageLaterality"))
    assert side in SIDES
    for item, label in zip(ds.SegmentSequence, labels, strict=True):
        assert item.SegmentLabel == label.name
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == (
            label.category.value, label.category.scheme_designator, label.category.meaning)
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (
            label.type.value, label.type.scheme_designator, label.type.meaning)
        assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == SIDES[side]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
            case.manifest.name, case.manifest.version)
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI
        lab = hd.color.CIELabColor.from_rgb(*label.color)
        assert list(item.RecommendedDisplayCIELabValue) == list(lab.value)
        regions = [(r.CodeValue, r.CodeMeaning) for r in item.get("AnatomicRegionSequence", [])]
        expected = label.anatomic_region
        assert regions == ([(expected.value, expected.meaning)] if expected else [])
    read = hd.seg.segread(binary)
    assert read.get_segment_description(10).segment_label == "ACL"


def test_the_seg_is_a_new_series_in_the_source_study(case, binary):
    ds, source = pydicom.dcmread(binary), case.datasets[0]
    assert ds.StudyInstanceUID == source.StudyInstanceUID == case.loaded.study_uid
    assert ds.FrameOfReferenceUID == case.loaded.frame_of_reference_uid
    assert (ds.PatientID, ds.PatientName, ds.AccessionNumber) == (
        source.PatientID, source.PatientName, source.AccessionNumber)
    assert ds.SeriesDescription == SERIES_DESCRIPTION
    assert ds.SeriesNumber == 9000 + source.SeriesNumber
    assert ds.SOPInstanceUID == result_uid(case.loaded.series_uid, case.model_id, "seg", "sop")
    assert ds.SeriesInstanceUID == result_uid(case.loaded.series_uid, case.model_id, "seg",
                                              "series")
    versions = [f"aiworker {aiworker.__version__}", "knee-demo 2.2.0"]
    assert (ds.Manufacturer, ds.ManufacturerModelName) == ("aiworker", "knee-demo")
    assert list(ds.SoftwareVersions) == versions
    ours = [item for item in ds.ContributingEquipmentSequence
            if item.Manufacturer == "aiworker"]
    assert len(ours) == 1 and list(ours[0].SoftwareVersions) == versions
    assert ours[0].ManufacturerModelName == "knee-demo"
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # processing


def test_the_seg_references_every_labelled_source_instance(case, binary):
    ds = pydicom.dcmread(binary)
    series = ds.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == case.loaded.series_uid
    referenced = {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence}
    labelled = {uid for k, uid in enumerate(case.loaded.sop_instance_uids)
                if np.isin(case.labels[k], range(1, 12)).any()}
    assert labelled and labelled <= referenced


def test_each_frame_carries_the_labels_of_its_source_slice_on_its_plane(case, binary):
    ds = pydicom.dcmread(binary)
    frames, pixels = ds.PerFrameFunctionalGroupsSequence, ds.pixel_array
    values = {n: label.value for n, label in
              enumerate(case.manifest.outputs.segmentation.labels, start=1)}
    seen: dict[int, set[int]] = {}
    for index, frame in enumerate(frames):
        k = case.slice_of(frame)
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        np.testing.assert_array_equal(pixels[index], case.labels[k] == values[number])
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, case.source_position(k), atol=1e-3)
        seen.setdefault(k, set()).add(values[number])
    for k in range(case.loaded.slices):  # empty frames are omitted, none is missing
        expected = set(np.unique(case.labels[k])) & set(values.values())
        assert seen.get(k, set()) == expected
    assert len(seen) > case.loaded.slices // 2


def test_highdicom_finds_the_slices_by_source_instance(case, binary):
    if case.enhanced:
        pytest.skip("per-instance lookup is for single-frame sources")
    read = hd.seg.segread(binary)
    for k in (5, 12, 20):
        uid = case.loaded.sop_instance_uids[k]
        mask = read.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid], segment_numbers=[1, 2], combine_segments=True,
            skip_overlap_checks=True)
        np.testing.assert_array_equal(mask[0], np.where(np.isin(case.labels[k], (1, 2)),
                                                        case.labels[k], 0))


def test_the_binary_seg_passes_dciodvfy(binary):
    assert dciodvfy_errors(binary) == []


def test_building_again_gives_the_same_uids_and_another_model_others(case):
    first, again = case.build(), case.build()
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    other = build_seg(case.datasets, case.loaded, case.labels, case.manifest,
                      "knee-demo@3.0.0")
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_the_labelmap_option_is_one_frame_per_slice_of_segment_numbers(case, tmp_path):
    path = tmp_path / "labelmap.dcm"
    case.build(kind="labelmap", series_number=42).save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == LABELMAP_STORAGE and ds.SegmentationType == "LABELMAP"
    assert ds.SeriesNumber == 42
    read = hd.seg.segread(path)
    assert read.segmentation_type.value == "LABELMAP"
    expected = np.where(np.isin(case.labels, range(1, 12)), case.labels, 0)
    pixels = ds.pixel_array
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        np.testing.assert_array_equal(pixels[index], expected[case.slice_of(frame)])
    # dicom3tools 2022 predates the Label Map Segmentation IOD (2024): it finds no IOD for it


def test_a_job_that_found_nothing_still_lists_every_segment(case, tmp_path):
    path = tmp_path / "empty.dcm"
    empty = np.zeros_like(case.labels)
    build_seg(case.datasets, case.loaded, empty, case.manifest, case.model_id).save_as(path)
    ds = pydicom.dcmread(path)
    assert len(ds.SegmentSequence) == 11 and not ds.pixel_array.any()
    assert dciodvfy_errors(path) == []


def test_a_segment_has_an_anatomic_region_only_when_the_manifest_names_it(case, tmp_path):
    femur = Code(value="71341001", meaning="Femur")
    labels = [label.model_copy(update={"anatomic_region": femur if label.value == 5 else None})
              for label in case.manifest.outputs.segmentation.labels]
    segmentation = case.manifest.outputs.segmentation.model_copy(update={"labels": labels})
    outputs = case.manifest.outputs.model_copy(update={"segmentation": segmentation})
    manifest = case.manifest.model_copy(update={"outputs": outputs})
    path = tmp_path / "regions.dcm"
    build_seg(case.datasets, case.loaded, case.labels, manifest, case.model_id).save_as(path)
    ds = pydicom.dcmread(path)
    region = ds.SegmentSequence[4].AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodeMeaning) == ("71341001", "Femur")
    assert "AnatomicRegionSequence" not in ds.SegmentSequence[5]
    assert dciodvfy_errors(path) == []


def test_wrong_inputs_are_refused_with_a_reason(case):
    with pytest.raises(SegError, match="kind"):
        case.build(kind="fractional")
    with pytest.raises(SegError, match="slices"):
        build_seg(case.datasets, case.loaded, case.labels[1:], case.manifest, case.model_id)
    with pytest.raises(SegError, match="not given"):
        build_seg(case.datasets[:1] if not case.enhanced else [], case.loaded, case.labels,
                  case.manifest, case.model_id)
