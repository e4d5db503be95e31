"""The node's outbox stage: a done job's result objects are queued once per destination and
sent, against a real dcmtk ``storescp`` and a real MLLP listener on loopback; a destination
that is down keeps its rows pending, ``aiworker status --json`` shows them and ``aiworker
resend`` queues rows again.

The job is a real state DB row (a one-instance study, a selection, claimed and finished)
whose result folder holds the objects :func:`write_results` makes from a phantom's truth
labels, as the infer stage writes them into ``var/results/<job_id>/``."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from helpers.results import MANIFEST, MODEL_ID, truth_run
from helpers.tools import AIWORKER, free_port, needs_dcmtk, wait_until
from test_dispatch_outbox import StoreSCP, mllp_listener
from test_infer_e2e import send
from test_infer_worker import fake_record

from aiworker.config import Config
from aiworker.config_loader import load_config
from aiworker.dispatch.stage import OutboxStage, dicom_objects, object_options
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series
from aiworker.results.objects import write_results
from aiworker.store.db import StateDB
from aiworker.store.jobs import NewJob
from aiworker.store.layout import HL7_FILE, SC_FILE, SEG_FILE, SR_FILE, DataPaths
from aiworker.store.outbox import DEAD, PENDING, SENT, Outbox

pytestmark = needs_dcmtk



@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a job's SEG, SR, report, ORU^R01, preview and Secondary Capture (a
    phantom's truth as the prediction)."""
    root = tmp_path_factory.mktemp("objects")
    run = truth_run(root / "study", seed=53, matrix=64)
    write_results(root / "out", run.paths, run.loaded, run.labels, run.findings, MANIFEST,
                  MODEL_ID, secondary_capture=True)
    return root / "out"


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Site:
    """A data dir, its state DB and a config file naming the given destinations."""

    def __init__(self, root: Path, destinations: dict[str, dict[str, Any]],
                 send_to: list[str], outputs: list[str] | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "aiworker.yaml"
        pipeline = {"name": "knee", "rules": "config/rules/knee.yaml", "model": "knee-demo",
                    "send_to": send_to}
        if outputs is not None:
            pipeline["outputs"] = outputs
        self.config_path.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(root / "var")},
            "destinations": destinations, "pipelines": [pipeline],
            "dispatch": {"retry_base_s": 60, "timeout_s": 5, "interval_s": 0.1}}))
        self.config: Config = load_config(self.config_path, environ={})
        self.db = StateDB(DataPaths(root / "var").db)

    def done_job(self, objects: Path | None, n: int = 1) -> tuple[str, str]:
        """Record study ``2.25.n``, queue, claim and finish its job; its result folder
        holds a copy of ``objects`` (empty when None). Returns (job id, study UID)."""
        now = time.time()
        record = fake_record(n, now)
        self.db.record_instance(record)
        self.db.complete_idle(now + 5, 1)
        completed_at = next(s["completed_at"] for s in self.db.studies()
                            if s["study_uid"] == record.study_uid)
        selection = self.db.record_selection(record.study_uid, completed_at, "knee", {}, NewJob(
            "knee", "knee-demo", record.study_uid, {"sag_pd_fs": record.series_uid}))
        assert self.db.claim_job().job_id == selection.job_id
        folder = self.root / "var" / "results" / selection.job_id
        if objects is None:
            folder.mkdir(parents=True)
        else:
            shutil.copytree(objects, folder)
        assert self.db.finish_job(selection.job_id, {}, {}, "cpu", str(folder))
        return selection.job_id, record.study_uid

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([AIWORKER, *args, "--config", str(self.config_path)],
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})

    def status_outbox(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's ``outbox`` list from ``aiworker status --json``."""
        done = self.cli("status", "--json")
        assert done.returncode == 0, done.stderr
        studies = json.loads(done.stdout)["studies"]
        return next(s["outbox"] for s in studies if s["study_uid"] == study_uid)


def dicom(port: int, ae_title: str = "PACS") -> dict[str, Any]:
    return {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": ae_title}


def hl7(port: int) -> dict[str, Any]:
    return {"kind": "hl7", "host": "127.0.0.1", "port": port}


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    server = StoreSCP(tmp_path / "pacs").start()
    yield server
    server.stop()


def rows_in(outbox: Outbox, state: str) -> int:
    return sum(row.state == state for row in outbox.rows())


def test_a_done_job_reaches_the_pacs_and_the_ris_and_a_study_is_resent(tmp_path, scp,
                                                                        objects):
    server, received = mllp_listener(reject="\x00never")
    site = Site(tmp_path, {"pacs": dicom(scp.port), "ris": hl7(server.port)},
                ["pacs", "ris"])
    job_id, study_uid = site.done_job(objects)
    stage = OutboxStage(site.db, site.config, "AIWORKER")
    stage.start()
    try:
        wait_until(lambda: rows_in(stage.outbox, SENT) == 3, 30, "three rows sent")
        stage.stop()  # what follows reads the outbox as the first sends left it
        rows = stage.outbox.rows()
        assert sorted((r.destination, r.kind, r.object_kind, Path(r.path).name, r.job_id)
                      for r in rows) == [
            ("pacs", "dicom", "seg", SEG_FILE, job_id), ("pacs", "dicom", "sr", SR_FILE, job_id),
            ("ris", "hl7", "hl7", HL7_FILE, job_id)]
        assert all(r.attempts == 1 and r.last_error is None for r in rows)
        expected = sorted([sop_uid(objects / SEG_FILE), sop_uid(objects / SR_FILE)])
        assert scp.received_uids() == expected
        assert {r.sop_instance_uid for r in rows if r.kind == "dicom"} == set(expected)
        message = (objects / HL7_FILE).read_bytes().decode("utf-8")
        assert received == [message] and "|ORU^R01^ORU_R01|" in message
        assert stage.queue_done_jobs() == []  # queued once only
        queued = [e for e in site.db.events(("outbox_queued",))]
        assert [(e["study_uid"], e["detail"]) for e in queued] == [
            (study_uid, {"job_id": job_id, "rows": 3})]

        shown = site.status_outbox(study_uid)
        assert [(r["destination"], r["object_kind"], r["state"], r["attempts"])
                for r in shown] == [(r.destination, r.object_kind, SENT, 1) for r in rows]
        resent = site.cli("resend", "--study", study_uid)
        assert resent.returncode == 0, resent.stderr
        assert "3 outbox row(s) queued again" in resent.stdout
        assert rows_in(stage.outbox, PENDING) == 3
        stage = OutboxStage(site.db, site.config, "AIWORKER")
        stage.start()
        wait_until(lambda: rows_in(stage.outbox, SENT) == 3 and len(received) == 2, 30,
                   "the study sent again")
        assert scp.received_uids() == sorted(expected * 2)  # the same UIDs: PACS replaces
        assert received == [message, message]
    finally:
        stage.stop()
        server.close()
        site.db.close()


def test_rows_wait_for_the_objects_and_follow_the_pipeline_outputs(tmp_path, objects):
    site = Site(tmp_path, {"pacs": dicom(free_port()), "ris": hl7(free_port())},
                ["pacs", "ris"], outputs=["sr", "report"])
    job_id, _ = site.done_job(None)
    stage = OutboxStage(site.db, site.config, "AIWORKER")
    try:
        assert stage.queue_done_jobs() == []  # no objects written yet
        assert stage.outbox.rows() == []
        for name in (SEG_FILE, SR_FILE, HL7_FILE):
            shutil.copy(objects / name, tmp_path / "var" / "results" / job_id / name)
        assert stage.queue_done_jobs() == [job_id]
        assert [(r.destination, r.object_kind) for r in stage.outbox.rows()] == [("pacs", "sr")]
    finally:
        site.db.close()


def test_each_destination_gets_what_it_accepts(tmp_path, objects):
    """``accepts: [sr, sc]`` gets the Secondary Capture in place of the SEG; a default
    destination gets the SC only when the outputs name ``preview``; the node's object
    options ask for an SC exactly when some destination gets one."""
    viewer = dicom(free_port()) | {"accepts": ["sr", "sc"]}
    site = Site(tmp_path, {"pacs": dicom(free_port()), "viewer": viewer, "ris": hl7(free_port())},
                ["pacs", "viewer", "ris"])
    job_id, _ = site.done_job(objects)
    stage = OutboxStage(site.db, site.config, "AIWORKER")
    try:
        assert stage.queue_done_jobs() == [job_id]
        sent = sorted((r.destination, r.object_kind) for r in stage.outbox.rows())
        assert sent == [("pacs", "seg"), ("pacs", "sr"), ("ris", "hl7"), ("viewer", "sc"),
                        ("viewer", "sr")]
        sc_row = next(r for r in stage.outbox.rows() if r.object_kind == "sc")
        assert sc_row.sop_instance_uid == sop_uid(objects / SC_FILE)
    finally:
        site.db.close()
    assert object_options(site.config)["knee"]["secondary_capture"] is True
    assert object_options(site.config)["knee"]["hl7"] == site.config.hl7.model_dump()

    pacs = {"pacs": dicom(free_port())}
    plain = Site(tmp_path / "plain", pacs, ["pacs"])
    with_preview = Site(tmp_path / "preview", pacs, ["pacs"],
                        outputs=["seg", "sr", "preview"])
    pipeline, destination = plain.config.pipelines[0], plain.config.destinations["pacs"]
    assert dicom_objects(pipeline, destination) == ["seg", "sr"]
    assert object_options(plain.config)["knee"]["secondary_capture"] is False
    assert dicom_objects(with_preview.config.pipelines[0], destination) == ["seg", "sr", "sc"]
    assert object_options(with_preview.config)["knee"]["secondary_capture"] is True
    for site_ in (plain, with_preview):
        site_.db.close()


def test_a_down_destination_keeps_rows_pending_until_resent(tmp_path, objects):
    site = Site(tmp_path, {"pacs": dicom(free_port()), "ris": hl7(free_port())},
                ["pacs", "ris"])
    job_id, study_uid = site.done_job(objects)
    stage = OutboxStage(site.db, site.config, "AIWORKER")
    try:
        stage.tick()
        rows = stage.outbox.rows()
        assert [(r.state, r.attempts) for r in rows] == [(PENDING, 1)] * 3
        assert all(r.next_attempt_at > time.time() + 30 for r in rows)  # backing off
        shown = site.status_outbox(study_uid)
        assert [(r["destination"], r["object_kind"], r["state"], r["attempts"])
                for r in shown] == [("pacs", "seg", PENDING, 1), ("pacs", "sr", PENDING, 1),
                                    ("ris", "hl7", PENDING, 1)]
        assert "no association" in shown[0]["last_error"]
        assert "cannot reach" in shown[2]["last_error"]
        text = site.cli("status")
        assert "outbox pacs seg: pending, 1 attempt(s), last error: no association" \
            in text.stdout

        later = time.time() + 3600
        for name in ("pacs", "ris"):  # give up on every row, as max_age would
            claimed = stage.outbox.claim(name, later, 10)
            stage.outbox.mark_failed([r.id for r in claimed], "given up", later, permanent=True)
        assert rows_in(stage.outbox, DEAD) == 3
        by_job = site.cli("resend", job_id[:8])
        assert by_job.returncode == 0, by_job.stderr
        assert "3 outbox row(s) queued again" in by_job.stdout
        assert [(r["state"], r["attempts"]) for r in site.status_outbox(study_uid)] == [
            (PENDING, 0)] * 3
        nothing = site.cli("resend", job_id)
        assert nothing.returncode == 1
        assert f"resend: job {job_id} is done, not failed, and none of its outbox rows is " \
            "dead" in nothing.stderr

        claimed = stage.outbox.claim("ris", later, 10)
        stage.outbox.mark_failed([r.id for r in claimed], "given up", later, permanent=True)
        every = site.cli("resend", "--dead")
        assert every.returncode == 0 and "1 outbox row(s) queued again" in every.stdout
        assert rows_in(stage.outbox, PENDING) == 3
        assert site.cli("resend").returncode == 2  # one of JOB, --study, --dead
    finally:
        site.db.close()


def test_the_node_sends_a_received_study_s_results(node_factory, tmp_path, scp):
    """Through ``aiworker serve``: a study sent with storescu is selected, the knee-demo job
    writes its objects and the node's outbox delivers them; a destination that is down
    keeps its rows pending, with attempts and the last error, in ``status --json``."""
    server, received = mllp_listener(reject="\x00never")
    down = free_port()
    node = node_factory(
        destinations={"pacs": dicom(scp.port), "ris": hl7(server.port),
                      "archive": dicom(down, "ARCHIVE")},
        pipelines=[{"name": "knee", "rules": "config/rules/knee.yaml", "model": "knee-demo",
                    "send_to": ["pacs", "ris", "archive"]}],
        dispatch={"retry_base_s": 60, "timeout_s": 5, "interval_s": 0.2},
        inference={"threads": 1})
    try:
        study = write_study(tmp_path / "knee", StudyOptions(
            seed=54, rescan=False, derived=False,
            overrides=Overrides(roles=("sag_pd_fs",), matrix=64)))
        send(node, study)
        sent = wait_until(lambda: _when_three(node.sql(
            "SELECT * FROM outbox WHERE state = ?", (SENT,))), 240, "the pacs and ris rows sent")
        [job] = node.sql("SELECT * FROM jobs")
        folder = Path(job["result_dir"])
        assert scp.received_uids() == sorted([sop_uid(folder / SEG_FILE),
                                              sop_uid(folder / SR_FILE)])
        assert received == [(folder / HL7_FILE).read_bytes().decode("utf-8")]  # \r kept
        assert {(r["destination"], r["object_kind"]) for r in sent} == {
            ("pacs", "seg"), ("pacs", "sr"), ("ris", "hl7")}
        shown = wait_until(lambda: [r for r in node.study_status(study.study_uid)["outbox"]
                                    if r["destination"] == "archive" and r["attempts"]],
                           30, "the archive's failed attempts")
        assert [(r["object_kind"], r["state"], r["attempts"]) for r in shown] == [
            ("seg", PENDING, 1), ("sr", PENDING, 1)]
        assert all("no association: ARCHIVE at 127.0.0.1" in r["last_error"] for r in shown)
        log = node.log_text()
        header = pydicom.dcmread(truth_series(study).files[0], stop_before_pixels=True)
        assert f"job {job['job_id']}: 5 outbox rows queued" in log
        assert str(header.PatientName) not in log and str(header.PatientID) not in log
    finally:
        server.close()


def _when_three(rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    return rows if len(rows) == 3 else None
