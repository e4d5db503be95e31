"""A site for the web tests: a real ``aiworker serve`` with its dashboard on a free port,
a stand-in PACS (pynetdicom storage SCP) and RIS (MLLP listener) from :mod:`aiworker.demo`,
and a phantom knee study pushed to it over DICOM; plus HTTP helpers and the metric reader.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
from prometheus_client.parser import text_string_to_metric_families

from aiworker.config import Config
from aiworker.demo import Arrivals, start_pacs, start_ris
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study
from aiworker.store.db import StateDB
from aiworker.store.jobs import NewJob
from aiworker.store.outbox import NewObject, Outbox
from aiworker.store.records import InstanceRecord
from aiworker.web.app import create_app
from aiworker.web.server import WebServer
from helpers.dicom import raw_store
from helpers.node import NodeProcess, node_config
from helpers.tools import free_port, wait_until

TOKEN = "web-test-token-0123456789"
SENDER = "MODALITY"  # the only caller the site's node allows
PATIENT_NAME = "WEBTEST^PATIENT"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"  # gitignored


def knee_study(folder: Path, seed: int = 20240, roles: tuple[str, ...] = ("sag_pd_fs",
               "cor_pd_fs"), matrix: int = 128, slices: int | None = None) -> WrittenStudy:
    """A phantom knee study with a torn ACL and a known patient name (no truth files)."""
    return write_study(folder, StudyOptions(
        seed=seed, acl="torn", vendor="siemens", rescan=False, derived=False,
        descriptions="vendor", patient_name=PATIENT_NAME, truth=False,
        overrides=Overrides(roles=roles, matrix=matrix, slices=slices)))


def web_url(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.config['web']['port']}"


def client(node: NodeProcess) -> httpx.Client:
    """An HTTP client on the node's web port."""
    return httpx.Client(base_url=web_url(node), timeout=30)


def metrics(http: httpx.Client) -> dict[str, float]:
    """``/metrics`` parsed with prometheus_client's parser: sample name with its labels
    (``name{a="x",b="y"}``, labels sorted) -> value."""
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def seriesless_file(source: Path, folder: Path) -> Path:
    """A copy of ``source`` with a new SOP Instance UID and no Series Instance UID: the
    node refuses its C-STORE with 0xC211."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    del ds.SeriesInstanceUID
    target = folder / "seriesless.dcm"
    ds.save_as(target, enforce_file_format=True)
    return target


@dataclass
class Site:
    """The node, its stand-in PACS and RIS and what they received, and the study sent."""

    node: NodeProcess
    arrivals: Arrivals
    study: WrittenStudy

    @property
    def http(self) -> httpx.Client:
        return client(self.node)

    def send(self, files: list[Path] | None = None) -> list[Any]:
        """C-STORE the study's files (or ``files``) as the allowed sender."""
        return raw_store(self.node.port, files or self.study.files, calling=SENDER)

    def wait_sent(self, timeout: float = 120) -> dict[str, Any]:
        """The study from the API once its stage is ``sent`` (failing fast on failed)."""
        def sent() -> dict[str, Any] | None:
            response = self.http.get(f"/api/studies/{self.study.study_uid}")
            if response.status_code != 200:
                return None
            study = response.json()
            assert study["stage"] != "failed", study
            return study if study["stage"] == "sent" else None

        return wait_until(sent, timeout, "the study to be sent", interval=0.25)


@contextmanager
def running_site(workdir: Path, **overrides: Any) -> Iterator[Site]:
    """Start the PACS and RIS stand-ins and a node (knee pipeline, knee-demo model) whose
    dashboard takes :data:`TOKEN`; write the study (not yet sent). All are stopped after."""
    arrivals = Arrivals()
    pacs, pacs_port = start_pacs(workdir / "pacs", arrivals)
    ris = start_ris(workdir / "ris", arrivals)
    config = node_config(workdir, "web-node", {
        "node": {"allowed_callers": [{"ae_title": SENDER}]},
        "destinations": {
            "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs_port,
                     "ae_title": "DEMOPACS"},
            "ris": {"kind": "hl7", "host": "127.0.0.1", "port": ris.port}},
        "pipelines": [{"name": "knee", "rules": "config/rules/knee.yaml", "model": "knee-demo",
                       "outputs": ["seg", "sr", "report", "hl7"], "send_to": ["pacs", "ris"]}],
        "dispatch": {"interval_s": 0.2, "retry_base_s": 1, "timeout_s": 10},
        "inference": {"device": "cpu"},
        "web": {"token": TOKEN, "port": free_port()},
        **overrides})
    node = NodeProcess(workdir, "web-node", config)
    try:
        study = knee_study(workdir / "study")
        node.start()
        wait_until(lambda: _answers(node), 15, "the web port to answer")
        yield Site(node, arrivals, study)
    finally:
        node.close()
        pacs.shutdown()
        ris.close()


def _answers(node: NodeProcess) -> bool:
    try:
        return client(node).get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def save_artifact(path: Path) -> None:
    """Copy a screenshot to test-artifacts/web/ (gitignored) for a person to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, ARTIFACTS / path.name)


def wait_row(http: httpx.Client, row_id: int, predicate: Any, timeout: float = 30
             ) -> dict[str, Any]:
    """The outbox row ``row_id`` from the API once ``predicate(row)`` holds."""
    def row() -> dict[str, Any] | None:
        rows = [r for r in http.get("/api/outbox").json() if r["id"] == row_id]
        return rows[0] if rows and predicate(rows[0]) else None

    return wait_until(row, timeout, f"outbox row {row_id} to change", interval=0.1)


# --- a state DB written with the store's own calls, served in-process ---------------------

STUDY_DESCRIPTION = "MR KNEE"


def instance(study: str, series: str, sop: str, at: float, accession: str = "ACC1"
             ) -> InstanceRecord:
    """An instance record as the receiver writes it (patient data included)."""
    return InstanceRecord(
        study_uid=study, series_uid=series, sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", transfer_syntax="1.2.840.10008.1.2.1",
        path=Path(f"/spool/{sop}.dcm"), size=100, frames=1, expected_frames=None,
        acquisition_number=1, modality="MR", series_number=1, series_description="PD FS SAG",
        study_description=STUDY_DESCRIPTION, study_date="20260101", accession_number=accession,
        patient_id="PID1", patient_name=PATIENT_NAME, calling_ae=SENDER, received_at=at)


@dataclass
class Written:
    """A study the store went through: its job and outbox rows (destination -> ids)."""

    study_uid: str
    job_id: str
    rows: dict[str, list[int]]


def processed_study(db: StateDB, study: str, at: float, accession: str = "ACC1",
                    error: str | None = None, result_dir: str = "",
                    warnings: list[dict[str, Any]] | None = None) -> Written:
    """Receive two instances at ``at``, complete, select (knee), run the job (done, or
    failed with ``error``); a done job gets a SEG and an SR for ``pacs`` and an ORU for
    ``ris``, all pending. ``result_dir`` is the done job's result folder, ``warnings``
    its header warnings."""
    series = study + ".1"
    for i in range(2):
        db.record_instance(instance(study, series, f"{series}.{i}", at + i, accession))
    db.complete_idle(at + 10, 1.0)
    [(uid, completed_at, _)] = [w for w in db.awaiting_selection(["knee"]) if w[0] == study]
    job = NewJob("knee", "knee-demo", study, {"main": series})
    chosen = db.record_selection(uid, completed_at, "knee", {"chosen": {"main": series},
                                                             "series": []}, job)
    claimed = db.claim_job()
    assert claimed is not None and claimed.job_id == chosen.job_id
    if error is not None:
        db.fail_job(chosen.job_id, error, "model", {})
        return Written(study, chosen.job_id, {})
    db.finish_job(chosen.job_id, {}, {"total": 1.0}, "cpu", result_dir, warnings)
    outbox = Outbox(db)
    ids = outbox.add(chosen.job_id, study, [
        NewObject("pacs", "dicom", "seg", f"/r/{study}/seg.dcm", study + ".9.1"),
        NewObject("pacs", "dicom", "sr", f"/r/{study}/sr.dcm", study + ".9.2"),
        NewObject("ris", "hl7", "hl7", f"/r/{study}/oru.hl7")], now=at + 20)
    return Written(study, chosen.job_id, {"pacs": ids[:2], "ris": ids[2:]})


def attempt(db: StateDB, destination: str, ok: bool, now: float, error: str = "refused",
            permanent: bool = False) -> list[int]:
    """One send attempt of every due row of ``destination``: accepted or failed."""
    outbox = Outbox(db)
    ids = [r.id for r in outbox.claim(destination, now, 100)]
    if ok:
        outbox.mark_sent(ids, now)
    else:
        outbox.mark_failed(ids, error, now, permanent=permanent)
    return ids


def web_config(workdir: Path, **web: Any) -> Config:
    """The node's config with ``web`` keys on top (port free)."""
    return Config.model_validate(node_config(workdir, "dash", {"web": web}))


@contextmanager
def serving(db: StateDB, config: Config) -> Iterator[httpx.Client]:
    """The web app over ``db`` on a real socket (uvicorn in a thread); a client on it."""
    server = WebServer(create_app(db, config), "127.0.0.1", config.web.port)
    server.start()
    try:
        with httpx.Client(base_url=server.url.rstrip("/"), timeout=30) as http:
            yield http
    finally:
        server.stop()
