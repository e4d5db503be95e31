"""Inference jobs: their life in the state DB, and the infer stage running them in its own
process with a tiny TorchScript model (a threshold of the normalized image).

The DB tests use made-up rows. The worker tests record a real phantom series (32 x 32, 16
sagittal slices) in a real state DB, queue jobs for it and let one module-wide worker run
them with ``tick()``; its inference process is spawned once and replaced only where a test
kills it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml
from helpers.tools import AIWORKER, REPO
from pydicom.uid import generate_uid

from aiworker.config_loader import ConfigError, load_config
from aiworker.infer.manifest import ManifestError
from aiworker.infer.process import WorkerSettings
from aiworker.infer.registry import Registry
from aiworker.infer.run import Failure, classify_error
from aiworker.infer.stage import InferenceWorker, resolve_models
from aiworker.infer.volume import load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.select.decide import Pipeline
from aiworker.select.rules import load_rules
from aiworker.store.db import StateDB
from aiworker.store.jobs import Job, JobError, NewJob
from aiworker.store.layout import FINDINGS_FILE, LABELS_FILE
from aiworker.store.records import InstanceRecord

FEMUR = {"value": 1, "name": "Femur", "color": [230, 216, 170],
         "category": {"value": "91723000", "scheme_designator": "SCT",
                      "meaning": "Anatomical structure"},
         "type": {"value": "71341001", "scheme_designator": "SCT", "meaning": "Femur"}}
TINY: dict[str, Any] = {
    "name": "tiny", "version": "1.0.0", "format": "torchscript", "weights": "model.ts",
    "input": {"channels": ["sag_pd_fs"], "normalization": {"method": "percentile",
                                                           "lower": 1, "upper": 99}},
    "inference": {"time_limit_s": 120},
    "outputs": {"segmentation": {"labels": [FEMUR]},
                "classification": [{"name": "acl", "classes": ["intact", "torn"],
                                    "positive": "torn",
                                    "region": {"label": 1, "features": ["volume_ml"],
                                               "mean": [0.0], "scale": [1.0],
                                               "coefficients": [1.0], "intercept": 0.0}}]},
    "intended_use": "Tests only; not a medical device.",
}
STEPS = {"load", "preprocess", "model", "postprocess", "resample", "write", "total"}


class Threshold(torch.nn.Module):
    """Label 1 wherever the normalized input exceeds one half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x[:, :1], 0.5), x[:, :1]], dim=1)


def write_model(root: Path, raw: dict[str, Any], weights: bool = True,
                network: torch.nn.Module | None = None) -> None:
    """The manifest ``raw`` and (unless not ``weights``) ``network``, scripted (default
    :class:`Threshold`), into ``root/<name>``."""
    folder = root / raw["name"]
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    if weights:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(network or Threshold()), str(folder / "model.ts"))


# ------------------------------------------------------------------ the jobs table


def fake_record(n: int, received_at: float) -> InstanceRecord:
    return InstanceRecord(
        study_uid=f"2.25.{n}", series_uid=f"2.25.{n}.1", sop_uid=f"2.25.{n}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax="1.2.840.10008.1.2.1",
        path=Path(f"/nowhere/{n}.dcm"), size=1, frames=1, expected_frames=None,
        acquisition_number=1, modality="MR", series_number=1, series_description="",
        study_description="", study_date="", accession_number="", patient_id="",
        patient_name="", calling_ae="TEST", received_at=received_at)


def queue_fake_job(db: StateDB, n: int) -> str:
    """Record a one-instance study ``2.25.n``, complete it and queue a job for its series."""
    now = time.time()
    record = fake_record(n, now)
    db.record_instance(record)
    db.complete_idle(now + 5, 1)
    completed_at = next(s["completed_at"] for s in db.studies()
                        if s["study_uid"] == record.study_uid)
    selection = db.record_selection(record.study_uid, completed_at, "knee", {}, NewJob(
        "knee", "tiny", record.study_uid, {"main": record.series_uid}))
    assert selection is not None and selection.job_id is not None
    return selection.job_id


def states(db: StateDB) -> dict[str, str]:
    return {job.job_id: job.state for job in db.jobs()}


def event_kinds(db: StateDB, prefix: str = "job_") -> list[str]:
    return [e["kind"] for e in reversed(db.events(limit=1000)) if e["kind"].startswith(prefix)]


def test_claim_finish_and_fail(tmp_path):
    db = StateDB(tmp_path / "state.db")
    first, second = queue_fake_job(db, 1), queue_fake_job(db, 2)
    claimed = db.claim_job()
    assert claimed is not None and claimed.job_id == first  # the oldest first
    assert (claimed.state, claimed.attempts) == ("running", 1)
    assert claimed.started_at >= claimed.created_at
    assert db.claim_job().job_id == second
    assert db.claim_job() is None

    timings = {"load": 0.5, "model": 1.25}
    findings = {"volumes_ml": {"Femur": 250.0}}
    assert db.finish_job(first, findings, timings, "cpu", "/results/x")
    assert db.fail_job(second, "image 2.25.9 lacks a valid ImagePositionPatient", "data",
                       {"load": 0.1})
    assert not db.finish_job(first, {}, {}, "cpu", "")  # no longer running
    with pytest.raises(ValueError, match="error kind must be one of data, model, resource"):
        db.fail_job(second, "x", "disk", {})
    done, failed = db.jobs()
    assert (done.state, done.findings, done.timings, done.device,
            done.result_dir, done.error) == ("done", findings, timings, "cpu",
                                                   "/results/x", None)
    assert done.finished_at >= done.started_at
    assert (failed.state, failed.error_kind, failed.timings, failed.findings) == \
        ("failed", "data", {"load": 0.1}, None)
    assert event_kinds(db) == ["job_started", "job_started", "job_done", "job_failed"]
    [problem] = db.events(("job_failed",))
    assert problem["detail"]["reason"] == \
        "data error: image 2.25.9 lacks a valid ImagePositionPatient"
    db.close()


OLD_JOBS_TABLE = """CREATE TABLE jobs (job_id TEXT PRIMARY KEY, job_key TEXT NOT NULL UNIQUE,
    pipeline TEXT NOT NULL, model TEXT NOT NULL, study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL, inputs TEXT NOT NULL, state TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL)"""


def test_an_older_db_gains_the_job_columns(tmp_path):
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute(OLD_JOBS_TABLE)
    conn.execute("INSERT INTO jobs VALUES ('j1', 'k1', 'knee', 'tiny', '2.25.1', '2.25.1.1',"
                 " '{\"main\": \"2.25.1.1\"}', 'queued', 1.0, 1.0)")
    conn.commit()
    conn.close()
    db = StateDB(path)
    [job] = db.jobs()
    assert (job.job_id, job.attempts, job.timings, job.findings, job.error) == \
        ("j1", 0, None, None, None)
    assert db.claim_job().attempts == 1
    assert db.fail_job("j1", "out of memory", "resource", {})
    db.close()
    StateDB(path).close()  # and it opens again, with nothing left to add


def test_running_jobs_are_queued_again_at_start(tmp_path):
    db = StateDB(tmp_path / "state.db")
    job_id = queue_fake_job(db, 1)
    queue_fake_job(db, 2)
    db.claim_job()
    db.close()  # as if the node died here
    db = StateDB(tmp_path / "state.db")
    assert db.requeue_running("restart") == [job_id]
    assert set(states(db).values()) == {"queued"}
    [event] = db.events(("job_requeued",))
    assert event["detail"] == {"job_id": job_id, "model": "tiny", "reason": "restart"}
    assert db.requeue_running() == []
    assert db.claim_job().attempts == 2  # the cut-off run counts
    db.close()


def test_retry_requeues_a_failed_job_and_refuses_the_rest(tmp_path):
    db = StateDB(tmp_path / "state.db")
    for n in (1, 2, 3):
        queue_fake_job(db, n)
    failed, done, queued = (job.job_id for job in db.jobs())
    db.claim_job(), db.claim_job()
    db.fail_job(failed, "stopped after the time limit of 5 s", "resource", {"total": 5.0})
    db.finish_job(done, {}, {}, "cpu", "/r")

    with pytest.raises(JobError, match=r"is done, not failed: only a failed job can be retried"):
        db.retry_job(done[:8])
    with pytest.raises(JobError, match=r"is queued, not failed"):
        db.retry_job(queued)
    with pytest.raises(JobError, match=r"no job 'zzzz': see `aiworker status`"):
        db.retry_job("zzzz")
    with pytest.raises(JobError, match="give a job id"):
        db.retry_job("  ")

    key = next(job.job_key for job in db.jobs() if job.job_id == failed)
    before = db.retry_job(key[:10])  # a job_key prefix names it too
    assert (before.job_id, before.state, before.error_kind) == \
        (failed, "failed", "resource")
    again = next(job for job in db.jobs() if job.job_id == failed)
    assert (again.state, again.error, again.error_kind, again.attempts) == \
        ("queued", None, None, 1)
    [event] = db.events(("job_retried",))
    assert event["detail"]["error"] == "stopped after the time limit of 5 s"
    assert db.claim_job().job_id == failed
    db.close()


def test_a_prefix_of_two_jobs_is_refused(tmp_path):
    db = StateDB(tmp_path / "state.db")
    queue_fake_job(db, 1)
    queue_fake_job(db, 2)
    db.close()
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute("UPDATE jobs SET job_id = 'abc' || job_id, state = 'failed'")
    conn.commit()
    conn.close()
    db = StateDB(tmp_path / "state.db")
    with pytest.raises(JobError, match=r"'abc' names 2 jobs \(abc.*, abc.*\): give more"):
        db.retry_job("abc")
    db.close()


# ------------------------------------------------------------------ config and models


def test_inference_config_keys(tmp_path):
    path = tmp_path / "aiworker.yaml"
    path.write_text(yaml.safe_dump({"inference": {"models_dir": "/srv/models",
                                                  "time_limit_s": 30, "threads": 3}}))
    inference = load_config(path, environ={}).inference
    assert (inference.models_dir, inference.time_limit_s, inference.threads,
            inference.nice) == (Path("/srv/models"), 30.0, 3, 10)
    assert load_config(REPO / "config" / "aiworker.yaml", environ={}).inference == \
        load_config(path, environ={}).inference.model_copy(
            update={"models_dir": None, "time_limit_s": None, "threads": None})
    path.write_text(yaml.safe_dump({"inference": {"time_limit_s": 0, "threads": 0,
                                                  "nice": 20}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"AIWORKER_INFERENCE__MODELS_DIR": "[1]"})
    assert sorted(line.split(": ")[1] for line in caught.value.problems) == [
        "inference.models_dir", "inference.nice", "inference.threads",
        "inference.time_limit_s"]


def knee_pipeline(model: str) -> Pipeline:
    return Pipeline("knee", model, load_rules(REPO / "config" / "rules" / "knee.yaml"))


def test_every_model_problem_is_one_line(tmp_path):
    write_model(tmp_path, TINY)
    write_model(tmp_path, TINY | {"name": "two-channels",
                                  "input": {"channels": ["sag_pd_fs", "cor_pd_fs"]}})
    with pytest.raises(ManifestError) as caught:
        resolve_models([knee_pipeline("tiny"), knee_pipeline("missing"),
                        knee_pipeline("two-channels")], tmp_path)
    assert caught.value.problems[0].startswith(
        "pipelines.1.model (knee): model 'missing' not found (available: ")
    assert caught.value.problems[1] == (
        "pipelines.2.model (knee): two-channels@1.0.0 reads 2 series (sag_pd_fs, cor_pd_fs) "
        "but the pipeline's roles are main")
    assert len(caught.value.problems) == 2

    write_model(tmp_path, TINY | {"name": "bad", "format": "onnx"})
    with pytest.raises(ManifestError) as caught:
        resolve_models([knee_pipeline("tiny")], tmp_path)
    assert caught.value.problems[0].startswith(f"{tmp_path / 'bad' / 'model.yaml'}: format: ")
    with pytest.raises(ManifestError, match="^inference.models_dir: .*not a folder"):
        resolve_models([knee_pipeline("tiny")], tmp_path / "nowhere")


def test_errors_are_classified():
    from aiworker.infer.engine import ResourceError
    from aiworker.infer.manifest import ModelError
    from aiworker.infer.volume import VolumeError

    assert classify_error(VolumeError("slices not parallel")) == \
        Failure("data", "slices not parallel")
    assert classify_error(ModelError("weights do not fit")).kind == "model"
    assert classify_error(ResourceError("out of GPU memory on cuda:0")).kind == "resource"
    assert classify_error(MemoryError()).kind == "resource"
    assert classify_error(RuntimeError("bad shape\nmore")) == \
        Failure("model", "RuntimeError: bad shape")
    assert classify_error(OSError(28, "No space left on device")) == \
        Failure("resource", "disk full: [Errno 28] No space left on device")


# ------------------------------------------------------------------ the worker


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The files of a small sagittal PD FS series."""
    study = write_study(tmp_path_factory.mktemp("phantom"), StudyOptions(
        seed=11, vendor="siemens", rescan=False, derived=False, truth=False,
        volume_spacing=3.0, overrides=Overrides(roles=("sag_pd_fs",), matrix=32, slices=16)))
    return study.files


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("node")


@pytest.fixture(scope="module")
def db(node_dir: Path) -> Iterator[StateDB]:
    database = StateDB(node_dir / "state.db")
    yield database
    database.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The models ``tiny`` and ``broken`` (its weights missing)."""
    models_dir = tmp_path_factory.mktemp("models")
    write_model(models_dir, TINY)
    write_model(models_dir, TINY | {"name": "broken"}, weights=False)
    return Registry(models_dir, bundled_dir=models_dir / "none")


@pytest.fixture(scope="module")
def worker(db: StateDB, node_dir: Path, registry: Registry) -> Iterator[InferenceWorker]:
    """An inference worker with the models ``tiny`` and ``broken``, driven by the tests
    through ``tick()``."""
    settings = WorkerSettings(models={"tiny": registry.get("tiny"),
                                      "broken": registry.get("broken")},
                              results_dir=node_dir / "results", device="cpu", threads=1)
    inferrer = InferenceWorker(db, settings)
    yield inferrer
    inferrer.stop()


@pytest.fixture
def series(phantom: list[Path], tmp_path: Path) -> Callable[..., list[Path]]:
    """``series(edit=None)``: a copy of the phantom series as a new study (new UIDs), each
    data set passed through ``edit`` first."""
    count = iter(range(1000))

    def copy(edit: Callable[[pydicom.Dataset], None] | None = None) -> list[Path]:
        folder = tmp_path / f"series-{next(count)}"
        folder.mkdir()
        study_uid, series_uid = generate_uid(), generate_uid()
        paths = []
        for path in phantom:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if edit:
                edit(ds)
            paths.append(folder / path.name)
            ds.save_as(paths[-1])
        return paths

    return copy


def queue(db: StateDB, paths: list[Path], model: str = "tiny") -> str:
    """Record ``paths`` as a received study, complete it, and queue a job on its series."""
    now = time.time()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        db.record_instance(InstanceRecord.from_dataset(
            ds, path=path, size=path.stat().st_size, calling_ae="TEST", received_at=now,
            transfer_syntax=ds.file_meta.TransferSyntaxUID))
    db.complete_idle(now + 5, 1)
    study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    completed_at = next(s["completed_at"] for s in db.studies() if s["study_uid"] == study_uid)
    record = db.record_selection(study_uid, completed_at, "knee", {"reason": "test"},
                                 NewJob("knee", model, study_uid, {"main": series_uid}))
    assert record is not None and record.job_id is not None
    return record.job_id


def job(db: StateDB, job_id: str) -> Job:
    return next(j for j in db.jobs() if j.job_id == job_id)


def run_next(worker: InferenceWorker) -> None:
    assert worker.tick(), "no queued job"


def test_a_job_runs_to_done_with_findings_timings_and_files(worker, db, series):
    paths = series()
    job_id = queue(db, paths)
    run_next(worker)
    done = job(db, job_id)
    assert done.state == "done", done.error
    assert (done.device, done.attempts, done.error_kind) == ("cpu", 1, None)
    assert set(done.timings) == STEPS
    assert all(seconds >= 0 for seconds in done.timings.values())
    loaded = load_series(paths)
    findings = done.findings
    assert findings["model"] == "tiny@1.0.0" and findings["series_uid"] == loaded.series_uid
    assert set(findings["volumes_ml"]) == {"Femur"} and findings["volumes_ml"]["Femur"] > 0
    acl = findings["classification"]["acl"]
    assert acl["decision"] in ("intact", "torn") and 0 <= acl["probability"] <= 1

    folder = Path(done.result_dir)
    assert folder == worker.settings.results_dir / job_id
    assert json.loads((folder / FINDINGS_FILE).read_text()) == findings
    labels = sitk.ReadImage(str(folder / LABELS_FILE))
    assert labels.GetSize() == loaded.image.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), loaded.image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetSpacing(), loaded.image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(labels.GetDirection(), loaded.image.GetDirection(), atol=1e-6)
    femur = sitk.GetArrayFromImage(labels) == 1
    voxel_ml = np.prod(loaded.image.GetSpacing()) / 1000
    assert femur.sum() * voxel_ml == pytest.approx(findings["volumes_ml"]["Femur"], abs=0.01)
    assert sorted(os.listdir(folder)) == [FINDINGS_FILE, LABELS_FILE]  # no partial files

    kinds = [(e["kind"], e["detail"]["job_id"]) for e in db.events(("job_started", "job_done"))]
    assert kinds == [("job_done", job_id), ("job_started", job_id)]


def write_objects_or_refuse(folder: Path, source_paths: list[str], loaded: Any,
                            labels: np.ndarray, *rest: Any) -> dict[str, float]:
    """The node's ``write_objects`` hook, given labels of one slice (which no SEG can be
    made of) when the series is described "refuse"."""
    from aiworker.results.objects import write_job_objects

    if pydicom.dcmread(source_paths[0], stop_before_pixels=True).SeriesDescription == "refuse":
        labels = labels[:1]
    return write_job_objects(folder, source_paths, loaded, labels, *rest)


def test_the_write_objects_hook_writes_a_done_jobs_objects(db, node_dir, registry, series):
    """A worker naming a ``write_objects`` hook: a done job's folder also holds its SEG, SR,
    report, ORU^R01, preview and (as the pipeline's options ask) Secondary Capture, timed,
    with the pipeline's HL7 settings; objects the labels cannot make fail the job as
    ``data``."""
    from aiworker.results.uids import result_uid
    from aiworker.store.layout import (
        HL7_FILE,
        PREVIEW_FILE,
        REPORT_FILE,
        SC_FILE,
        SEG_FILE,
        SR_FILE,
        WARNINGS_FILE,
    )

    options = {"knee": {"secondary_capture": True, "hl7": {"sending_application": "KNEEAI"}}}
    settings = WorkerSettings(models={"tiny": registry.get("tiny")},
                              results_dir=node_dir / "results", device="cpu", threads=1,
                              write_objects=write_objects_or_refuse,
                              object_options=options)
    inferrer = InferenceWorker(db, settings)
    try:
        paths = series()
        done_id = queue(db, paths)
        run_next(inferrer)
        refused_id = queue(db, series(edit=lambda ds: setattr(ds, "SeriesDescription",
                                                              "refuse")))
        run_next(inferrer)
    finally:
        inferrer.stop()
    done = job(db, done_id)
    assert done.state == "done", done.error
    assert set(done.timings) == STEPS | {"seg", "sr", "report", "hl7", "preview"}
    folder = Path(done.result_dir)
    assert sorted(os.listdir(folder)) == sorted(
        [FINDINGS_FILE, LABELS_FILE, SEG_FILE, SR_FILE, REPORT_FILE, HL7_FILE, PREVIEW_FILE,
         SC_FILE, WARNINGS_FILE])
    assert json.loads((folder / WARNINGS_FILE).read_text()) == []  # the phantom is clean
    assert done.warnings == []  # recorded on the job from that file
    assert (folder / HL7_FILE).read_bytes().decode().split("|")[2] == "KNEEAI"
    assert pydicom.dcmread(folder / SC_FILE).SOPInstanceUID == result_uid(
        load_series(paths).series_uid, "tiny@1.0.0", "sc", "sop")
    seg = pydicom.dcmread(folder / SEG_FILE)
    series_uid = load_series(paths).series_uid
    assert seg.SOPInstanceUID == result_uid(series_uid, "tiny@1.0.0", "seg")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid

    refused = job(db, refused_id)
    assert (refused.state, refused.error_kind) == ("failed", "data")
    assert refused.error == ("the result objects cannot be made: SegError: labels have 1 "
                                "slices, the series 16")
    assert {"write", "total"} <= set(refused.timings)


def test_a_series_without_positions_fails_as_data(worker, db, series):
    job_id = queue(db, series(edit=lambda ds: delattr(ds, "ImagePositionPatient")))
    run_next(worker)
    failed = job(db, job_id)
    assert (failed.state, failed.error_kind) == ("failed", "data")
    assert "lacks a valid ImagePositionPatient" in failed.error
    assert set(failed.timings) == {"total"}  # it failed while loading
    assert failed.result_dir is None


def test_a_model_that_cannot_load_fails_its_jobs_as_model(worker, db, series):
    job_id = queue(db, series(), model="broken")
    run_next(worker)
    failed = job(db, job_id)
    assert (failed.state, failed.error_kind) == ("failed", "model")
    assert failed.error.startswith("broken@1.0.0: weights file ") and \
        failed.error.endswith("model.ts is missing")


def test_the_time_limit_stops_a_job_and_a_fresh_process_takes_the_next(worker, db, series,
                                                                          node_dir):
    first = queue(db, series())
    run_next(worker)  # the process is up and its model loaded once this job is done
    old_pid = worker.process.pid
    slow = queue(db, series())
    worker.time_limit_s = 0.001
    try:
        run_next(worker)
    finally:
        worker.time_limit_s = None
    stopped = job(db, slow)
    assert (stopped.state, stopped.error_kind, stopped.error) == \
        ("failed", "resource", "stopped after the time limit of 0.001 s")
    assert worker.process.pid != old_pid and not _alive(old_pid)

    after = queue(db, series())
    run_next(worker)
    assert job(db, after).state == "done"
    assert job(db, first).state == "done"

    config = node_dir / "aiworker.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(node_dir)}}))
    proc = cli("retry", slow[:8], "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert f"job {slow} " in proc.stdout and "queued again after 1 attempt(s)" in proc.stdout
    assert "it had failed (resource): stopped after the time limit of 0.001 s" in proc.stdout
    run_next(worker)
    retried = job(db, slow)
    assert (retried.state, retried.attempts, retried.error) == ("done", 2, None)
    again = cli("resend", slow, "--config", str(config))
    assert again.returncode == 1
    assert f"resend: job {slow} is done, not failed" in again.stderr
    unknown = cli("retry", "feedbeef", "--config", str(config))
    assert (unknown.returncode, unknown.stderr.strip()) == \
        (1, "retry: no job 'feedbeef': see `aiworker status` for job ids")


def test_a_dead_process_fails_its_job_as_resource_and_is_replaced(worker, db, series):
    queue(db, series())
    run_next(worker)  # the process is up
    os.kill(worker.process.pid, signal.SIGKILL)
    time.sleep(0.2)
    job_id = queue(db, series())
    run_next(worker)
    failed = job(db, job_id)
    assert (failed.state, failed.error_kind) == ("failed", "resource")
    assert failed.error == ("the inference process was killed by SIGKILL "
                               "(the out-of-memory killer?)")
    following = queue(db, series())
    run_next(worker)
    assert job(db, following).state == "done"


def test_status_shows_the_jobs(worker, db, node_dir, series):
    queue(db, series())
    queue(db, series(edit=lambda ds: delattr(ds, "ImagePositionPatient")))
    run_next(worker)
    run_next(worker)
    config = node_dir / "aiworker.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(node_dir)}}))
    proc = cli("status", "--json", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    jobs = [j for study in json.loads(proc.stdout)["studies"]
            for j in study["selection"]["knee"]["jobs"]]
    assert jobs, "no jobs in status"
    by_id = {j["job_id"]: j for j in jobs}
    for row in db.jobs():
        shown = by_id[row.job_id]
        assert (shown["state"], shown["error_kind"], shown["error"], shown["findings"],
                shown["timings"], shown["device"], shown["attempts"], shown["result_dir"]) == \
            (row.state, row.error_kind, row.error, row.findings, row.timings,
             row.device, row.attempts, row.result_dir)
    assert any(j["state"] == "done" and j["findings"]["volumes_ml"]["Femur"] > 0 for j in jobs)
    table = cli("status", "--config", str(config)).stdout
    assert "data error: image " in table and "lacks a valid ImagePositionPatient" in table
    assert "(queue it again: aiworker retry " in table
    assert "Femur " in table and " mL; acl " in table


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
    return subprocess.run([AIWORKER, *args], capture_output=True, text=True, timeout=60,
                          env=env | {"COLUMNS": "200"})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_ends_the_process_and_requeues_a_running_job(registry, phantom, tmp_path):
    """A worker of its own, stopped while its inference process loads: the claimed job is
    queued again and no process is left."""
    settings = WorkerSettings(models={"tiny": registry.get("tiny")},
                              results_dir=tmp_path / "results", device="cpu", threads=1)
    own_db = StateDB(tmp_path / "state.db")
    copied = tmp_path / "files"
    shutil.copytree(phantom[0].parent, copied)
    job_id = queue(own_db, sorted(copied.iterdir()))
    inferrer = InferenceWorker(own_db, settings, interval=0.05)
    inferrer.start()
    deadline = time.monotonic() + 30
    while job(own_db, job_id).state != "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    process = inferrer.process
    assert job(own_db, job_id).state == "running"
    inferrer.stop()
    assert job(own_db, job_id).state == "queued"
    assert process is not None and not process.process.is_alive()
    assert [e["detail"]["reason"] for e in own_db.events(("job_requeued",))] == ["node stopped"]
    own_db.close()


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` (skips the test where none can be mounted:
    it takes root)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small disk (tmpfs) here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` up to its last byte; the file that holds the space."""
    filler = disk / "filler"
    with open(filler, "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
    return filler


def test_a_full_disk_fails_a_job_as_resource_and_it_runs_again_once_there_is_room(
        db, registry, series, tmp_path):
    with small_disk(tmp_path / "results", "4m") as disk:
        settings = WorkerSettings(models={"tiny": registry.get("tiny")}, results_dir=disk,
                                  device="cpu", threads=1, min_free_mb=0)
        inferrer = InferenceWorker(db, settings)
        inferrer.disk_check_s = 0
        try:
            job_id = queue(db, series())
            filler = fill(disk)
            run_next(inferrer)
            failed = job(db, job_id)
            assert (failed.state, failed.error_kind) == ("failed", "resource")
            assert failed.error.startswith("disk full: [Errno 28] ")
            result = disk / job_id
            assert not (result / FINDINGS_FILE).exists()  # only whole files get their names

            filler.unlink()
            run_next(inferrer)  # queued again now that there is room, and run
            done = job(db, job_id)
            assert (done.state, done.attempts) == ("done", 2)
            assert sitk.ReadImage(str(result / LABELS_FILE)).GetSize()[2] == 16
            [retried] = db.events(("job_retried",))[:1]
            assert retried["detail"]["error"] == failed.error

            inferrer.settings = replace(settings, min_free_mb=2)  # 4 MB disk, 3+ MB full
            fill(disk)
            waiting = queue(db, series())
            assert not inferrer.tick()  # below the floor: nothing is claimed
            assert job(db, waiting).state == "queued"
        finally:
            inferrer.stop()


def test_a_job_whose_outcome_cannot_be_recorded_runs_again(worker, db, series, monkeypatch):
    """The state refuses the job's outcome (its disk full, say): the job is not left
    ``running`` for ever; the next tick queues it again and runs it."""
    while worker.tick():  # the jobs earlier tests left queued run first
        pass
    job_id = queue(db, series())
    record = db.finish_job

    def full(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(db, "finish_job", record)  # the disk has room again
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(db, "finish_job", full)
    with pytest.raises(sqlite3.OperationalError):
        worker.tick()
    assert job(db, job_id).state == "running"
    for _ in range(3):
        if job(db, job_id).state == "done":
            break
        worker.tick()
    assert (job(db, job_id).state, job(db, job_id).attempts) == ("done", 2)
    assert "job_requeued" in event_kinds(db)
