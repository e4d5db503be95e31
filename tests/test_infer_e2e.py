"""End to end through the running node: a study sent with dcmtk's storescu is selected, its
job runs in the inference process, and ``aiworker status --json`` shows the findings.

The bundled knee-demo runs on a phantom knee study and its labels are checked against the
phantom's truth; a tiny site model (a threshold, see test_infer_worker.py) checks what does
not depend on the model: a job cut off by a crash runs again after the restart, and a
pipeline naming an unknown model stops the node at start.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
import pytest
import SimpleITK as sitk
from helpers.infer import Busy
from helpers.tools import dcmtk, needs_dcmtk, wait_until
from test_infer_worker import TINY, write_model

from aiworker.infer.registry import BUNDLED_MODELS
from aiworker.infer.volume import load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study
from aiworker.phantom.truth import truth_series
from aiworker.results.hl7 import ACL_CODES
from aiworker.results.report import DISCLAIMER
from aiworker.results.sr import ABSENT, FINDING_CODES, PRESENT
from aiworker.results.uids import result_uid
from aiworker.store.layout import (
    FINDINGS_FILE,
    HL7_FILE,
    LABELS_FILE,
    REPORT_FILE,
    SEG_FILE,
    SR_FILE,
)

KNEE_DEMO = BUNDLED_MODELS / "knee_demo" / "model.yaml"
needs_knee_demo = pytest.mark.skipif(
    not KNEE_DEMO.exists(),
    reason=f"the bundled model knee-demo is not trained yet ({KNEE_DEMO} is missing): "
           "python -m aiworker.models.knee_demo.train")
STEPS = {"load", "preprocess", "model", "postprocess", "resample", "write", "seg", "sr",
         "report", "hl7", "preview", "total"}  # the node's jobs also write their result objects
HELD_OUT_SEED = 900_007  # knee-demo never saw it (aiworker.models.knee_demo.data)


def send(node, study: WrittenStudy) -> None:
    proc = dcmtk("storescu", "+sd", "+r", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                 study.dicom_dir, timeout=120)
    assert proc.returncode == 0, proc.stdout


def wait_for_job(node, state: str, timeout: float) -> dict[str, Any]:
    """The node's only job once it is in ``state`` (failing fast if it fails instead)."""
    def reached() -> dict[str, Any] | None:
        rows = node.sql("SELECT * FROM jobs")
        if rows and rows[0]["state"] == "failed" and state != "failed":
            pytest.fail(f"the job failed: {rows[0]['error_kind']}: {rows[0]['error']}")
        return rows[0] if rows and rows[0]["state"] == state else None

    return wait_until(reached, timeout, f"the job to be {state}", interval=0.1)


def status_job(node, study_uid: str) -> dict[str, Any]:
    [job] = node.study_status(study_uid)["selection"]["knee"]["jobs"]
    return job


def tiny_node(node_factory, tmp_path: Path, **overrides: Any):
    """A node whose knee pipeline runs the tiny model from a site models_dir."""
    if not (tmp_path / "models" / "tiny").exists():
        write_model(tmp_path / "models", TINY)
    return node_factory(
        pipelines=[{"name": "knee", "rules": "config/rules/knee.yaml", "model": "tiny"}],
        inference={"models_dir": str(tmp_path / "models"), "threads": 1}, **overrides)


@needs_dcmtk
@needs_knee_demo
def test_knee_demo_segments_a_sent_study(node, tmp_path):
    study = write_study(tmp_path / "knee", StudyOptions(
        seed=HELD_OUT_SEED, rescan=False, derived=False,
        overrides=Overrides(roles=("localizer", "sag_pd_fs", "cor_pd_fs", "sag_t1"))))
    target = truth_series(study)
    send(node, study)
    row = wait_for_job(node, "done", 240)
    assert row["series_uid"] == target.uid

    job = status_job(node, study.study_uid)
    assert (job["state"], job["model"], job["error"], job["attempts"]) == \
        ("done", "knee-demo", None, 1)
    assert job["device"] in ("cpu", "cuda") and set(job["timings"]) == STEPS
    findings = job["findings"]
    assert findings["model"].startswith("knee-demo@")
    assert findings["series_uid"] == target.uid
    truth_image = sitk.ReadImage(str(study.truth.labels))
    truth = sitk.GetArrayFromImage(truth_image)
    voxel_ml = float(np.prod(truth_image.GetSpacing())) / 1000
    volumes = findings["volumes_ml"]
    assert len(volumes) == 11 and volumes["Femur"] > 100
    for value, name in enumerate(volumes, start=1):  # the manifest's label order
        expected = float((truth == value).sum()) * voxel_ml
        assert abs(volumes[name] - expected) <= max(0.5, 0.3 * expected), \
            f"{name}: {volumes[name]} mL, truth {expected:.2f} mL"
    acl = findings["classification"]["acl"]
    assert acl["features"], "the measurements the decision was made from"
    # this case's ACL is torn; the model is sure of it (p > 0.99 when this was written)
    assert study.case.acl_torn and (acl["decision"], acl["probability"] > 0.8) == ("torn", True)

    folder = Path(job["result_dir"])
    assert json.loads((folder / FINDINGS_FILE).read_text()) == findings
    labels_image = sitk.ReadImage(str(folder / LABELS_FILE))
    source = load_series(target.files).image
    assert labels_image.GetSize() == source.GetSize() == truth_image.GetSize()
    np.testing.assert_allclose(labels_image.GetOrigin(), source.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(labels_image.GetSpacing(), source.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(labels_image.GetDirection(), source.GetDirection(), atol=1e-5)
    labels = sitk.GetArrayFromImage(labels_image)
    femur, femur_truth = labels == 1, truth == 1
    dice = 2 * int((femur & femur_truth).sum()) / int(femur.sum() + femur_truth.sum())
    assert dice >= 0.85, f"femur Dice {dice:.3f}"
    check_result_objects(folder, target, findings)

    table = node.cli("status", "--config", str(node.config_path)).stdout
    assert f"job {job['job_id'][:8]} done: knee-demo on {job['device']} in " in table
    refused = node.cli("retry", job["job_id"][:8], "--config", str(node.config_path))
    assert refused.returncode == 1 and "is done, not failed" in refused.stderr
    header = pydicom.dcmread(target.files[0], stop_before_pixels=True)
    log = node.log_text()
    assert f"job {job['job_id']} done: model {findings['model']}" in log
    assert str(header.PatientName) not in log and str(header.PatientID) not in log


def check_result_objects(folder: Path, target: Any, findings: dict[str, Any]) -> None:
    """The job's folder holds its SEG (of the selected series, with the deterministic UID),
    SR, report and ORU^R01, whose ACL finding is the job's decision."""
    seg = pydicom.dcmread(folder / SEG_FILE)
    assert seg.SOPInstanceUID == result_uid(target.uid, findings["model"], "seg")
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == target.uid
    sources = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
               for path in target.files}
    assert {item.ReferencedSOPInstanceUID
            for item in referenced.ReferencedInstanceSequence} <= sources
    sr = pydicom.dcmread(folder / SR_FILE)
    assert sr.SOPInstanceUID == result_uid(target.uid, findings["model"], "sr")
    torn = findings["classification"]["acl"]["decision"] == "torn"
    [finding] = [item.ConceptCodeSequence[0].CodeValue for item in content_items(sr)
                 if "ConceptNameCodeSequence" in item and "ConceptCodeSequence" in item
                 and item.ConceptNameCodeSequence[0].CodeValue == FINDING_CODES["acl"].value]
    assert finding == (PRESENT if torn else ABSENT).value
    assert DISCLAIMER in (folder / REPORT_FILE).read_text()
    segments = (folder / HL7_FILE).read_bytes().decode("utf-8").split("\r")
    [acl] = [segment.split("|")[5].split("^")[0] for segment in segments
             if segment.startswith("OBX|") and segment.split("|")[3].startswith("ACL^")]
    assert acl == ACL_CODES[findings["classification"]["acl"]["decision"]][0]


def content_items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


@needs_dcmtk
def test_a_job_cut_off_by_a_crash_runs_after_the_restart(node_factory, tmp_path):
    write_model(tmp_path / "models", TINY, network=Busy())  # seconds a job: caught running
    node = tiny_node(node_factory, tmp_path)
    study = write_study(tmp_path / "small", StudyOptions(
        seed=311, vendor="ge", rescan=False, derived=False, truth=False, volume_spacing=3.0,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=32, slices=16)))
    send(node, study)
    wait_for_job(node, "running", 30)
    serve = psutil.Process(node.proc.pid)
    children = wait_until(lambda: [p for p in serve.children(recursive=True)
                                   if "spawn_main" in " ".join(p.cmdline())], 30,
                          "the inference process")
    node.kill9()
    assert node.sql("SELECT state FROM jobs") == [{"state": "running"}]
    # the inference process (and multiprocessing's resource tracker) die with the node
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [] and len(gone) == len(children) >= 1

    node.start()
    node.wait_for_log("were running when the node stopped; queued again", timeout=15)
    wait_for_job(node, "done", 60)
    job = status_job(node, study.study_uid)
    assert (job["state"], job["attempts"], job["device"]) == ("done", 2, "cpu")
    assert job["findings"]["volumes_ml"]["Femur"] > 0
    assert Path(job["result_dir"], LABELS_FILE).is_file()
    [requeued] = node.events("job_requeued")
    assert requeued["detail"] == {"job_id": job["job_id"], "model": "tiny",
                                  "reason": "restart"}
    log = node.log_text()
    assert f"job {job['job_id']} done: model tiny@1.0.0 on cpu, load " in log
    node.stop()
    assert "queued again" not in node.log_text().split("stopping")[-1]  # nothing cut off


def test_a_second_node_on_the_same_data_folder_stops_naming_the_first(node_factory, tmp_path):
    first = tiny_node(node_factory, tmp_path)
    second = node_factory("second", start=False, storage={"data_dir": str(first.data_dir)})
    with pytest.raises(RuntimeError, match="exited with 1"):
        second.start()
    [line] = [line for line in second.log_text().splitlines() if "in use" in line]
    assert line.endswith(f"the data folder {first.data_dir} is in use by aiworker serve "
                         f"--config {first.config_path} (pid {first.proc.pid} on "
                         f"{socket.gethostname()}, started {_lock_started(first)}); stop it, "
                         "or give this node its own storage.data_dir")
    assert first.running and first.cli("status", "--config", str(first.config_path)
                                        ).returncode == 0
    first.stop()
    second.start()  # the folder is free once the first has stopped
    assert second.running


def _lock_started(node) -> str:
    return json.loads((node.data_dir / "aiworker.lock").read_text())["started"]


def test_an_unknown_model_stops_the_node_with_one_line_per_problem(node_factory, tmp_path):
    write_model(tmp_path / "models", TINY | {"name": "bad", "format": "onnx"})
    node = node_factory(start=False, inference={"models_dir": str(tmp_path / "models")},
                        pipelines=[{"name": "knee", "rules": "config/rules/knee.yaml",
                                    "model": "nope"}])
    with pytest.raises(RuntimeError, match="exited with 2"):
        node.start()
    problems = [line.split("model error: ", 1)[1] for line in node.log_text().splitlines()
                if "model error: " in line]
    [problem] = problems
    assert problem.startswith(f"{tmp_path / 'models' / 'bad' / 'model.yaml'}: format: ")
    assert "'onnx'" in problem
    (tmp_path / "models" / "bad" / "model.yaml").unlink()
    node.log_path.unlink()
    with pytest.raises(RuntimeError, match="exited with 2"):
        node.start()
    [line] = [line for line in node.log_text().splitlines() if "model error: " in line]
    assert line.split("model error: ", 1)[1].startswith(
        "pipelines.0.model (knee): model 'nope' not found (available: ")
