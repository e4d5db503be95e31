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
from support import NodeProcess, free_port, node_config, raw_store, wait_until

from aiworker.demo import Arrivals, start_pacs, start_ris
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study

TOKEN = "web-test-token-0123456789"
SENDER = "MODALITY"  # the only caller the site's node allows
PATIENT_NAME = "WEBTEST^PATIENT"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"  # gitignored


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
