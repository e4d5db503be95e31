"""Result objects of series with dirty-but-common patient and study headers (see
:mod:`dirty_headers`): every variant gives a SEG, SR and Secondary Capture that pass
dciodvfy, carry the cleaned values in UTF-8 and no private tag, an ORU^R01 that hl7apy
parses strictly, and warnings in ``warnings.json`` that name the attribute but not the
value; and HL7 escaping keeps a message's segments and fields whatever a DICOM value
holds."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from helpers.dirty_headers import PRIVATE_SECRET, VARIANTS, Variant, phi_values, write_variant
from helpers.results import MANIFEST, MODEL_ID, TruthRun, truth_run
from helpers.tools import dciodvfy_errors
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from aiworker.results.hl7 import build_oru, unescape
from aiworker.results.objects import write_results
from aiworker.results.patient import PatientStudy
from aiworker.results.report import SeriesInfo, report_text
from aiworker.store.layout import WARNINGS_FILE

STRICT = VALIDATION_LEVEL.STRICT


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TruthRun:
    """A small torn-ACL phantom's sagittal PD FS with its truth as the prediction."""
    return truth_run(tmp_path_factory.mktemp("dirty") / "study", seed=61, matrix=64)


def without_zds(text: str) -> str:
    return "\r".join(s for s in text.split("\r") if not s.startswith("ZDS|"))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_dirty_headers_make_valid_objects_and_warnings(run: TruthRun, variant: Variant,
                                                       tmp_path: Path) -> None:
    paths = write_variant(run.paths, variant, tmp_path / "series")
    files = write_results(tmp_path / "out", paths, run.loaded, run.labels, run.findings,
                          MANIFEST, MODEL_ID, secondary_capture=True)
    assert files.sc is not None
    for path in (files.seg, files.sr, files.sc):
        assert dciodvfy_errors(path) == [], path.name
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192", path.name
        assert not [e for e in ds if e.tag.is_private], path.name
        assert ds.get("PatientSex", "") in ("M", "F", "O", ""), path.name
        for keyword, value in variant.expect.items():
            assert str(ds.get(keyword, "") or "") == value, (path.name, keyword)
        assert "PatientComments" not in ds and "EthnicGroup" not in ds
    for path in (files.seg, files.sr, files.sc, files.hl7, files.report):
        assert PRIVATE_SECRET.encode() not in path.read_bytes(), path.name
    er7 = files.hl7.read_bytes().decode("utf-8")
    assert er7.count("\r") == len(er7.rstrip("\r").split("\r")) and "\n" not in er7
    message = parse_message(without_zds(er7), validation_level=STRICT, find_groups=True)
    assert message.validate()
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_8.to_er7() == variant.expect.get("PatientSex", pid.pid_8.to_er7())

    recorded = json.loads((files.seg.parent / WARNINGS_FILE).read_text(encoding="utf-8"))
    assert recorded == files.warnings
    assert {w["attribute"] for w in recorded} == set(variant.warned)
    text = json.dumps(recorded, ensure_ascii=False)
    for value in phi_values(variant):
        assert value not in text, value


def test_a_clean_series_writes_an_empty_warnings_file(run: TruthRun, tmp_path: Path) -> None:
    files = write_results(tmp_path / "out", run.paths, run.loaded, run.labels, run.findings,
                          MANIFEST, MODEL_ID)
    assert files.warnings == []
    assert json.loads((tmp_path / "out" / WARNINGS_FILE).read_text()) == []


DELIMITED = {"patient_name": "O|B^RI&EN~X\\Y\rZ^SIO\nBHAN",
             "patient_id": "ID|1^2&3~4\\5\r\n6",
             "accession_number": "AC|C^1&2~3\\4\r5",
             "study_description": "KNEE|RIGHT^MRI&PD~FS\\SAG\r\nOBX|1|TX|FAKE",
             "study_instance_uid": "1.2.3"}


def hl7_of(patient: PatientStudy, run: TruthRun) -> str:
    """The ORU^R01 of the truth run for ``patient``, the report from the same study."""
    source = pydicom.dcmread(run.paths[0])
    report = report_text(source, SeriesInfo.from_dataset(source), run.findings, MANIFEST,
                         patient=patient)
    return build_oru(source, run.findings, report, MANIFEST, MODEL_ID, patient=patient)


def test_hl7_delimiters_and_line_breaks_in_dicom_values_are_escaped(run: TruthRun) -> None:
    """Every delimiter and CR/LF in a DICOM value: same segments and fields as a clean
    message, and the parsed value unescapes to the original (CR and LF as spaces)."""
    clean = hl7_of(PatientStudy(patient_name="OBRIEN^SIOBHAN", patient_id="ID1",
                                accession_number="ACC1", study_description="KNEE",
                                study_instance_uid="1.2.3"), run)
    dirty = hl7_of(PatientStudy(**DELIMITED), run)
    shape = [(s[:3], s.count("|")) for s in clean.rstrip("\r").split("\r")]
    assert [(s[:3], s.count("|")) for s in dirty.rstrip("\r").split("\r")] == shape
    assert "\n" not in dirty
    message = parse_message(without_zds(dirty), validation_level=STRICT, find_groups=True)
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    order = message.oru_r01_patient_result.oru_r01_order_observation
    spaced = {k: v.replace("\r", " ").replace("\n", " ") for k, v in DELIMITED.items()}
    assert unescape(pid.pid_3.cx_1.to_er7()) == spaced["patient_id"]
    assert unescape(order.orc.orc_2.to_er7()) == spaced["accession_number"]
    assert unescape(order.obr.obr_3.to_er7()) == spaced["accession_number"]
    family, given = spaced["patient_name"].split("^")[:2]
    assert unescape(pid.pid_5.xpn_1.to_er7()) == family
    assert unescape(pid.pid_5.xpn_2.to_er7()) == given
    tx = [unescape(group.obx.obx_5.to_er7())
          for group in order.children.get("ORU_R01_OBSERVATION")
          if group.obx.obx_2.to_er7() == "TX"]
    assert any(spaced["study_description"] in line for line in tx)
