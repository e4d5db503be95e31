"""``aiworker export`` end to end, as a subprocess on a node's data folder holding a processed
study: the exported files read back with pydicom carry none of the source's patient data,
every UID is new and the SEG and SR reference the exported images, dciodvfy is clean, the
mapping (0600, outside the export) leads back; sent to a destination (a real pynetdicom
storage SCP) with the first export's mapping reused, the same UIDs arrive; the refusals
say why."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
from helpers.export import ProcessedStudy, processed_study
from helpers.node import NodeProcess, node_config
from helpers.tools import dciodvfy_errors

from aiworker.demo import Arrivals, start_pacs

PHI = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
       "ReferringPhysicianName", "StudyID")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """A node (not started) whose data folder holds a processed study, and a stand-in
    PACS named ``pacs`` in its config."""
    workdir = tmp_path_factory.mktemp("export-cli")
    arrivals = Arrivals()
    pacs, port = start_pacs(workdir / "pacs", arrivals)
    config = node_config(workdir, "node", {"destinations": {
        "pacs": {"kind": "dicom", "host": "127.0.0.1", "port": port, "ae_title": "DEMOPACS"},
        "ris": {"kind": "hl7", "host": "127.0.0.1", "port": 2575}}})
    node = NodeProcess(workdir, "node", config)
    study = processed_study(node.data_dir)
    yield node, study, arrivals
    pacs.shutdown()


def _export(node: NodeProcess, *args: str) -> dict:
    run = node.cli("export", "--config", str(node.config_path), "--json", *args)
    assert run.returncode == 0, run.stderr + run.stdout
    return json.loads(run.stdout)


def _phi(source: pydicom.Dataset) -> set[str]:
    values = {str(source.get(k) or "") for k in PHI}
    values |= {part for v in list(values) for part in v.split("^")}
    return {v for v in values if len(v) >= 3}


def _texts(ds: pydicom.Dataset) -> list[str]:
    return [str(e.value) for e in ds.iterall()
            if e.VR not in ("SQ", "OB", "OW", "OF", "OD", "UN")]


def _check_export(datasets: list[pydicom.Dataset], study: ProcessedStudy) -> None:
    """No patient data, new UIDs, references inside the export."""
    phi = _phi(study.source)
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in study.sources}
    images = [ds for ds in datasets if ds.Modality == "MR"]
    assert len(images) == len(study.sources)
    for ds in datasets:
        assert not [v for v in _texts(ds) for p in phi if p in v], ds.Modality
        assert ds.StudyInstanceUID != study.study_uid
        assert ds.SOPInstanceUID not in sources
        assert ds.PatientIdentityRemoved == "YES"
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    [series] = {ds.SeriesInstanceUID for ds in images}
    assert series != study.series_uid
    seg = next(ds for ds in datasets if ds.Modality == "SEG")
    sr = next(ds for ds in datasets if ds.Modality == "SR")
    [referenced] = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series
    refs = {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence}
    assert refs == {ds.SOPInstanceUID for ds in images}
    sr_refs = {e.value for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert seg.SOPInstanceUID in sr_refs and sr_refs <= {ds.SOPInstanceUID for ds in datasets}


def test_export_to_a_folder_then_to_a_destination_with_the_same_uids(site, tmp_path):
    node, study, arrivals = site
    out = tmp_path / "cohort"
    report = _export(node, study.study_uid, "--to", str(out), "--deidentify",
                     "--profile", "research")
    assert report["profile"] == "research" and report["studies"] == 1
    assert report["options"] == ["retain-dates", "retain-device", "clean-descriptors"]
    files = [out / f for f in report["files"]]
    datasets = [pydicom.dcmread(f) for f in files]
    _check_export(datasets, study)
    assert [b["kind"] for b in report["burned_in"]] == ["sc"]
    codes = [c.CodeValue for c in datasets[0].DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113109", "113105"]
    if shutil.which("dciodvfy"):
        for ds, path in zip(datasets, files, strict=True):
            if ds.Modality in ("SEG", "SR"):
                assert dciodvfy_errors(path) == [], ds.Modality

    mapping = Path(report["mapping"])
    assert mapping == tmp_path / "cohort-mapping.json"
    assert stat.S_IMODE(mapping.stat().st_mode) == 0o600
    table = json.loads(mapping.read_text())
    for path in study.sources:
        original = pydicom.dcmread(path, stop_before_pixels=True)
        assert table["uids"][original.SOPInstanceUID] in {ds.SOPInstanceUID for ds in datasets}
    assert table["patients"] == {study.source.PatientID: datasets[0].PatientID}

    sent = _export(node, study.study_uid, "--to", "pacs", "--deidentify", "--profile",
                   "research", "--reuse-mapping", str(mapping))
    assert sent["sent"] == {"destination": "pacs", "sent": len(files), "not_sent": []}
    arrived = [pydicom.dcmread(p) for p in arrivals.dicom]
    assert {ds.SOPInstanceUID for ds in arrived} == {ds.SOPInstanceUID for ds in datasets}
    assert {ds.PatientID for ds in arrived} == {datasets[0].PatientID}
    assert not Path(sent["out_dir"]).exists()  # the staging folder went once sent
    assert stat.S_IMODE(Path(sent["mapping"]).stat().st_mode) == 0o600


def test_refusals_say_why(site, tmp_path):
    node, study, _ = site
    cli = ("export", "--config", str(node.config_path))
    run = node.cli(*cli, study.study_uid, "--to", str(tmp_path / "a"))
    assert run.returncode == 2 and "--deidentify" in run.stderr
    run = node.cli(*cli, "1.2.3.4", "--to", str(tmp_path / "a"), "--deidentify")
    assert run.returncode == 1 and "study 1.2.3.4: no done job" in run.stderr
    (tmp_path / "b-mapping.json").write_text("{}")
    run = node.cli(*cli, study.study_uid, "--to", str(tmp_path / "b"), "--deidentify")
    assert run.returncode == 1 and "exists" in run.stderr, run.stderr
    assert not (tmp_path / "b").exists()
    run = node.cli(*cli, study.study_uid, "--to", "ris", "--deidentify", "--no-mapping")
    assert run.returncode == 2 and "kind hl7" in run.stderr, run.stderr
