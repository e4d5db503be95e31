"""The dashboard over a state DB the store's own calls wrote (receive, complete, select, a
job, outbox rows and their send attempts), served by uvicorn on a real socket: the stage
per destination, durations after a re-opened study, the outbox page, the search, the
full error text, the viewer link, auto-refresh and Swagger UI without internet. Headless
Chromium checks the pages where a person would look.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from helpers.web import (
    CHROMIUM,
    TOKEN,
    attempt,
    instance,
    processed_study,
    save_artifact,
    serving,
    web_config,
)
from pydicom.dataset import Dataset

from aiworker.results.patient import read_patient_study
from aiworker.store.db import StateDB
from aiworker.store.layout import ResultFolder
from aiworker.store.outbox import Outbox

T0 = time.time() - 3600  # an hour ago: every row is due at once
UID_A, UID_B, UID_C = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.2.2", \
    "1.2.826.0.1.3680043.10.3.3"
LONG_ERROR = ("RuntimeError: the model ran out of memory on the input volume "
              + "x" * 200 + "\nline two of the error\nthe last line: TAIL-OF-ERROR")


@pytest.fixture
def db(tmp_path) -> Iterator[StateDB]:
    state = StateDB(tmp_path / "state.db")
    yield state
    state.close()


@pytest.fixture
def written(db: StateDB) -> dict[str, Any]:
    """A: PACS took both objects, RIS refused three times and is retrying. B: PACS took
    both, RIS gave up (dead). C: the job failed with a long multi-line error."""
    a = processed_study(db, UID_A, T0, accession="ACC-A")
    b = processed_study(db, UID_B, T0 + 100, accession="ACC-B")
    processed_study(db, UID_C, T0 + 200, accession="ACC-C", error=LONG_ERROR)
    attempt(db, "pacs", True, T0 + 300)
    outbox, [b_ris] = Outbox(db), b.rows["ris"]
    for i in range(3):  # an hour apart, so each finds the rows due again
        now = time.time() + 3600 * i
        claimed = [r.id for r in outbox.claim("ris", now, 100)]
        outbox.mark_failed([x for x in claimed if x != b_ris], "connection refused", now)
        outbox.mark_failed([x for x in claimed if x == b_ris], "AR|bad message", now,
                           permanent=i == 2)
    return {"a": a, "b": b}


def _study(http, uid: str) -> dict[str, Any]:
    response = http.get(f"/api/studies/{uid}")
    assert response.status_code == 200, response.text
    return response.json()


def test_stage_and_summary_per_destination(db, written, tmp_path):
    with serving(db, web_config(tmp_path)) as http:
        a, b = _study(http, UID_A), _study(http, UID_B)
        assert a["stage"] == "sending" and b["stage"] == "partly_sent"
        [pacs, ris] = a["destinations"]
        assert pacs["summary"] == "pacs: sent 2/2"
        assert ris["state"] == "retrying" and ris["last_error"] == "connection refused"
        clock = datetime.fromisoformat(ris["next_attempt_at"]).astimezone(UTC)
        assert ris["summary"] == f"ris: retrying (3 attempts), next attempt " \
                                 f"{clock:%H:%M:%S}"
        assert [d["summary"] for d in b["destinations"]][1].startswith("ris: dead (")
        assert [s["study_uid"] for s in http.get("/api/studies?state=partly_sent").json()] \
            == [UID_B]
        page = http.get("/").text
        assert "pacs: sent 2/2" in page and "ris: retrying (3 attempts)" in page
        assert "next attempt (UTC)" in http.get(f"/studies/{UID_A}").text


def test_a_reopened_study_shows_no_negative_durations(db, tmp_path):
    """Done and sent, then a late instance re-opens the study and it completes again: the
    inferred and sent steps are from before; they are stale, never negative."""
    processed_study(db, UID_A, time.time() - 60)
    attempt(db, "pacs", True, time.time())
    attempt(db, "ris", True, time.time())
    db.record_instance(instance(UID_A, UID_A + ".1", UID_A + ".1.late", time.time() + 1))
    db.complete_idle(time.time() + 10, 1.0)  # complete again, after the old decision
    with serving(db, web_config(tmp_path)) as http:
        steps = {s["step"]: s for s in _study(http, UID_A)["timeline"]}
        assert all(s["seconds"] is None or s["seconds"] >= 0 for s in steps.values()), steps
        assert [k for k, s in steps.items() if s["stale"]] == ["selected", "inferred", "sent"]
        assert steps["complete"]["seconds"] > 0
        assert "before the study re-opened" in http.get(f"/studies/{UID_A}").text
        assert "→ -" not in http.get("/").text


def test_the_outbox_page_filters_by_state_and_destination(db, written, tmp_path):
    with serving(db, web_config(tmp_path, token=TOKEN)) as http:
        page = http.get("/outbox")
        assert page.status_code == 200
        rows = re.findall(r'<tr data-row="(\d+)" data-state="(\w+)" data-destination="(\w+)"',
                          page.text)
        assert len(rows) == 6 and "connection refused" in page.text
        dead = http.get("/outbox?state=dead").text
        assert re.findall(r'data-state="(\w+)"', dead) == ["dead"]
        assert 'action="/outbox/' in dead and 'name="token"' in dead
        ris = http.get("/outbox?destination=ris").text
        assert set(re.findall(r'data-destination="(\w+)"', ris)) == {"ris"}
        [dead_id] = written["b"].rows["ris"]
        done = http.post(f"/outbox/{dead_id}/resend", data={"token": TOKEN})
        assert done.status_code == 303 and done.headers["location"] == "/outbox?notice=resent"
        assert [r["state"] for r in http.get("/api/outbox").json()
                if r["id"] == dead_id] == ["pending"]
    with serving(db, web_config(tmp_path)) as http:  # no token: the button is disabled
        assert 'name="token"' not in http.get("/outbox?state=sent").text


def test_search_by_uid_or_accession_without_showing_the_accession(db, written, tmp_path):
    with serving(db, web_config(tmp_path)) as http:
        assert [s["study_uid"] for s in http.get("/api/studies?q=ACC-B").json()] == [UID_B]
        assert [s["study_uid"] for s in http.get(f"/api/studies?q={UID_A[:-2]}").json()] \
            == [UID_A]
        assert http.get("/api/studies?q=ACC").json() == []  # accession: exact only
        page = http.get("/?q=ACC-B").text
        assert f'data-study="{UID_B}"' in page and f'data-study="{UID_A}"' not in page
        table = page[page.index('<table id="studies">'):]
        assert "ACC-B" not in table and 'value="ACC-B"' in page  # matched, not shown
        assert "ACC-A" not in http.get("/").text
    with serving(db, web_config(tmp_path, show_phi=True)) as http:
        assert "ACC-B" in http.get(f"/studies/{UID_B}").text


def test_failed_jobs_show_their_whole_error(db, written, tmp_path):
    with serving(db, web_config(tmp_path)) as http:
        for path in (f"/studies/{UID_C}", "/failures"):
            text = http.get(path).text
            assert "TAIL-OF-ERROR" in text and "x" * 200 in text, path
            assert "<details" in text


def test_header_warnings_are_shown_on_the_job_without_the_value(db, tmp_path):
    """The warnings the results stage wrote for a Philips-style header (PatientSex 0000),
    recorded on the job as the infer stage does (read from its folder once, at the end),
    are in the API (status --json's shape) and on the study page, naming the attribute,
    never the value."""
    source = Dataset()
    source.PatientName, source.PatientSex, source.StudyDate = "DOE^JANE", "0000", "2024-01-05"
    folder = ResultFolder(tmp_path / "results" / "job")
    folder.path.mkdir(parents=True)
    folder.warnings.write_text(json.dumps(read_patient_study(source).warning_dicts()))
    processed_study(db, UID_A, T0, result_dir=str(folder.path),
                    warnings=folder.header_warnings())
    with serving(db, web_config(tmp_path)) as http:
        [job] = _study(http, UID_A)["selection"]["knee"]["jobs"]
        assert {w["attribute"] for w in job["warnings"]} == {"PatientSex", "StudyDate"}
        assert all("0000" not in w["text"] for w in job["warnings"])
        page = http.get(f"/studies/{UID_A}").text
        assert "Header warnings" in page and "PatientSex: " in page and "0000" not in page


def test_the_viewer_link(db, written, tmp_path):
    viewer = "https://pacs.example.org/viewer?StudyInstanceUID={study_uid}"
    with serving(db, web_config(tmp_path, viewer_url=viewer)) as http:
        link = f'href="https://pacs.example.org/viewer?StudyInstanceUID={UID_A}"'
        assert link in http.get("/").text and link in http.get(f"/studies/{UID_A}").text
        assert _study(http, UID_A)["viewer_url"] == viewer.format(study_uid=UID_A)
    with serving(db, web_config(tmp_path)) as http:
        assert "open in viewer" not in http.get("/").text


def test_swagger_ui_is_served_from_the_package(db, tmp_path):
    with serving(db, web_config(tmp_path)) as http:
        html = http.get("/docs").text
        urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", html)
        assert urls and not [u for u in urls if "//" in u], urls
        js = [u for u in urls if u.endswith(".js")]
        css = [u for u in urls if u.endswith(".css")]
        assert js and css
        for url, kind in ((js[0], "javascript"), (css[0], "css")):
            asset = http.get(url)
            assert asset.status_code == 200 and kind in asset.headers["content-type"], url
            assert len(asset.content) > 10_000
        assert http.get("/openapi.json").status_code == 200


def test_refresh_is_configurable(db, written, tmp_path):
    with serving(db, web_config(tmp_path, refresh_s=7)) as http:
        for path in ("/", f"/studies/{UID_A}", "/outbox"):
            assert 'id="auto-refresh"' in http.get(path).text, path
        assert "7000" in http.get("/").text
        assert 'id="auto-refresh"' not in http.get("/failures").text
    with serving(db, web_config(tmp_path, refresh_s=0)) as http:
        assert 'id="auto-refresh"' not in http.get("/").text


def test_the_dashboard_pages_in_chromium(db, written, tmp_path):
    """The list reloads itself (a study written meanwhile appears) until the box is
    unticked; destinations, outbox filter and the full error as a person sees them."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): no browser test")
    from playwright.sync_api import sync_playwright

    with serving(db, web_config(tmp_path, refresh_s=1, token=TOKEN)) as http, \
            sync_playwright() as pw:
        base = str(http.base_url).rstrip("/")
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(base + "/")
            row = page.locator(f'tr[data-study="{UID_A}"]')
            assert row.locator(".badge").first.inner_text() == "sending"
            assert "pacs: sent 2/2" in row.locator(".destinations").inner_text()
            processed_study(db, "1.2.826.0.1.3680043.10.4.4", time.time())
            page.wait_for_selector('tr[data-study="1.2.826.0.1.3680043.10.4.4"]',
                                   timeout=10_000)
            _shoot(page, tmp_path / "dash-studies.png")
            page.uncheck("#auto-refresh")
            page.reload()
            assert not page.is_checked("#auto-refresh")
            processed_study(db, "1.2.826.0.1.3680043.10.5.5", time.time())
            page.wait_for_timeout(2500)
            assert page.locator('tr[data-study="1.2.826.0.1.3680043.10.5.5"]').count() == 0

            page.goto(base + "/outbox")
            page.select_option("select[name=state]", "dead")
            page.click("#outbox-filter button")
            page.wait_for_url("**state=dead**")
            assert page.locator("#outbox tbody tr").count() == 1
            _shoot(page, tmp_path / "dash-outbox.png")

            page.goto(base + "/failures")
            page.locator("#failed-jobs details summary").click()
            assert "TAIL-OF-ERROR" in page.inner_text("#failed-jobs")
            _shoot(page, tmp_path / "dash-failures.png")
        finally:
            browser.close()


def _shoot(page: Any, path) -> None:
    page.screenshot(path=str(path), full_page=True)
    save_artifact(path)
