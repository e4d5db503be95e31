"""The research export from the dashboard, served by uvicorn on a real socket over a node
folder holding a processed study: the API's POST and the study page's button need
web.token like resend and retry (none: 401, a wrong one: 401, web.token unset: 403, and
nothing is exported), and with it the API writes the export under the node's exports/
and the button downloads it as a zip of de-identified files."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import pydicom
import pytest
from helpers.export import processed_study
from helpers.web import TOKEN, serving, web_config

from aiworker.store.db import StateDB
from aiworker.store.layout import DataPaths


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    """The config of a node with web.token and its DB holding a processed study."""
    workdir = tmp_path_factory.mktemp("web-export")
    config = web_config(workdir, token=TOKEN)
    study = processed_study(config.storage.data_dir)
    db = StateDB(DataPaths(config.storage.data_dir).db)
    yield config, db, study
    db.close()


def _exports(config) -> list[Path]:
    folder = DataPaths(config.storage.data_dir).root / "exports"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_export_needs_the_token_like_the_other_write_actions(node, tmp_path):
    config, db, study = node
    path = f"/api/studies/{study.study_uid}/export"
    with serving(db, config) as http:
        assert http.post(path).status_code == 401
        assert http.post(path, headers={"Authorization": "Bearer wrong-token-0123456"}
                         ).status_code == 401
        form = http.post(f"/studies/{study.study_uid}/export",
                         data={"token": "wrong-token-0123456"})
        assert form.status_code == 303
        assert form.headers["location"].endswith("?notice=wrong")
        page = http.get(f"/studies/{study.study_uid}")
        assert 'id="export"' in page.text and "Export de-identified" in page.text
    unset = web_config(tmp_path)
    unset.storage.data_dir = config.storage.data_dir
    with serving(db, unset) as http:
        refused = http.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 403 and "web.token" in refused.json()["detail"]
    assert _exports(config) == []


def test_the_api_and_the_button_export_de_identified_files(node):
    config, db, study = node
    phi = {str(study.source.PatientName), str(study.source.PatientID)}
    with serving(db, config) as http:
        answer = http.post(f"/api/studies/{study.study_uid}/export",
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200, answer.text
        report = answer.json()
        missing = http.post("/api/studies/1.2.3/export",
                            headers={"Authorization": f"Bearer {TOKEN}"})
        assert missing.status_code == 404
        download = http.post(f"/studies/{study.study_uid}/export",
                             data={"token": TOKEN, "profile": "research"})
    out = Path(report["out_dir"])
    assert out.parent == DataPaths(config.storage.data_dir).root / "exports"
    assert report["profile"] == "basic" and len(report["files"]) == len(study.sources) + 3
    seg = next(ds for ds in (pydicom.dcmread(out / f) for f in report["files"])
               if ds.Modality == "SEG")
    assert str(seg.PatientName) not in phi and seg.PatientID not in phi
    mapping = Path(report["mapping"])
    assert not mapping.is_relative_to(out) and stat.S_IMODE(mapping.stat().st_mode) == 0o600
    assert json.loads(mapping.read_text())["patients"] == {study.source.PatientID: seg.PatientID}

    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(download.content))
    names = [n for n in archive.namelist() if n.endswith(".dcm")]
    assert len(names) == len(study.sources) + 3 and "mapping" not in " ".join(names)
    datasets = [pydicom.dcmread(io.BytesIO(archive.read(n))) for n in names]
    assert {ds.Modality for ds in datasets} == {"MR", "SEG", "SR", "OT"}
    for ds in datasets:
        assert ds.PatientIdentityRemoved == "YES" and str(ds.PatientName) not in phi
        assert "113107" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert len(_exports(config)) == 4  # two export folders, each with its mapping
