"""The HL7 v2.5.1 ORU^R01 of a job, built from a phantom study's DICOM header and findings
measured on its truth labels, read back with hl7apy's strict parser; and ACK reading.

hl7apy's strict parser cannot read a Z segment inside a group (it types every Z field as
ST, and its group finder loses the order group after one), so the tests parse the message
without its ZDS line strictly, check that the ZDS follows the OBR, and read the ZDS on its
own with hl7apy's tolerant segment parser.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers.results import MODEL_ID
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message, parse_segment
from pydicom.dataset import Dataset

from aiworker.infer.findings import volumes_ml
from aiworker.infer.manifest import Manifest, load_manifest
from aiworker.infer.preprocess import voxel_ml
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series
from aiworker.results.hl7 import Hl7Settings, build_oru, parse_ack
from aiworker.results.report import SeriesInfo, report_text
from aiworker.results.uids import message_control_id

MODEL_YAML = Path(__file__).parents[1] / "aiworker" / "models" / "knee_demo" / "model.yaml"
NAME = "O'BRIEN^SIOBHÁN"
SETTINGS = Hl7Settings(sending_application="AIWORKER", sending_facility="RADIOLOGY",
                       receiving_application="EPIC", receiving_facility="ST-MARYS",
                       service_code="MRKNEEAI", service_text="MR knee AI analysis")


STRICT = VALIDATION_LEVEL.STRICT


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MODEL_YAML)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, manifest: Manifest
        ) -> tuple[Dataset, dict[str, Any], str]:
    """(one instance of the truth series, findings on the truth labels, the report) of a
    small phantom study whose patient has a non-ASCII name."""
    study = write_study(tmp_path_factory.mktemp("study"), StudyOptions(
        seed=43, patient_name=NAME, acl="torn", rescan=False, derived=False,
        overrides=Overrides(matrix=(48, 64), slices=6), volume_spacing=1.5))
    source = pydicom.dcmread(truth_series(study).files[0])
    image = sitk.ReadImage(str(study.truth.labels))
    labels = sitk.GetArrayFromImage(image)
    labels = np.where(labels <= 11, labels, 0).astype(np.uint8)
    findings = {"model": MODEL_ID, "series_uid": str(source.SeriesInstanceUID),
                "volumes_ml": volumes_ml(labels, voxel_ml(image), manifest),
                "classification": {"acl": {"probability": 0.9731, "threshold": 0.5,
                                           "decision": "torn", "features": {}}}}
    report = report_text(source, SeriesInfo.from_dataset(source), findings, manifest)
    return source, findings, report


@pytest.fixture(scope="module")
def er7(job, manifest) -> str:
    source, findings, report = job
    return build_oru(source, findings, report, manifest, MODEL_ID, SETTINGS)


def without_zds(text: str) -> str:
    return "\r".join(s for s in text.split("\r") if not s.startswith("ZDS|"))


@pytest.fixture(scope="module")
def parsed(er7) -> Message:
    """The message without its ZDS, parsed and validated strictly."""
    message = parse_message(without_zds(er7), validation_level=STRICT, find_groups=True)
    assert message.validate()
    return message


def order(message: Message):
    return message.oru_r01_patient_result.oru_r01_order_observation


def observations(message: Message) -> list:
    return [group.obx for group in order(message).children.get("ORU_R01_OBSERVATION")]


def test_segments_come_in_order_ended_by_carriage_returns(er7):
    assert er7.endswith("\r") and "\n" not in er7
    names = [s[:3] for s in er7.rstrip("\r").split("\r")]
    assert names[:5] == ["MSH", "PID", "ORC", "OBR", "ZDS"]
    assert set(names[5:]) == {"OBX"}


def test_msh_names_the_parties_the_type_and_utf8(parsed, job):
    msh = parsed.msh
    assert msh.msh_3.to_er7() == "AIWORKER" and msh.msh_4.to_er7() == "RADIOLOGY"
    assert msh.msh_5.to_er7() == "EPIC" and msh.msh_6.to_er7() == "ST-MARYS"
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert msh.msh_10.to_er7() == message_control_id(str(job[0].SeriesInstanceUID), MODEL_ID)
    assert msh.msh_12.to_er7() == "2.5.1"
    assert msh.msh_18.to_er7() == "UNICODE UTF-8"


def test_pid_carries_the_dicom_patient_with_a_non_ascii_name(parsed, job):
    source = job[0]
    pid = parsed.oru_r01_patient_result.oru_r01_patient.pid
    assert str(source.PatientName) == NAME
    assert pid.pid_3.cx_1.to_er7() == str(source.PatientID)
    assert pid.pid_5.xpn_1.to_er7() == "O'BRIEN"
    assert pid.pid_5.xpn_2.to_er7() == "SIOBHÁN"
    assert pid.pid_7.to_er7() == str(source.PatientBirthDate)
    assert pid.pid_8.to_er7() == str(source.PatientSex)


def test_an_ideographic_name_follows_as_a_second_repetition(job, manifest):
    source, findings, report = job
    other = Dataset()
    other.update(source)
    other.PatientName = "YAMADA^TARO=山田^太郎"
    text = build_oru(other, findings, report, manifest, MODEL_ID, SETTINGS)
    pid = parse_message(without_zds(text), validation_level=STRICT, find_groups=True
                        ).oru_r01_patient_result.oru_r01_patient.pid
    names = pid.children.get("PID_5")
    assert [n.to_er7() for n in names] == ["YAMADA^TARO^^^^^L", "山田^太郎^^^^^L^I"]


def test_orc_and_obr_carry_the_accession_service_date_and_status(parsed, job):
    source = job[0]
    accession = str(source.AccessionNumber)
    orc, obr = order(parsed).orc, order(parsed).obr
    assert orc.orc_1.to_er7() == "RE"
    assert orc.orc_2.to_er7() == accession and orc.orc_3.to_er7() == accession
    assert obr.obr_2.to_er7() == accession and obr.obr_3.to_er7() == accession
    assert obr.obr_4.to_er7() == "MRKNEEAI^MR knee AI analysis^99AIW"
    assert obr.obr_7.to_er7() == f"{source.StudyDate}{str(source.StudyTime)[:6]}"
    assert obr.obr_25.to_er7() == "P"


def test_obx_rows_carry_the_acl_finding_probability_and_volumes(parsed, job, manifest):
    findings = job[1]
    rows = observations(parsed)
    assert [r.obx_1.to_er7() for r in rows] == [str(k) for k in range(1, len(rows) + 1)]
    assert {r.obx_11.to_er7() for r in rows} == {"P"}
    acl, probability, *rest = rows
    assert acl.obx_2.to_er7() == "CWE"
    assert acl.obx_5.to_er7() == "ACL-TORN^Anterior cruciate ligament torn^99AIW"
    assert probability.obx_2.to_er7() == "NM"
    assert float(probability.obx_5.to_er7()) == findings["classification"]["acl"]["probability"]
    assert probability.obx_6.to_er7() == "1^1^UCUM"
    volumes = {r.obx_3.to_er7().split("^")[1]: r for r in rest if r.obx_2.to_er7() == "NM"}
    names = [label.name for label in manifest.outputs.segmentation.labels]
    assert list(volumes) == [f"{name} volume" for name in names]
    for name in names:
        row = volumes[f"{name} volume"]
        assert float(row.obx_5.to_er7()) == findings["volumes_ml"][name]
        assert row.obx_6.to_er7() == "mL^mL^UCUM"
    assert findings["volumes_ml"]["Femur"] > 0


def test_tx_rows_are_the_report_line_by_line(parsed, job):
    report = job[2]
    rows = [r for r in observations(parsed) if r.obx_2.to_er7() == "TX"]
    assert [r.obx_5.to_er7() for r in rows] == report.rstrip("\n").split("\n")
    assert rows[0].obx_5.to_er7() == "EXAM"


def test_zds_carries_the_study_instance_uid_as_ihe_does(er7, job):
    zds = next(s for s in er7.split("\r") if s.startswith("ZDS|"))
    pointer = parse_segment(zds, version="2.5.1").zds_1
    assert [c.to_er7() for c in pointer.children] == [
        str(job[0].StudyInstanceUID), "AIWORKER", "Application", "DICOM"]


def test_the_control_id_is_stable_across_builds_and_times(job, manifest, er7):
    source, findings, report = job
    later = build_oru(source, findings, report, manifest, MODEL_ID, SETTINGS,
                      created=datetime(2030, 1, 1, tzinfo=UTC))
    control = [s.split("|")[9] for s in (er7, later)]
    assert control[0] == control[1]
    other = build_oru(source, findings, report, manifest, "knee-demo@3.0.0", SETTINGS)
    assert other.split("|")[9] != control[0]


def test_delimiters_in_text_are_escaped(job, manifest):
    source, findings, _ = job
    text = build_oru(source, findings, "A & B ^ C | D ~ E \\ F\n", manifest, MODEL_ID,
                     {"service_text": "MR & AI"})
    message = parse_message(without_zds(text), validation_level=STRICT, find_groups=True)
    tx = [r for r in observations(message) if r.obx_2.to_er7() == "TX"]
    assert [r.obx_5.to_er7() for r in tx] == ["A \\T\\ B \\S\\ C \\F\\ D \\R\\ E \\E\\ F"]
    assert order(message).obr.obr_4.obr_4_2.to_er7() == "MR \\T\\ AI"


def ack(code: str, *tail: str) -> str:
    return "\r".join(["MSH|^~\\&|RIS|HOSP|AIWORKER|RAD|20240102080000||ACK^R01^ACK|A1|P|2.5.1",
                      f"MSA|{code}|5E81D35260CEF4000857", *tail]) + "\r"


def test_parse_ack_reads_the_code_and_the_reason():
    assert parse_ack(ack("AA")) == ("AA", "")
    assert parse_ack(ack("AR").replace("4000857", "4000857|unknown patient")) == \
        ("AR", "unknown patient")
    assert parse_ack(ack("AE", "ERR||PID^1^3|101^Required field missing^HL70357|E||||"
                               "PatientID missing")) == ("AE", "PatientID missing")
    assert parse_ack(ack("CE", "ERR||PID^1^3|101^Required field missing^HL70357|E")) == \
        ("CE", "Required field missing")


@pytest.mark.parametrize("text", ["", "hello", ack("XX"),
                                  "MSH|^~\\&|RIS|H|A|B|20240102||ACK|1|P|2.5.1\r"])
def test_parse_ack_rejects_what_is_no_ack(text):
    with pytest.raises(ValueError):
        parse_ack(text)
