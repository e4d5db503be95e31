"""DICOMweb: results out by STOW-RS to a real Orthanc with its DICOMweb plugin, and
instances in by STOW-RS to the node's web server.

Sending runs the outbox's dispatcher on a fake clock over a state DB that holds the source
study (stored through the receive path, so ``aiworker status --json`` shows it): objects
read back from Orthanc's REST API equal what the node wrote, an Orthanc that is down is
retried and gets them once it is back, a 4xx answer and wrong credentials are dead at the
first attempt with the reason in ``status --json``. Receiving drives a real node: a phantom
series over STOW-RS is on disk, recorded, complete and selected; a truncated part is
refused in the answer and not stored; the node's bearer token is checked.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import yaml
from dicomweb_client.api import DICOMwebClient
from helpers.dicom import dataset_bytes
from helpers.node import NodeProcess, node_config, running_node
from helpers.orthanc import OrthancProcess
from helpers.results import MANIFEST, MODEL_ID, truth_run
from helpers.tools import AIWORKER, ORTHANC, ORTHANC_MISSING, free_port, port_open, wait_until
from pydicom.dataset import Dataset

from aiworker.config import DicomWebDestination
from aiworker.config_loader import ConfigError, load_config
from aiworker.dispatch.dicomweb import (
    bearer_header,
    send_dicomweb,
    session_for,
    stow_outcomes,
)
from aiworker.dispatch.outbox import DEAD, RETRY, SENT, Dispatcher, default_senders
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.receive.instances import InstanceStore
from aiworker.results.objects import write_results
from aiworker.store.db import StateDB
from aiworker.store.layout import DataPaths
from aiworker.store.outbox import NewObject, Outbox, RetryPolicy
from aiworker.store.spool import Spool
from aiworker.web.stow import split_file

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PASSWORD, WRONG = "orthanc-s3cret", "not-the-password"
TOKEN = "stow-token-0123456789"
POLICY = RetryPolicy(base_s=5, cap_s=60, jitter=0.0, max_age_s=3600)

needs_dicomweb_orthanc = pytest.mark.skipif(
    ORTHANC is None or not PLUGIN.exists(),
    reason=ORTHANC_MISSING if ORTHANC is None else
    "Orthanc's DICOMweb plugin not installed: apt-get install orthanc-dicomweb")


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def dicomweb_orthanc(folder: Path) -> OrthancProcess:
    """Orthanc with its DICOMweb plugin at /dicom-web and basic auth (user ``aiworker``)."""
    folder.mkdir(parents=True, exist_ok=True)
    return OrthancProcess(folder, {}, {
        "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True, "RegisteredUsers": {"aiworker": PASSWORD}})


def crash(orthanc: OrthancProcess) -> None:
    """Stop Orthanc at once (SIGKILL: a crashed PACS; its SIGTERM takes 3.5 s here)."""
    if orthanc.proc.poll() is None:
        orthanc.proc.kill()
        orthanc.proc.wait(10)


def destination(orthanc: OrthancProcess, path: str = "/dicom-web", **extra: Any
                ) -> DicomWebDestination:
    settings = {"kind": "dicomweb", "url": f"http://127.0.0.1:{orthanc.http_port}{path}",
                "auth": "basic", "username": "aiworker", "password_env": "ORTHANC_PASSWORD",
                "connect_timeout_s": 2, "read_timeout_s": 10} | extra
    return DicomWebDestination(**settings)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A torn-ACL phantom's sagittal PD FS and the SEG, SR and SC of a run on it."""
    root = tmp_path_factory.mktemp("dicomweb-results")
    run = truth_run(root / "phantom", seed=17, matrix=64)
    files = write_results(root / "results", run.paths, run.loaded, run.labels, run.findings,
                          MANIFEST, MODEL_ID, secondary_capture=True)
    return run, files


@pytest.fixture
def state(tmp_path: Path, results: Any) -> Iterator[tuple[StateDB, Path]]:
    """A state DB (and its node config file) holding the source study, stored through the
    receive path, so ``status --json`` lists the study and its outbox rows."""
    run, _files = results
    config = node_config(tmp_path, "sender")
    paths = DataPaths(Path(config["storage"]["data_dir"]))
    db = StateDB(paths.db)
    store = InstanceStore(Spool(paths.spool), db, 0, 2)
    for path in run.paths:
        sop_class, sop_uid, syntax, data_set = split_file(path.read_bytes())
        store.store(sop_class, sop_uid, syntax, data_set, "MODALITY")
    store.close()
    config_path = tmp_path / "sender.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    yield db, config_path
    db.close()


def queue(db: StateDB, study_uid: str, objects: dict[str, Path], *names: str,
          now: float = Clock().t) -> None:
    """One job's rows: each object to each destination ``names``, added at ``now``."""
    Outbox(db).add("job-1", study_uid, [
        NewObject(name, "dicomweb", kind, str(path),
                  str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        for name in names for kind, path in objects.items()], now=now)


def orthanc_instance(orthanc: OrthancProcess, sop_uid: str) -> Dataset | None:
    """The instance Orthanc holds under ``sop_uid``, read back over its REST API."""
    found = orthanc.request("POST", "/tools/lookup", sop_uid.encode(), timeout=5)
    if not found:
        return None
    tags = orthanc.get(f"/instances/{found[0]['ID']}/simplified-tags")
    assert tags["SOPInstanceUID"] == sop_uid
    return pydicom.dcmread(io.BytesIO(orthanc.file(found[0]["ID"])))


def status_rows(config_path: Path) -> dict[str, dict[str, Any]]:
    """``aiworker status --json``'s outbox rows, by destination and object kind; the raw
    output too (``"_raw"``), to look for secrets in it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
    proc = subprocess.run([AIWORKER, "status", "--json", "--config", str(config_path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [study] = json.loads(proc.stdout)["studies"]
    rows = {f"{r['destination']}/{r['object_kind']}": r for r in study["outbox"]}
    return rows | {"_raw": proc.stdout + proc.stderr}


# --- sending ------------------------------------------------------------------------------


@needs_dicomweb_orthanc
def test_results_go_by_stow_rs_and_4xx_or_wrong_credentials_are_dead_at_once(
        tmp_path, results, state, monkeypatch, caplog):
    run, files = results
    db, config_path = state
    objects = {"seg": files.seg, "sr": files.sr, "sc": files.sc}
    orthanc = dicomweb_orthanc(tmp_path / "orthanc")
    try:
        monkeypatch.setenv("ORTHANC_PASSWORD", PASSWORD)
        monkeypatch.setenv("WRONG_PASSWORD", WRONG)
        destinations = {"pacs": destination(orthanc),
                        "wrongpw": destination(orthanc, password_env="WRONG_PASSWORD"),
                        "gone": destination(orthanc, path="/no-dicom-web-here")}
        queue(db, run.loaded.study_uid, objects, *destinations)
        clock = Clock()
        dispatcher = Dispatcher(db, destinations, default_senders("AIWORKER"), clock, POLICY)
        reports = dispatcher.tick()
        assert (reports["pacs"].sent, reports["wrongpw"].dead, reports["gone"].dead) == (3, 3, 3)
        clock.t += 3600  # nothing is due again: dead rows are not retried
        assert dispatcher.tick() == {}

        for kind, path in objects.items():  # what Orthanc holds is what the node wrote
            ours = pydicom.dcmread(path)
            held = orthanc_instance(orthanc, str(ours.SOPInstanceUID))
            assert held is not None, f"{kind} not in Orthanc"
            assert held.SOPClassUID == ours.SOPClassUID and held == ours, kind
        sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in run.paths}
        seg = orthanc_instance(orthanc, str(pydicom.dcmread(files.seg).SOPInstanceUID))
        [referenced] = seg.ReferencedSeriesSequence
        assert referenced.SeriesInstanceUID == run.loaded.series_uid
        assert {str(i.ReferencedSOPInstanceUID)
                for i in referenced.ReferencedInstanceSequence} == sources
        assert len(orthanc.get("/instances")) == 3

        rows = status_rows(config_path)
        for kind in objects:
            assert rows[f"pacs/{kind}"]["state"] == "sent"
            assert (rows[f"wrongpw/{kind}"]["state"], rows[f"wrongpw/{kind}"]["attempts"],
                    rows[f"wrongpw/{kind}"]["last_error"]) == ("dead", 1,
                                                              "HTTP 401 Unauthorized")
            gone = rows[f"gone/{kind}"]
            assert (gone["state"], gone["attempts"]) == ("dead", 1)
            assert gone["last_error"].startswith("HTTP 404 Not Found"), gone["last_error"]
        for secret in (PASSWORD, WRONG):
            assert secret not in rows["_raw"] and secret not in caplog.text
    finally:
        crash(orthanc)


@needs_dicomweb_orthanc
def test_an_orthanc_that_is_down_gets_the_results_once_it_is_back(
        tmp_path, results, state, monkeypatch):
    run, files = results
    db, config_path = state
    monkeypatch.setenv("ORTHANC_PASSWORD", PASSWORD)
    orthanc = dicomweb_orthanc(tmp_path / "orthanc")
    try:
        crash(orthanc)
        queue(db, run.loaded.study_uid, {"seg": files.seg, "sr": files.sr}, "pacs")
        clock = Clock()
        dispatcher = Dispatcher(db, {"pacs": destination(orthanc)},
                                default_senders("AIWORKER"), clock, POLICY)
        assert dispatcher.tick()["pacs"].retry == 2
        row = status_rows(config_path)["pacs/seg"]
        assert (row["state"], row["last_error"]) == (
            "pending", "cannot reach the DICOMweb server: connection refused")
        clock.t += 1  # not due yet: the backoff holds
        assert dispatcher.tick() == {}
        orthanc.start()
        clock.t += POLICY.base_s * 2
        assert dispatcher.tick()["pacs"].sent == 2
        assert {r.state for r in Outbox(db).rows()} == {"sent"}
        assert [r.attempts for r in Outbox(db).rows()] == [2, 2]
        for path in (files.seg, files.sr):
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert orthanc_instance(orthanc, uid) is not None
    finally:
        crash(orthanc)


@pytest.mark.parametrize("status, listed, states", [
    (200, {}, [SENT, SENT]),
    (204, {}, [SENT, SENT]),
    (202, {"ok": "ref", "bad": 0xA700}, [SENT, RETRY]),
    (202, {"ok": "ref", "bad": 0xC000}, [SENT, DEAD]),
    (202, {"ok": "ref", "bad": 0x0122}, [SENT, DEAD]),
    (202, {"ok": "ref", "bad": 0xA900}, [SENT, DEAD]),
    (202, {"ok": "ref", "bad": 0xB000}, [SENT, SENT]),  # a warning: stored
    (202, {"ok": "ref"}, [SENT, RETRY]),  # the server does not say what became of "bad"
    (409, {"ok": 0xA700, "bad": 0xC000}, [RETRY, DEAD]),
    (400, {}, [DEAD, DEAD]), (401, {}, [DEAD, DEAD]), (403, {}, [DEAD, DEAD]),
    (404, {}, [DEAD, DEAD]), (409, {}, [DEAD, DEAD]), (413, {}, [DEAD, DEAD]),
    (415, {}, [DEAD, DEAD]),
    (408, {}, [RETRY, RETRY]), (429, {}, [RETRY, RETRY]), (500, {}, [RETRY, RETRY]),
    (502, {}, [RETRY, RETRY]), (503, {}, [RETRY, RETRY]),
])
def test_stow_rs_answer_rules(status, listed, states):
    uids = {"ok": "1.2.3.1", "bad": "1.2.3.2"}
    response = Dataset()
    referenced, failed = [], []
    for name, what in listed.items():
        item = Dataset()
        item.ReferencedSOPInstanceUID = uids[name]
        if what != "ref":
            item.FailureReason = what
        (referenced if what == "ref" else failed).append(item)
    if referenced:
        response.ReferencedSOPSequence = referenced
    if failed:
        response.FailedSOPSequence = failed
    outcomes = stow_outcomes(status, response, [uids["ok"], uids["bad"]])
    assert [o.state for o in outcomes] == states
    assert all(str(status) in o.reason for o in outcomes if o.state != SENT)
    if 0xC000 in listed.values():
        assert "FailureReason 0xC000" in outcomes[[*listed.values()].index(0xC000)].reason


def test_auth_header_and_secrets_from_files_and_the_environment(tmp_path, results):
    token_file = tmp_path / "token"
    token_file.write_text("abc.def.ghi\n", encoding="utf-8")
    bearer = DicomWebDestination(kind="dicomweb", url="https://dicom.example/v1/dicomWeb",
                                 auth="bearer", token_file=token_file)
    assert session_for(bearer).headers["Authorization"] == "Bearer abc.def.ghi"
    assert bearer_header("t0k") == {"Authorization": "Bearer t0k"}
    basic = DicomWebDestination(kind="dicomweb", url="http://pacs:8042/dicom-web",
                                auth="basic", username="ai", password_env="PACS_PW")
    assert session_for(basic, {"PACS_PW": "pw"}).auth.password == "pw"
    ca = DicomWebDestination(kind="dicomweb", url="https://pacs/dicom-web",
                             ca_file=tmp_path / "ca.pem")
    assert session_for(ca).verify == str(tmp_path / "ca.pem")
    # A secret that cannot be read waits (retry) naming where it was looked for.
    missing = bearer.model_copy(update={"token_file": tmp_path / "absent"})
    [outcome] = send_dicomweb(missing, [str(results[1].sr)])
    assert outcome.state == RETRY and str(tmp_path / "absent") in outcome.reason


def test_config_refuses_missing_or_inline_secrets_without_showing_them(tmp_path):
    def problems(settings: dict[str, Any]) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({"destinations": {"pacs": settings}}))
        with pytest.raises(ConfigError) as refused:
            load_config(path, environ={})
        return str(refused.value)

    base = {"kind": "dicomweb", "url": "https://pacs.example/dicom-web"}
    assert "auth: bearer needs one of token_env, token_file" in problems(
        base | {"auth": "bearer"})
    assert "auth: basic needs username" in problems(base | {"auth": "basic", "username": "a"})
    inline = problems(base | {"auth": "basic", "username": "a", "password": "hunter22"})
    assert "destinations.pacs.password: unknown key" in inline and "hunter22" not in inline
    assert "destinations.pacs.url" in problems(base | {"url": "https://a:hunter2@pacs/x"})


# --- receiving ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stow_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A node that takes STOW-RS (web.stow_enabled, web.token)."""
    root = tmp_path_factory.mktemp("stow-node")
    with running_node(root, web={"token": TOKEN, "stow_enabled": True},
                      inference={"threads": 1}) as node:
        wait_until(lambda: port_open(node.config["web"]["port"]), 15, "the node's web port")
        yield node


def stow_url(node: NodeProcess) -> str:
    return f"http://127.0.0.1:{node.config['web']['port']}/dicomweb"


def test_a_series_over_stow_rs_is_stored_complete_and_selected(tmp_path, stow_node):
    study = write_study(tmp_path / "study", StudyOptions(
        seed=41, vendor="siemens", images_in_acquisition=True, rescan=False, derived=False,
        truth=False, volume_spacing=2.0,
        overrides=Overrides(("sag_pd_fs",), 64, 16)))
    client = DICOMwebClient(stow_url(stow_node), headers=bearer_header(TOKEN))
    answer = client.store_instances([pydicom.dcmread(p) for p in study.files])
    sop_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in study.files}
    assert {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence} == set(
        sop_uids)
    assert "FailedSOPSequence" not in answer
    first = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    series_dir = stow_node.spool / str(first.StudyInstanceUID) / str(first.SeriesInstanceUID)
    for uid, path in sop_uids.items():  # stored as sent, byte for byte
        assert dataset_bytes(series_dir / f"{uid}.dcm") == dataset_bytes(path)

    def selected() -> dict[str, Any] | None:
        status = stow_node.study_status(str(first.StudyInstanceUID))
        return status if status and status["selection"] else None

    status = wait_until(selected, 20, "the STOW-RS study to be selected")
    assert (status["state"], status["instances"], status["calling_ae"]) == (
        "complete", 16, "STOW-RS")
    [series] = status["series"]
    assert series["closed_by"] == "expected_count"
    assert status["selection"]["knee"]["matched"] is True
    assert series["selection"]["knee/main"]["matched"] is True


def test_a_truncated_part_is_refused_in_the_answer_and_not_stored(tmp_path, stow_node):
    study = write_study(tmp_path / "study", StudyOptions(
        seed=43, vendor="siemens", rescan=False, derived=False, truth=False, volume_spacing=2.0,
        overrides=Overrides(("sag_pd_fs",), 32, 2)))
    good, cut = study.files
    cut_uid = str(pydicom.dcmread(cut, stop_before_pixels=True).SOPInstanceUID)
    body = b"".join(b"--BOUNDARY\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
                    for data in (good.read_bytes(), cut.read_bytes()[:-300])) + b"--BOUNDARY--"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; '
                               'boundary=BOUNDARY', "Accept": "application/dicom+json"}
    answer = requests.post(f"{stow_url(stow_node)}/studies", data=body, timeout=30,
                           headers=headers | bearer_header(TOKEN))
    assert answer.status_code == 202, answer.text
    assert answer.headers["Content-Type"] == "application/dicom+json"
    result = Dataset.from_json(answer.json())
    [failed] = result.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (cut_uid, 0xC210)
    assert len(result.ReferencedSOPSequence) == 1
    stored = {p.stem for p in stow_node.spool_files()}
    assert cut_uid not in stored
    assert str(pydicom.dcmread(good, stop_before_pixels=True).SOPInstanceUID) in stored
    [event] = [e for e in stow_node.events("store_failed") if e["sop_uid"] == cut_uid]
    assert event["detail"]["status"] == "0xC210"

    # the node's own sender, bearer auth: the right token goes, a wrong one is dead at once
    right = DicomWebDestination(kind="dicomweb", url=stow_url(stow_node), auth="bearer",
                                token_env="NODE_TOKEN")
    assert send_dicomweb(right.model_copy(update={"token_env": "NO_SUCH_VARIABLE"}),
                         [str(good)])[0].state == RETRY
    environ_token = {"NODE_TOKEN": TOKEN, "BAD_TOKEN": "wrong-token-0123456789"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environ_token.items():
            patch.setenv(name, value)
        [sent] = send_dicomweb(right, [str(good)])
        [refused] = send_dicomweb(right.model_copy(update={"token_env": "BAD_TOKEN"}),
                                  [str(good)])
    assert sent.state == SENT
    assert (refused.state, refused.reason.split(":")[0]) == (DEAD, "HTTP 401 Unauthorized")
    assert requests.post(f"{stow_url(stow_node)}/studies", data=b"x", timeout=10, headers={
        "Content-Type": "application/dicom"} | bearer_header(TOKEN)).status_code == 415


def test_stow_rs_is_off_unless_enabled(tmp_path):
    config = node_config(tmp_path, "plain", {"web": {"token": TOKEN}})
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(config))
    from aiworker.web.app import create_app
    from aiworker.web.server import WebServer

    db = StateDB(tmp_path / "state.db")
    server = WebServer(create_app(db, load_config(path, environ={})), "127.0.0.1",
                       free_port())
    server.start()
    try:
        answer = requests.post(f"{server.url}dicomweb/studies", data=b"", timeout=10,
                               headers=bearer_header(TOKEN))
        assert answer.status_code == 404
    finally:
        server.stop()
        db.close()
