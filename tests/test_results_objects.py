"""All result objects of one run, written together: the SEG, the SR, the report and the
ORU^R01 agree with each other (the SR's volume of a structure is the SEG's voxel count times
the voxel volume, and the HL7 OBX holds the SR's volume), pass dciodvfy, and come out the
same when written twice; the preview PNG is always written, the Secondary Capture and the
HL7 header settings when asked."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers.results import MANIFEST, MODEL_ID, sr_volumes, truth_run
from helpers.tools import dciodvfy_errors
from PIL import Image
from pydicom.uid import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from aiworker.results.hl7 import volume_code
from aiworker.results.objects import write_results


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    """A torn-ACL phantom's sagittal PD FS, its truth as the prediction, and its objects."""
    root = tmp_path_factory.mktemp("objects")
    run = truth_run(root / "study", seed=52, matrix=128)
    files = write_results(root / "out", run.paths, run.loaded, run.labels, run.findings,
                          MANIFEST, MODEL_ID)
    again = write_results(root / "again", list(reversed(run.paths)), run.loaded, run.labels,
                          run.findings, MANIFEST, MODEL_ID,
                          hl7_settings={"sending_facility": "KNEECLINIC"},
                          secondary_capture=True)
    return files, again, run.voxel_ml, run.findings, run


def test_every_object_is_written_and_no_partial_file_is_left(written) -> None:
    files, *_ = written
    for path in (files.seg, files.sr, files.report, files.hl7, files.preview):
        assert path.stat().st_size > 0
    assert not list(files.seg.parent.glob(".partial-*"))
    assert pydicom.dcmread(files.seg).SOPClassUID == SegmentationStorage
    assert pydicom.dcmread(files.sr).SOPClassUID == Comprehensive3DSRStorage
    assert set(files.timings) == {"seg", "sr", "report", "hl7", "preview"}
    assert files.sc is None and not (files.seg.parent / "sc.dcm").exists()
    with Image.open(files.preview) as png:
        assert png.format == "PNG" and png.mode == "RGB"


def test_the_secondary_capture_is_the_preview_on_the_acl_slice(written) -> None:
    """Asked for, ``sc.dcm`` holds the preview PNG's pixels and references the source
    instance of the slice the preview shows: the slice with the most ACL."""
    _, again, _, _, run = written
    sc = pydicom.dcmread(again.sc)
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    with Image.open(again.preview) as png:
        assert np.array_equal(sc.pixel_array, np.asarray(png.convert("RGB")))
    acl = next(label.value for label in MANIFEST.outputs.segmentation.labels
               if label.name == "ACL")
    most_acl = int((run.labels == acl).sum(axis=(1, 2)).argmax())
    assert (sc.SourceImageSequence[0].ReferencedSOPInstanceUID
            == run.loaded.sop_instance_uids[most_acl])
    assert sc.StudyInstanceUID == pydicom.dcmread(run.paths[0]).StudyInstanceUID
    assert dciodvfy_errors(again.sc) == []


def test_sr_volumes_are_the_seg_voxel_counts_times_the_voxel_volume(written) -> None:
    files, _, voxel_ml, found, _ = written
    seg = hd.seg.segread(files.seg)
    volumes = sr_volumes(files.sr)
    assert set(volumes) == {label.name for label in MANIFEST.outputs.segmentation.labels}
    for number in seg.segment_numbers:
        name = seg.get_segment_description(number).segment_label
        voxels = int(np.asarray(seg.get_volume(segment_numbers=[number],
                                               combine_segments=False).array).sum())
        assert volumes[name] == pytest.approx(voxels * voxel_ml, abs=1e-3), name
        assert volumes[name] == pytest.approx(found["volumes_ml"][name], abs=1e-3)
    assert volumes["Femur"] > 100


def test_the_hl7_message_holds_the_sr_volumes_and_the_report(written) -> None:
    files, *_ = written
    segments = files.hl7.read_bytes().decode("utf-8").strip("\r").split("\r")
    obx = [segment.split("|") for segment in segments if segment.startswith("OBX|")]
    numbers = {fields[3].split("^")[0]: float(fields[5]) for fields in obx if fields[2] == "NM"}
    for name, ml in sr_volumes(files.sr).items():
        assert numbers[volume_code(name)] == pytest.approx(ml, abs=1e-3), name
    text_rows = [fields[5] for fields in obx if fields[2] == "TX"]
    report = files.report.read_text(encoding="utf-8").rstrip("\n").split("\n")
    assert len(text_rows) == len(report)
    assert "ACL" in files.report.read_text(encoding="utf-8")


def test_writing_again_gives_the_same_objects(written) -> None:
    files, again, *_ = written
    for first, second in ((files.seg, again.seg), (files.sr, again.sr)):
        a, b = pydicom.dcmread(first), pydicom.dcmread(second)
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    control, control_again = (path.read_bytes().decode("utf-8").split("\r")[0]
                              for path in (files.hl7, again.hl7))
    assert control.split("|")[9] == control_again.split("|")[9]
    assert control.split("|")[3] == "AIWORKER" and control_again.split("|")[3] == "KNEECLINIC"
    assert files.report.read_text() == again.report.read_text()


def test_seg_and_sr_pass_dciodvfy(written) -> None:
    files, *_ = written
    for path in (files.seg, files.sr):
        assert dciodvfy_errors(path) == [], path.name
