"""The SR of a job: a TID 1500 Measurement Report on a real phantom study, with a SEG built
here by highdicom from the truth labels and findings counted on those labels; read back
with pydicom and highdicom, and checked with dciodvfy."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers.results import MODEL_ID
from helpers.tools import dciodvfy_errors
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from aiworker.infer import findings as infer_findings
from aiworker.infer.manifest import Manifest, load_manifest
from aiworker.infer.manifest_sections import Code as ManifestCode
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series
from aiworker.results import sr as sr_module
from aiworker.results.sr import SRError, build_sr
from aiworker.results.uids import result_uid

MANIFEST_PATH = Path(__file__).parents[1] / "aiworker" / "models" / "knee_demo" / "model.yaml"
TEAR = sr_module.FINDING_CODES["acl"]


@dataclass
class Job:
    """A job's inputs to the SR: source instances, its SEG, findings and the manifest."""

    sources: list[Dataset]
    seg: Dataset
    findings: dict
    manifest: Manifest


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """A torn-ACL phantom (64 x 64 sagittal PD FS only), its truth labels as the
    prediction, a BINARY SEG of them and the findings a job would write."""
    study = write_study(tmp_path_factory.mktemp("sr"), StudyOptions(
        seed=41, acl="torn", rescan=False, derived=False,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=64)))
    sources = sorted((pydicom.dcmread(path) for path in truth_series(study).files),
                     key=lambda ds: int(ds.InstanceNumber))
    manifest = load_manifest(MANIFEST_PATH)
    image = sitk.ReadImage(str(study.truth.labels))
    labels = sitk.GetArrayFromImage(image)
    values = [label.value for label in manifest.outputs.segmentation.labels]
    labels = np.where(np.isin(labels, values), labels, 0).astype(np.uint8)
    voxel_ml = math.prod(image.GetSpacing()) / 1000.0
    found = {"model": MODEL_ID, "series_uid": str(sources[0].SeriesInstanceUID),
             "volumes_ml": infer_findings.volumes_ml(labels, voxel_ml, manifest),
             "classification": {"acl": {"probability": 0.8731, "threshold": 0.5,
                                         "decision": "torn", "features": {}}}}
    return Job(sources, build_seg(sources, labels, manifest), found, manifest)


def build_seg(sources: list[Dataset], labels: np.ndarray, manifest: Manifest) -> Dataset:
    """A BINARY SEG of ``labels`` whose segment numbers are the manifest's label order."""
    described = manifest.outputs.segmentation.labels
    numbers = np.zeros(256, np.uint8)
    for number, label in enumerate(described, start=1):
        numbers[label.value] = number
    algorithm = hd.AlgorithmIdentificationSequence(
        name=manifest.name, version=manifest.version,
        family=codes.cid7162.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label.name,
        segmented_property_category=coded(label.category),
        segmented_property_type=coded(label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for number, label in enumerate(described, start=1)]
    series_uid = str(sources[0].SeriesInstanceUID)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=numbers[labels],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=result_uid(series_uid, MODEL_ID, "seg", "series"),
        series_number=9001, sop_instance_uid=result_uid(series_uid, MODEL_ID, "seg", "sop"),
        instance_number=1, manufacturer="aiworker", manufacturer_model_name=manifest.name,
        software_versions="0.1.0", device_serial_number="none")


def coded(code: ManifestCode) -> Code:
    """A manifest code as a pydicom code."""
    return Code(code.value, code.scheme_designator, code.meaning)


def written(job: Job, folder: Path, **changes) -> Path:
    """Build the SR of ``job`` (findings updated with ``changes``) and write it."""
    report = build_sr(job.sources, job.seg, job.findings | changes, job.manifest, MODEL_ID)
    path = folder / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    return path


def groups_by_name(path: Path):
    """The written SR read back, and its volumetric groups by tracking identifier."""
    report = hd.sr.srread(path)
    groups = report.content.get_volumetric_roi_measurement_groups()
    return report, {group.tracking_identifier: group for group in groups}


def test_the_report_is_a_comprehensive_3d_sr_in_the_source_study(job: Job, tmp_path: Path):
    ds = pydicom.dcmread(written(job, tmp_path))
    source = job.sources[0]
    series_uid = str(source.SeriesInstanceUID)
    assert ds.SOPClassUID == Comprehensive3DSRStorage and ds.Modality == "SR"
    assert ds.SOPInstanceUID == result_uid(series_uid, MODEL_ID, "sr", "sop")
    assert ds.SeriesInstanceUID == result_uid(series_uid, MODEL_ID, "sr", "series")
    assert ds.SeriesDescription == "AI knee measurements (not for diagnostic use)"
    assert ds.SeriesNumber == sr_module.SERIES_NUMBER_BASE + int(source.SeriesNumber)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "StudyDate"):
        assert ds[keyword].value == source[keyword].value, keyword
    assert (ds.CompletionFlag, ds.PreliminaryFlag, ds.VerificationFlag) == (
        "COMPLETE", "PRELIMINARY", "UNVERIFIED")
    evidence = {uid for _, _, uid, _ in hd.sr.Comprehensive3DSR.from_dataset(ds).get_evidence()}
    assert evidence == {s.SOPInstanceUID for s in job.sources} | {job.seg.SOPInstanceUID}


def test_procedure_observer_and_language(job: Job, tmp_path: Path):
    report, _ = groups_by_name(written(job, tmp_path))
    content = report.content
    assert isinstance(content, hd.sr.MeasurementReport)
    root = content[0]
    assert root.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    [procedure] = [item for item in root.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "241641004"
    [observer] = content.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert attributes.name == "knee-demo 2.2.0"
    assert attributes.manufacturer_name == "aiworker"
    assert attributes.model_name == "knee-demo"
    language = [item for item in root.ContentSequence
                if item.ConceptNameCodeSequence[0].CodeValue == "121049"]
    assert language and language[0].ConceptCodeSequence[0].CodeValue == "en-US"


def test_one_group_per_structure_with_its_volume_and_segment(job: Job, tmp_path: Path):
    _, groups = groups_by_name(written(job, tmp_path))
    labels = job.manifest.outputs.segmentation.labels
    assert list(groups) == [label.name for label in labels]
    assert any(volume > 0 for volume in job.findings["volumes_ml"].values())
    seg_numbers = {item.SegmentLabel: item.SegmentNumber for item in job.seg.SegmentSequence}
    for number, label in enumerate(labels, start=1):
        group = groups[label.name]
        [volume] = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(job.findings["volumes_ml"][label.name])
        assert volume.unit.value == "ml" and volume.unit.scheme_designator == "UCUM"
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == job.seg.SOPInstanceUID
        assert segment.referenced_sop_class_uid == job.seg.SOPClassUID
        assert segment.referenced_segment_numbers == [number]
        assert seg_numbers[label.name] == number
        source_series = segment.source_series_for_segmentation
        assert source_series.value == job.sources[0].SeriesInstanceUID
        assert group.finding_type.value == label.type.value
        algorithm = {item.name.value: item.value for item in group[0].ContentSequence
                     if item.name in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion)}
        assert algorithm == {"111001": "knee-demo", "111003": "2.2.0"}


def test_the_acl_group_carries_the_tear_finding_and_its_probability(job: Job, tmp_path: Path):
    _, groups = groups_by_name(written(job, tmp_path))
    acl = groups["ACL"]
    [tear] = acl.get_qualitative_evaluations(name=TEAR)
    assert tear.name.value == "239725005" and tear.value.value == "52101004"  # Present
    [probability] = acl.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(0.8731)
    assert probability.unit.value == "1" and probability.unit.scheme_designator == "UCUM"
    others = [group for name, group in groups.items() if name != "ACL"]
    assert all(not group.get_qualitative_evaluations(name=TEAR) for group in others)
    assert all(not group.get_measurements(name=codes.DCM.Probability) for group in others)


def test_an_intact_acl_is_reported_absent(job: Job, tmp_path: Path):
    intact = {"acl": {"probability": 0.1204, "threshold": 0.5, "decision": "intact"}}
    _, groups = groups_by_name(written(job, tmp_path, classification=intact))
    [tear] = groups["ACL"].get_qualitative_evaluations(name=TEAR)
    assert tear.value.value == "272519000"  # Absent
    [probability] = groups["ACL"].get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(0.1204)


def test_building_twice_gives_the_same_uids(job: Job):
    first = build_sr(job.sources, job.seg, job.findings, job.manifest, MODEL_ID)
    second = build_sr(job.sources, job.seg, job.findings, job.manifest, MODEL_ID)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    other = build_sr(job.sources, job.seg, job.findings, job.manifest, "knee-demo@1.0.1")
    assert other.SOPInstanceUID != first.SOPInstanceUID


def test_the_caller_can_choose_the_series_number(job: Job):
    report = build_sr(job.sources, job.seg, job.findings, job.manifest, MODEL_ID,
                      series_number=77)
    assert report.SeriesNumber == 77


def test_findings_that_do_not_fit_are_refused(job: Job):
    with pytest.raises(SRError, match="not in the manifest"):
        build_sr(job.sources, job.seg, job.findings | {"volumes_ml": {"Spleen": 1.0}},
                 job.manifest, MODEL_ID)
    with pytest.raises(SRError, match="findings are of series"):
        build_sr(job.sources, job.seg, job.findings | {"series_uid": "1.2.3"},
                 job.manifest, MODEL_ID)
    without_acl = copy.deepcopy(job.seg)
    without_acl.SegmentSequence = [item for item in without_acl.SegmentSequence
                                   if item.SegmentLabel != "ACL"]
    with pytest.raises(SRError, match="has no segment 'ACL'"):
        build_sr(job.sources, without_acl, job.findings, job.manifest, MODEL_ID)
    elsewhere = copy.deepcopy(job.seg)
    elsewhere.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3"
    with pytest.raises(SRError, match="does not reference series"):
        build_sr(job.sources, elsewhere, job.findings, job.manifest, MODEL_ID)


def test_dciodvfy_reports_no_error(job: Job, tmp_path: Path):
    assert dciodvfy_errors(written(job, tmp_path)) == []
