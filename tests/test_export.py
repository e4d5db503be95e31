"""De-identified research export (aiworker.export): a phantom study with its SEG, SR and
SC through the export; no PHI of the source left in any element of any file, the SEG's and
SR's references resolve inside the export, dciodvfy clean, the mapping leads back."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pydicom
import pytest
from helpers.results import MANIFEST, MODEL_ID, truth_run
from helpers.tools import dciodvfy_errors

from aiworker.export.deid import Options
from aiworker.export.export import ExportError, ExportRequest, StudyFiles, export
from aiworker.results.objects import write_results

PHI = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
       "ReferringPhysicianName", "StudyID")
DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyFiles, pydicom.Dataset]:
    root = tmp_path_factory.mktemp("export-source")
    run = truth_run(root / "study", seed=5, matrix=48)
    files = write_results(root / "results", run.paths, run.loaded, run.labels, run.findings,
                          MANIFEST, MODEL_ID, secondary_capture=True)
    source = pydicom.dcmread(run.paths[0])
    return StudyFiles(source.StudyInstanceUID, tuple(run.paths),
                      (("seg", files.seg), ("sr", files.sr), ("sc", files.sc))), source


def _values(ds: pydicom.Dataset) -> list[str]:
    """Every element's value as text, through every sequence (file meta included)."""
    found = [str(e.value) for e in ds.file_meta] if hasattr(ds, "file_meta") else []
    for element in ds.iterall():
        if element.VR not in ("SQ", "OB", "OW", "OF", "OD", "UN"):
            found.append(str(element.value))
    return found


def _phi(source: pydicom.Dataset, with_dates: bool) -> set[str]:
    keys = PHI + (DATES if with_dates else ())
    values = {str(source.get(k) or "") for k in keys}
    values |= {part for v in list(values) for part in v.split("^")}
    return {v for v in values if len(v) >= 3}


def _export(tmp_path: Path, study: StudyFiles, profile: str, mapping: bool = True):
    out = tmp_path / "export"
    return out, export(ExportRequest((study,), out, Options.of(profile), profile,
                                     tmp_path / "map.json" if mapping else None))


@pytest.mark.parametrize("profile", ["basic", "research"])
def test_no_phi_left_references_resolve_dciodvfy_clean(tmp_path, study, profile):
    files, source = study
    out, report = _export(tmp_path, files, profile)
    exported = [pydicom.dcmread(out / f) for f in report.files]
    assert len(exported) == len(files.sources) + 3
    phi = _phi(source, with_dates=profile == "basic")
    for ds in exported:
        leaked = [v for v in _values(ds) for p in phi if p in v]
        assert not leaked, (ds.Modality, leaked)
        assert ds.PatientIdentityRemoved == "YES"
        codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert codes[0] == "113100"
        assert ("113107" in codes) == (profile == "research")
        assert ("113109" in codes) == ("113105" in codes) == (profile == "research")
        assert not [e for e in ds.iterall() if e.tag.is_private]
    sops = {ds.SOPInstanceUID for ds in exported}
    seg = next(ds for ds in exported if ds.Modality == "SEG")
    sr = next(ds for ds in exported if ds.Modality == "SR")
    refs = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence]
    assert refs and set(refs) <= sops
    sr_refs = {e.value for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert seg.SOPInstanceUID in sr_refs and sr_refs <= sops
    assert [b["kind"] for b in report.burned_in] == ["sc"]
    for name in report.files[:2] + report.files[-3:]:
        assert dciodvfy_errors(out / name) == [], name


def test_mapping_reproduces_the_originals(tmp_path, study):
    files, source = study
    out, report = _export(tmp_path, files, "retain-dates")
    mapping_file = Path(report.mapping)
    assert not mapping_file.is_relative_to(out)
    assert stat.S_IMODE(mapping_file.stat().st_mode) == 0o600
    mapping = json.loads(mapping_file.read_text())
    back = {new: old for old, new in mapping["uids"].items()}
    originals = {pydicom.dcmread(p).SOPInstanceUID: p for p in files.sources}
    for name in report.files[:len(files.sources)]:
        ds = pydicom.dcmread(out / name)
        original = pydicom.dcmread(originals[back[ds.SOPInstanceUID]])
        assert back[ds.StudyInstanceUID] == original.StudyInstanceUID
        assert back[ds.FrameOfReferenceUID] == original.FrameOfReferenceUID
        assert (ds.pixel_array == original.pixel_array).all()
    assert mapping["patients"] == {source.PatientID: ds.PatientID}


def test_no_mapping_writes_none_and_mapping_inside_export_refused(tmp_path, study):
    files, _ = study
    out, report = _export(tmp_path, files, "basic", mapping=False)
    assert report.mapping is None and not list(tmp_path.glob("*.json"))
    assert not [p for p in out.rglob("*") if p.suffix == ".json"]
    with pytest.raises(ExportError, match="inside the export"):
        export(ExportRequest((files,), out, Options(), "basic", out / "map.json"))
