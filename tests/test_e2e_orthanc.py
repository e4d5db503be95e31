"""Results back to a real PACS and RIS, through real sockets.

The full flow: a phantom knee study goes to Debian's Orthanc with ``storescu``; Orthanc is
asked over REST to send it to the node; the node sends its SEG and SR back to the same
Orthanc and its ORU^R01 to an MLLP listener that answers AA. The test reads the objects
back from Orthanc's REST API and checks them against the source and each other.

The failures: Orthanc is down while results are pending (retried, delivered once it is
back), a RIS answering AE then AA (delivered once, on the second attempt), a RIS answering
AR (a dead letter, with the RIS's reason, in ``aiworker status``).
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from helpers.mllp import MllpListener
from helpers.results import sr_volumes
from helpers.tools import dciodvfy_errors, dcmtk, needs_dcmtk, needs_orthanc, wait_until
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.results.hl7 import volume_code

pytestmark = [needs_orthanc, needs_dcmtk]

# Each structure's SNOMED CT code (issue 5; checked in the model card) and, for the
# cartilages, the anatomic region that tells them apart.
SEGMENT_CODES = {
    "Femur": ("71341001", None), "Tibia": ("12611008", None), "Patella": ("64234005", None),
    "Fibula": ("87342007", None), "Femoral cartilage": ("309312004", "71341001"),
    "Tibial cartilage": ("309312004", "12611008"),
    "Patellar cartilage": ("309312004", "64234005"), "Medial meniscus": ("49390008", None),
    "Lateral meniscus": ("10013000", None), "ACL": ("895007", None), "PCL": ("16219000", None)}
ANATOMICAL_STRUCTURE = "91723000"
ACL_TEAR, PRESENT, ABSENT, PROBABILITY = "239725005", "52101004", "272519000", "122157"
PATIENT_NAME = "MÜLLER^JÖRG"
RESULT_WAIT_S = 240  # the knee model on one CPU thread, with a loaded CI machine


def knee_study(folder: Path, seed: int) -> Any:
    """A phantom knee study with a torn ACL: the sagittal PD FS the model wants, and a
    coronal and an axial series it must leave out."""
    return write_study(folder, StudyOptions(
        seed=seed, acl="torn", rescan=False, derived=False, patient_name=PATIENT_NAME,
        overrides=Overrides(roles=("sag_pd_fs", "cor_pd_fs", "ax_t2_fs"), matrix=64)))


def node_settings(pacs_port: int, **ris_ports: int) -> dict[str, Any]:
    """Node config overrides: the knee pipeline sends to Orthanc and to each RIS port;
    failed sends are retried after about a second."""
    destinations: dict[str, Any] = {
        "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs_port,
                 "ae_title": "ORTHANC"}}
    destinations |= {name: {"kind": "hl7", "host": "127.0.0.1", "port": port}
                     for name, port in ris_ports.items()}
    return {"destinations": destinations,
            "pipelines": [{"name": "knee", "rules": "config/rules/knee.yaml",
                           "model": "knee-demo", "send_to": list(destinations)}],
            "dispatch": {"retry_base_s": 1, "retry_cap_s": 2, "timeout_s": 5,
                         "interval_s": 0.2},
            "inference": {"threads": 1}}


def orthanc_results(orthanc: Any, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The SEG and SR Orthanc holds in the study, by modality (empty until both came)."""
    studies = orthanc.request("POST", "/tools/lookup", study_uid.encode(), timeout=5)
    if not studies:
        return {}
    found = {}
    for series in orthanc.get(f"/studies/{studies[0]['ID']}/series?expand"):
        modality = series["MainDicomTags"].get("Modality")
        if modality in ("SEG", "SR") and series["Instances"]:
            found[modality] = pydicom.dcmread(io.BytesIO(orthanc.file(series["Instances"][0])))
    return found if len(found) == 2 else {}


def source_series(files: list[Path]) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> data set of the study's sagittal PD FS (the series the SEG
    must segment), read from the files the modality sent."""
    datasets = [pydicom.dcmread(path) for path in files]
    sagittal = next(ds.SeriesInstanceUID for ds in datasets
                    if "sag" in ds.SeriesDescription.lower())
    return {ds.SOPInstanceUID: ds for ds in datasets if ds.SeriesInstanceUID == sagittal}


def segment_codes(seg: pydicom.Dataset) -> dict[str, tuple[str, str, str | None]]:
    """Segment label -> (category, type, anatomic region or None) code values."""
    codes = {}
    for item in seg.SegmentSequence:
        region = (item.AnatomicRegionSequence[0].CodeValue
                  if "AnatomicRegionSequence" in item else None)
        codes[item.SegmentLabel] = (item.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
                                    item.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                                    region)
    return codes


def seg_voxels(seg: pydicom.Dataset) -> dict[str, int]:
    """Segment label -> number of voxels set in its frames (BINARY SEG)."""
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), -1)
    labels = {item.SegmentNumber: item.SegmentLabel for item in seg.SegmentSequence}
    counts = dict.fromkeys(labels.values(), 0)
    for frame, groups in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        counts[labels[number]] += int(np.count_nonzero(frame))
    return counts


def acl_finding(sr: pydicom.Dataset) -> tuple[str, float]:
    """The SR's ACL tear finding (present or absent code) and its probability."""
    found: dict[str, Any] = {}

    def walk(items: Any) -> None:
        for item in items:
            concept = item.ConceptNameCodeSequence[0].CodeValue
            if concept == ACL_TEAR and "ConceptCodeSequence" in item:
                found["finding"] = item.ConceptCodeSequence[0].CodeValue
            if concept == PROBABILITY:
                found["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found["finding"], found["probability"]


def segments(message: str) -> dict[str, list[list[str]]]:
    """An ER7 message's segments by name, each as its fields."""
    found: dict[str, list[list[str]]] = {}
    for segment in message.strip("\r").split("\r"):
        fields = segment.split("|")
        found.setdefault(fields[0], []).append(fields)
    return found


def test_a_study_routed_through_orthanc_comes_back_as_seg_sr_and_hl7(
        node_factory, orthanc_factory, tmp_path) -> None:
    ris = MllpListener(("AA",))
    orthanc = orthanc_factory({})
    node = node_factory(**node_settings(orthanc.dicom_port, ris=ris.port))
    orthanc.request("PUT", "/modalities/aiworker",
                    {"AET": "AIWORKER", "Host": "127.0.0.1", "Port": node.port})
    study = knee_study(tmp_path / "knee", seed=61)
    try:
        sent = dcmtk("storescu", "+sd", "+r", "-aec", "ORTHANC", "127.0.0.1",
                     str(orthanc.dicom_port), study.dicom_dir)
        assert sent.returncode == 0, sent.stdout
        [orthanc_id] = [s["ID"] for s in orthanc.request(
            "POST", "/tools/lookup", study.study_uid.encode())]
        orthanc.request("POST", "/modalities/aiworker/store", orthanc_id.encode())

        results = wait_until(lambda: orthanc_results(orthanc, study.study_uid),
                             RESULT_WAIT_S, "the SEG and SR stored in Orthanc")
        wait_until(lambda: ris.messages, 30, "the ORU^R01 at the RIS")
    finally:
        ris.stop()
    seg, sr = results["SEG"], results["SR"]
    for name, result in results.items():  # as the PACS holds them
        result.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / f"{name}.dcm") == [], name
    sources = source_series(study.files)
    first = next(iter(sources.values()))

    assert seg.SOPClassUID == SegmentationStorage and sr.SOPClassUID == Comprehensive3DSRStorage
    for result in (seg, sr):
        assert result.StudyInstanceUID == study.study_uid
        assert (result.PatientID, str(result.PatientName)) == (first.PatientID, PATIENT_NAME)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesDescription == "AI knee segmentation (not for diagnostic use)"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} \
        == set(sources)

    # each frame lies on the position of the source slice it was derived from
    for groups in seg.PerFrameFunctionalGroupsSequence:
        uid = groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in sources[uid].ImagePositionPatient],
                                         abs=1e-3)

    codes = segment_codes(seg)
    assert set(codes) == set(SEGMENT_CODES)
    for label, (type_code, region) in SEGMENT_CODES.items():
        assert codes[label] == (ANATOMICAL_STRUCTURE, type_code, region), label

    # the SR's volumes are the SEG's voxel counts times the voxel volume
    positions = sorted(float(np.dot(ds.ImagePositionPatient, np.cross(
        ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:])))
        for ds in sources.values())
    voxel_ml = math.prod(float(v) for v in first.PixelSpacing) \
        * (positions[1] - positions[0]) / 1000.0
    volumes, voxels = sr_volumes(sr), seg_voxels(seg)
    assert set(volumes) == set(SEGMENT_CODES)
    for label, ml in volumes.items():
        assert ml == pytest.approx(voxels[label] * voxel_ml, rel=1e-4, abs=1e-3), label
    assert volumes["Femur"] > 10 and voxels["ACL"] > 0
    sr_seg_refs = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                   for item in _walk(sr.ContentSequence) if "ReferencedSOPSequence" in item
                   and item.ReferencedSOPSequence[0].ReferencedSOPClassUID
                   == SegmentationStorage}
    assert sr_seg_refs == {seg.SOPInstanceUID}

    # the RIS got one ORU^R01 that agrees with the DICOM objects
    [message] = ris.messages
    parts = segments(message)
    assert parts["MSH"][0][8] == "ORU^R01^ORU_R01"
    pid = parts["PID"][0]
    assert pid[3].split("^")[0] == first.PatientID
    assert pid[5].split("^")[:2] == ["MÜLLER", "JÖRG"]
    obr = parts["OBR"][0]
    assert obr[2].split("^")[0] == obr[3].split("^")[0] == first.AccessionNumber
    assert parts["ZDS"][0][1].split("^")[0] == study.study_uid
    numbers = {f[3].split("^")[0]: float(f[5]) for f in parts["OBX"] if f[2] == "NM"}
    for label, ml in volumes.items():
        assert numbers[volume_code(label)] == pytest.approx(ml, abs=1e-3), label
    finding, probability = acl_finding(sr)
    [acl] = [f for f in parts["OBX"] if f[2] == "CWE"]
    assert acl[5].split("^")[0] == ("ACL-TORN" if finding == PRESENT else "ACL-INTACT")
    assert numbers["ACL-TEAR-P"] == pytest.approx(probability, abs=1e-4)
    assert {f[11] for f in parts["OBX"]} == {"P"}
    state = node.sql("SELECT destination, object_kind, state, attempts FROM outbox"
                     " ORDER BY destination, object_kind")
    assert [tuple(r.values()) for r in state] == [
        ("pacs", "seg", "sent", 1), ("pacs", "sr", "sent", 1), ("ris", "hl7", "sent", 1)]


def test_results_wait_for_a_pacs_that_is_down_and_a_ris_that_refuses(
        node_factory, orthanc_factory, tmp_path) -> None:
    """Orthanc is stopped before the results are ready: the node retries and delivers once
    Orthanc is back. A RIS answering AE then AA gets the message on the second attempt and
    no more; a RIS answering AR makes a dead letter that ``aiworker status`` shows."""
    flaky, refusing = MllpListener(("AE", "AA"), "busy"), MllpListener(("AR",), "no such order")
    orthanc = orthanc_factory({})
    orthanc.stop()
    node = node_factory(**node_settings(orthanc.dicom_port, flaky=flaky.port,
                                        refusing=refusing.port))
    study = knee_study(tmp_path / "knee", seed=62)
    try:
        sent = dcmtk("storescu", "+sd", "+r", "-aec", "AIWORKER", "127.0.0.1", str(node.port),
                     study.dicom_dir)
        assert sent.returncode == 0, sent.stdout

        def pacs_retried() -> list[dict[str, Any]] | None:
            rows = [r for r in node.study_status(study.study_uid)["outbox"]
                    if r["destination"] == "pacs" and r["attempts"] >= 2]
            return rows if len(rows) == 2 else None

        for row in wait_until(pacs_retried, RESULT_WAIT_S, "two attempts on the PACS"):
            assert row["state"] == "pending" and "no association" in row["last_error"]
        dead = wait_until(lambda: [r for r in node.study_status(study.study_uid)["outbox"]
                                   if r["destination"] == "refusing" and r["state"] == "dead"],
                          30, "the refused message dead")
        assert dead[0]["attempts"] == 1
        assert dead[0]["last_error"] == "AR from the receiver: no such order"
        shown = node.cli("status", "--config", str(node.config_path))
        assert "outbox refusing hl7: dead" in shown.stdout and "no such order" in shown.stdout

        orthanc.start()
        wait_until(lambda: orthanc_results(orthanc, study.study_uid), 60,
                   "the SEG and SR stored in Orthanc after its restart")
        time.sleep(1.5)  # time for a wrong resend to show
    finally:
        flaky.stop()
        refusing.stop()
    rows = {(r["destination"], r["object_kind"]): r for r in node.sql("SELECT * FROM outbox")}
    assert rows["pacs", "seg"]["state"] == rows["pacs", "sr"]["state"] == "sent"
    assert rows["flaky", "hl7"]["state"] == "sent" and rows["flaky", "hl7"]["attempts"] == 2
    assert len(flaky.messages) == 2 and flaky.messages[0] == flaky.messages[1]
    assert len(refusing.messages) == 1
    [job] = node.sql("SELECT result_dir FROM jobs")
    assert flaky.messages[0] == (Path(job["result_dir"]) / "oru.hl7").read_bytes().decode()


def _walk(items: Any) -> Any:
    """Every content item of an SR content tree, depth first."""
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_a_kill_9_while_sending_loses_nothing(node_factory, orthanc_factory, tmp_path) -> None:
    """The node is killed (SIGKILL) while the ORU^R01 waits for its ACK and the SEG and SR
    wait for a PACS that is down. Restarted, it sends each object again, none is lost,
    nothing is run or queued twice, and what the RIS and PACS get twice is the same
    message (same control id) and the same SOP instances."""
    ris = MllpListener(("AA",), delays_s=(60.0,))
    orthanc = orthanc_factory({})
    orthanc.stop()
    node = node_factory(**node_settings(orthanc.dicom_port, ris=ris.port))
    study = knee_study(tmp_path / "knee", seed=63)
    try:
        sent = dcmtk("storescu", "+sd", "+r", "-aec", "AIWORKER", "127.0.0.1", str(node.port),
                     study.dicom_dir)
        assert sent.returncode == 0, sent.stdout
        wait_until(lambda: node.sql("SELECT 1 FROM outbox WHERE destination = 'ris' AND"
                                    " state = 'sending'"), RESULT_WAIT_S,
                   "the ORU^R01 being sent")
        node.kill9()
        rows = node.sql("SELECT destination, state FROM outbox ORDER BY destination")
        assert [r["destination"] for r in rows] == ["pacs", "pacs", "ris"]
        assert rows[2]["state"] == "sending"
        assert {r["state"] for r in rows[:2]} <= {"pending", "sending"}
        orthanc.start()
        node.start()
        wait_until(lambda: len(node.sql("SELECT 1 FROM outbox WHERE state = 'sent'")) == 3,
                   60, "every row sent after the restart")
        results = orthanc_results(orthanc, study.study_uid)
    finally:
        ris.stop()
    assert set(results) == {"SEG", "SR"}
    [job] = node.sql("SELECT state, attempts, result_dir FROM jobs")
    assert (job["state"], job["attempts"]) == ("done", 1)
    assert len(node.sql("SELECT 1 FROM outbox")) == 3
    assert len(ris.messages) == 2 and ris.messages[0] == ris.messages[1]
    assert ris.messages[0] == (Path(job["result_dir"]) / "oru.hl7").read_bytes().decode()
    folder = Path(job["result_dir"])
    assert {results["SEG"].SOPInstanceUID, results["SR"].SOPInstanceUID} == {
        pydicom.dcmread(folder / name).SOPInstanceUID for name in ("seg.dcm", "sr.dcm")}
    assert "rows were being sent when the node stopped; pending again" in node.log_text()
