"""The dashboard, REST API, health and metrics of a real ``aiworker serve``, after a phantom
knee study went through it end to end: received over DICOM, selected, segmented by the
bundled knee-demo on the CPU, and its SEG, SR and ORU^R01 accepted by a stand-in PACS and
RIS. The run also has one rejected association and one refused C-STORE (0xC211), which the
failures page and the metrics must show. A second node (no pipelines) shows patient data
with ``web.show_phi``, refuses POSTs without ``web.token`` and goes unready below the disk
floor. Last, headless Chromium looks at the pages and presses a resend button.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from helpers.dicom import raw_echo, raw_store
from helpers.node import NodeProcess, node_config
from helpers.tools import AIWORKER, free_port, wait_until
from helpers.web import (
    CHROMIUM,
    PATIENT_NAME,
    SENDER,
    TOKEN,
    Site,
    client,
    knee_study,
    metrics,
    running_site,
    save_artifact,
    seriesless_file,
    wait_row,
    web_url,
)
from test_infer_e2e import needs_knee_demo

from aiworker.results.report import DISCLAIMER

pytestmark = needs_knee_demo

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The node after the run: the study sent, one association rejected (calling AE
    MALLORY), one C-STORE refused with 0xC211."""
    workdir = tmp_path_factory.mktemp("web")
    with running_site(workdir) as site:
        responses = site.send()
        assert [int(r.Status) for r in responses] == [0] * len(site.study.files)
        assert raw_echo(site.node.port, calling="MALLORY") is None
        [refused] = raw_store(site.node.port, [seriesless_file(site.study.files[0],
                                                               workdir / "bad")],
                              calling=SENDER)
        assert int(refused.Status) == 0xC211
        site.wait_sent()
        yield site


def patient_id(site: Site) -> str:
    return str(pydicom.dcmread(site.study.files[0], stop_before_pixels=True).PatientID)


def test_the_api_shows_the_study_sent_with_its_timeline_series_jobs_and_outbox(site):
    http, uid = site.http, site.study.study_uid
    [study] = http.get("/api/studies").json()
    assert (study["study_uid"], study["stage"], study["instances"]) == \
        (uid, "sent", len(site.study.files))
    steps = {s["step"]: s for s in study["timeline"]}
    assert list(steps) == ["received", "complete", "selected", "inferred", "sent"]
    assert all(s["at"] for s in steps.values())
    assert all(s["seconds"] >= 0 for s in list(steps.values())[1:])
    assert study["acl"]["decision"] == "torn"
    assert [s["study_uid"] for s in http.get("/api/studies?state=sent").json()] == [uid]
    assert http.get("/api/studies?state=failed").json() == []

    series = http.get(f"/api/studies/{uid}/series").json()
    chosen = [s for s in series if s["selection"].get("knee/main", {}).get("matched")
              and s["selection"]["knee/main"]["reason"].startswith("chosen")]
    assert len(series) == 2 and len(chosen) == 1
    assert chosen[0]["features"]["plane"] == "sagittal"

    [job] = http.get("/api/jobs").json()
    assert (job["state"], job["model"], job["study_uid"]) == ("done", "knee-demo", uid)
    assert http.get(f"/api/jobs/{job['job_id']}").json()["job_id"] == job["job_id"]
    preview = http.get(f"/api/jobs/{job['job_id']}/preview.png")
    assert preview.headers["content-type"] == "image/png"
    assert preview.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert DISCLAIMER in http.get(f"/api/jobs/{job['job_id']}/report").text
    assert http.get("/api/jobs/nope/preview.png").status_code == 404

    rows = http.get("/api/outbox").json()
    assert sorted((r["destination"], r["object_kind"], r["state"], r["attempts"])
                  for r in rows) == [("pacs", "seg", "sent", 1), ("pacs", "sr", "sent", 1),
                                     ("ris", "hl7", "sent", 1)]
    failures = http.get("/api/failures").json()
    assert failures["jobs"] == [] and failures["dead"] == []
    assert http.get("/api/workers").json() == []  # SQLite: one process, no workers
    assert "its own SQLite file" in http.get("/workers").text
    kinds = {(e["kind"], e["calling_ae"], e["status"]) for e in failures["events"]}
    assert ("association_rejected", "MALLORY", None) in kinds
    assert ("store_failed", SENDER, "0xC211") in kinds


def test_openapi_describes_the_api_and_its_bearer_token(site):
    http = site.http
    spec = http.get("/openapi.json").json()
    for path in ("/api/studies", "/api/studies/{study_uid}", "/api/jobs", "/api/outbox",
                 "/api/failures", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    resend = spec["paths"]["/api/outbox/{row_id}/resend"]["post"]
    assert resend["security"] == [{"HTTPBearer": []}]
    assert "swagger" in http.get("/docs").text.lower()


def test_metrics_count_what_the_run_did(site):
    http = site.http
    spool_bytes = sum(p.stat().st_size for p in site.node.spool_files())
    wait_until(lambda: metrics(http).get("aiworker_associations_active") == 0, 10,
               "no association open")
    m = metrics(http)
    assert m["aiworker_instances_received_total"] == len(site.study.files)
    assert m["aiworker_received_bytes_total"] == spool_bytes > 0
    assert m["aiworker_associations_rejected_total"] == 1
    assert m['aiworker_cstore_failures_total{status="0xC211"}'] == 1
    assert m["aiworker_series_completed_total"] == 2
    assert m["aiworker_studies_completed_total"] == 1
    assert m['aiworker_series{state="complete"}'] == 2
    assert m['aiworker_studies{state="complete"}'] == 1
    assert m['aiworker_jobs{state="done"}'] == 1
    assert m["aiworker_inference_seconds_count"] == 1
    assert 0 < m["aiworker_inference_seconds_sum"] < 600
    assert m["aiworker_end_to_end_seconds_count"] == 1
    assert m["aiworker_end_to_end_seconds_sum"] > m["aiworker_inference_seconds_sum"]
    assert m['aiworker_outbox_rows{destination="pacs",state="sent"}'] == 2
    assert m['aiworker_outbox_rows{destination="ris",state="sent"}'] == 1
    assert m['aiworker_outbox_depth{destination="pacs"}'] == 0
    assert m['aiworker_outbox_failed_attempts{destination="ris"}'] == 0
    for stage in ("receive", "queue_wait", "inference", "result_objects", "send"):
        assert m[f'aiworker_stage_seconds_count{{stage="{stage}"}}'] == 1, stage
    assert m['aiworker_stage_seconds_sum{stage="inference"}'] + \
        m['aiworker_stage_seconds_sum{stage="result_objects"}'] <= \
        m["aiworker_inference_seconds_sum"]
    assert 0 < m['aiworker_stage_seconds_sum{stage="send"}'] < \
        m["aiworker_end_to_end_seconds_sum"]
    [build] = [key for key in m if key.startswith("aiworker_build_info{")]
    assert f'version="{version("aiworker")}"' in build and 'variant="source"' in build
    assert m[build] == 1


def test_readyz_passes_every_check_on_a_running_node(site):
    response = site.http.get("/readyz")
    body = response.json()
    assert response.status_code == 200 and body["ready"] and body["failed"] == []
    assert set(body["checks"]) == {"database", "disk", "models", "scp"}
    assert "knee-demo" in body["checks"]["models"]["detail"]
    assert site.http.get("/healthz").json() == {"status": "ok"}


def test_pages_and_api_show_no_patient_data_without_show_phi(site):
    http, uid = site.http, site.study.study_uid
    texts = [http.get(path).text for path in ("/", f"/studies/{uid}", "/failures",
                                              "/api/studies", f"/api/studies/{uid}",
                                              "/api/failures")]
    for text in texts:
        assert PATIENT_NAME not in text and PATIENT_NAME.replace("^", " ") not in text
        assert patient_id(site) not in text
    assert "patient" not in http.get(f"/api/studies/{uid}").json()


def test_resend_needs_the_token_and_queues_the_row_again(site):
    http = site.http
    row = next(r for r in http.get("/api/outbox").json() if r["object_kind"] == "sr")
    assert http.post(f"/api/outbox/{row['id']}/resend").status_code == 401
    wrong = http.post(f"/api/outbox/{row['id']}/resend",
                      headers={"Authorization": "Bearer not-the-token-at-all"})
    assert wrong.status_code == 401 and "wrong token" in wrong.json()["detail"]
    assert http.post("/api/outbox/999999/resend", headers=AUTH).status_code == 404
    job_id = row["job_id"]
    conflict = http.post(f"/api/jobs/{job_id}/retry", headers=AUTH)
    assert conflict.status_code == 409 and "not failed" in conflict.json()["detail"]

    received = len(site.arrivals.dicom)
    done = http.post(f"/api/outbox/{row['id']}/resend", headers=AUTH)
    assert done.status_code == 200 and done.json()["requeued"] == 1
    again = wait_row(http, row["id"], lambda r: r["state"] == "sent"
                     and r["sent_at"] > row["sent_at"])
    assert again["attempts"] == 1
    wait_until(lambda: len(site.arrivals.dicom) == received + 1, 10, "the SR at the PACS")
    events = site.node.events("outbox_resent")
    assert events[-1]["detail"]["rows"] == [row["id"]]
    assert events[-1]["detail"]["source"] == "web"


@pytest.fixture
def phi_node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A node without pipelines or token, showing patient data."""
    node = NodeProcess(tmp_path, "phi-node", node_config(tmp_path, "phi-node", {
        "pipelines": [], "web": {"show_phi": True, "port": free_port()}}))
    try:
        yield node.start()
    finally:
        node.close()


def test_show_phi_token_off_and_the_disk_floor(phi_node, tmp_path):
    study = knee_study(tmp_path / "small", seed=7, roles=("sag_pd_fs",), matrix=64, slices=6)
    raw_store(phi_node.port, study.files)
    http = client(phi_node)
    uid = study.study_uid
    wait_until(lambda: http.get(f"/api/studies/{uid}").status_code == 200
               and http.get(f"/api/studies/{uid}").json()["stage"] == "complete", 30,
               "the study to complete")
    assert http.get(f"/api/studies/{uid}").json()["patient"]["name"] == PATIENT_NAME
    assert PATIENT_NAME in http.get("/").text and PATIENT_NAME in http.get(f"/studies/{uid}").text

    refused = http.post(f"/api/studies/{uid}/resend", headers=AUTH)
    assert refused.status_code == 403 and "web.token" in refused.json()["detail"]
    form = http.post(f"/studies/{uid}/resend", data={"token": TOKEN})
    assert form.status_code == 303 and form.headers["location"].endswith("notice=disabled")
    assert "Resend and retry are off" in http.get(form.headers["location"]).text

    phi_node.reconfigure(storage={"min_free_mb": 1 << 30})  # a petabyte: never free
    phi_node.restart()
    wait_until(lambda: _get(http, "/readyz") is not None, 15, "the web port again")
    ready = http.get("/readyz")
    body = ready.json()
    assert ready.status_code == 503 and body["ready"] is False and body["failed"] == ["disk"]
    assert "storage.min_free_mb" in body["checks"]["disk"]["detail"]
    [response] = raw_store(phi_node.port, study.files[:1])
    assert int(response.Status) == 0xA700
    assert "0xA700" in http.get("/failures").text
    assert metrics(http)['aiworker_cstore_failures_total{status="0xA700"}'] == 1


def _get(http: Any, path: str) -> Any:
    try:
        return http.get(path)
    except Exception:
        return None


def test_a_web_port_in_use_stops_the_node_with_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = node_config(tmp_path, "busy", {"pipelines": [], "web": {"port": port}})
        path = tmp_path / "busy.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([AIWORKER, "serve", "--config", str(path)], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# --- headless Chromium --------------------------------------------------------------------


def test_the_dashboard_in_chromium(site, tmp_path):
    """The list shows the study as sent; its page the explanation, the report and the
    preview image (loaded); the resend button, with the token typed in, queues the row
    again. Screenshots go to tmp_path and test-artifacts/web/."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): no browser test")
    from playwright.sync_api import sync_playwright

    uid, base = site.study.study_uid, web_url(site.node)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(base + "/")
            row = page.locator(f'tr[data-study="{uid}"]')
            assert row.locator(".badge").first.inner_text() == "sent"
            assert row.locator('.step.reached[data-step="sent"]').count() == 1
            _shoot(page, tmp_path / "web-studies.png")

            row.locator("a").first.click()
            page.wait_for_url(f"**/studies/{uid}")
            assert "matched" in page.inner_text("#selection")
            assert "main → series 1" in page.inner_text("#selection")
            assert DISCLAIMER in page.inner_text("#report")
            page.wait_for_function("document.querySelector('#preview').complete")
            assert page.evaluate("document.querySelector('#preview').naturalWidth") > 0
            _shoot(page, tmp_path / "web-study.png")

            hl7 = next(r for r in site.http.get("/api/outbox").json()
                       if r["object_kind"] == "hl7")
            messages = len(site.arrivals.hl7)
            form = page.locator(f'tr[data-row="{hl7["id"]}"] form')
            form.locator("input[name=token]").fill(TOKEN)
            form.locator("button").click()
            page.wait_for_url("**notice=resent")
            assert "Queued again" in page.inner_text(".notice")
            wait_row(site.http, hl7["id"], lambda r: r["state"] == "sent"
                     and r["sent_at"] > hl7["sent_at"])
            wait_until(lambda: len(site.arrivals.hl7) == messages + 1, 10,
                       "the ORU^R01 at the RIS again")
            page.goto(base + "/failures")
            assert "0xC211" in page.inner_text("#problems")
            assert "MALLORY" in page.inner_text("#problems")
            _shoot(page, tmp_path / "web-failures.png")
        finally:
            browser.close()


def _shoot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    save_artifact(path)
