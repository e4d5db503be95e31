"""A real PACS pushes to the node: Debian's Orthanc forwards a study with /modalities/.../store."""

from __future__ import annotations

import pydicom
from helpers.dicom import dataset_bytes
from helpers.tools import dcmtk, needs_dcmtk, needs_orthanc

pytestmark = [needs_orthanc, needs_dcmtk]


def test_orthanc_pushes_a_study_to_the_node(node, orthanc_factory, make_study) -> None:
    orthanc = orthanc_factory({"aiworker": ["AIWORKER", "127.0.0.1", node.port]})
    study = make_study(series=3, slices=5)

    # a modality sends the study to Orthanc
    proc = dcmtk("storescu", "+sd", "+r", "-aec", "ORTHANC", "127.0.0.1",
                 str(orthanc.dicom_port), study.root)
    assert proc.returncode == 0, proc.stdout
    studies = orthanc.get("/studies?expand")
    [entry] = [s for s in studies if s["MainDicomTags"]["StudyInstanceUID"] == study.study_uid]
    assert len(orthanc.get(f"/studies/{entry['ID']}/instances")) == 15

    # and Orthanc forwards it to the node
    job = orthanc.request("POST", "/modalities/aiworker/store", entry["ID"].encode())
    assert job is not None

    status = node.wait_study_complete(study.study_uid, 20,
                                      "the forwarded study to complete on the node")
    assert status["instances"] == 15
    assert status["calling_ae"] == "ORTHANC"
    assert sorted(s["instances"] for s in status["series"]) == [5, 5, 5]
    assert {s["closed_by"] for s in status["series"]} == {"expected_count"}

    rows = node.sql("SELECT sop_uid, path, state FROM instances")
    assert {r["sop_uid"] for r in rows} == set(study.sop_uid.values())
    assert {r["state"] for r in rows} == {"stored"}
    assert len(node.spool_files()) == 15
    for source in study.files:
        stored = study.spool_path(node.data_dir, source)
        assert stored.is_file()
        sent_ds, got_ds = pydicom.dcmread(source), pydicom.dcmread(stored)
        assert got_ds.SOPInstanceUID == sent_ds.SOPInstanceUID
        assert got_ds.PixelData == sent_ds.PixelData
        # Orthanc keeps and forwards the data set unchanged, and so does the node
        assert dataset_bytes(stored) == dataset_bytes(source)
    assert "association released: calling AE ORTHANC" in node.log_text()
