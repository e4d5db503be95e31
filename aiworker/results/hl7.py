"""The HL7 v2.5.1 ORU^R01 message of a job, built with hl7apy, and the reading of its ACK.

One message per job, segments in this order::

    MSH  sending/receiving application and facility from :class:`Hl7Settings`,
         MSH-10 = uids.message_control_id(series, model), MSH-18 UNICODE UTF-8
    PID  PID-3 PatientID, PID-5 the DICOM name as family^given^middle^suffix^prefix
         (the alphabetic group; an ideographic or phonetic group follows as a repetition
         with XPN-8 I or P), PID-7 birth date, PID-8 sex
    ORC  ORC-1 RE, ORC-2/3 the accession number
    OBR  OBR-2/3 the accession number (placer and filler order number), OBR-4 the
         universal service ID, OBR-7 StudyDate + StudyTime, OBR-25 P (preliminary)
    ZDS  ZDS-1 <StudyInstanceUID>^<sending application>^Application^DICOM (IHE)
    OBX  CWE: the ACL finding (torn or intact, local codes of :data:`CODE_SYSTEM`)
    OBX  NM: the probability of an ACL tear, unit UCUM "1"
    OBX  NM: the volume of every structure of the model, unit UCUM "mL"
    OBX  TX: the text report, one OBX per line

Every OBX has result status P. A result the quality gate (:mod:`aiworker.infer.gate`) found
not assessable makes no tear or intact claim: the ACL OBX is TX ``not assessable: <reason>``
(one OBX per reason), and the probability and the volume of every structure that is not
assessable carry no value and result status X (HL7 table 0085: "Results cannot be obtained
for this observation"). Observation identifiers are local codes (HL7 table 0396 "99zzz")
of :data:`CODE_SYSTEM`.

hl7apy builds and validates every standard segment; it neither writes nor reads a Z
segment inside a group (its ER7 writer and its group finder skip segments its structure
tables do not list), so the ZDS segment is built by hl7apy alone and placed after the OBR
in the ER7 text. The patient and study come from
:class:`~aiworker.results.patient.PatientStudy` (the source header, cleaned). Every value
taken from DICOM or the settings goes through :func:`escape`: the message's delimiters
become HL7's escape sequences (``|`` ``\\F\\``, ``^`` ``\\S\\``, ``&`` ``\\T\\``, ``~``
``\\R\\``, ``\\`` ``\\E\\``) and control characters (CR, LF, TAB, the MLLP framing bytes
0x0B and 0x1C...) become spaces, so no value can end a segment, split a field or break the
MLLP frame. Spaces, not ``\\X0D\\`` or ``\\.br\\``: hl7apy's writer re-escapes every escape
sequence but F, S, T, R, E, H and N. hl7apy's own escaping is not used: it applies only to
values assigned as datatype objects and leaves a backslash that already looks like an
escape sequence as it is, so a value would not come back unchanged. :func:`unescape` is its
inverse; the message is meant to be sent in UTF-8.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Field, Message, Segment
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset

from aiworker.infer import gate
from aiworker.infer.manifest import Manifest
from aiworker.results.patient import PatientStudy, read_patient_study
from aiworker.results.uids import message_control_id

VERSION = "2.5.1"
STRICT = VALIDATION_LEVEL.STRICT
CODE_SYSTEM = "99AIW"
SEGMENT_SEPARATOR = "\r"
ACL_CODES = {"torn": ("ACL-TORN", "Anterior cruciate ligament torn"),
             "intact": ("ACL-INTACT", "Anterior cruciate ligament intact")}
CANNOT_BE_OBTAINED = "X"  # OBX-11, HL7 table 0085: results cannot be obtained
MAX_TEXT = 180  # characters of one reason in an OBX (hl7apy's TX limit is 199, escapes grow)
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
_UNESCAPES = {sequence: char for char, sequence in _ESCAPES}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SEQUENCE = re.compile(r"\\[EFSTR]\\")


@dataclass(frozen=True)
class Hl7Settings:
    """Who sends and receives the message, and the order's universal service ID."""

    sending_application: str = "AIWORKER"
    sending_facility: str = "AIWORKER"
    receiving_application: str = "RIS"
    receiving_facility: str = "HOSPITAL"
    service_code: str = "AIKNEE"
    service_text: str = "AI knee MRI analysis"
    service_coding_system: str = CODE_SYSTEM
    processing_id: str = "P"

    @classmethod
    def of(cls, settings: Hl7Settings | Mapping[str, Any] | None) -> Hl7Settings:
        """``settings`` as :class:`Hl7Settings` (a mapping gives some or all fields)."""
        if settings is None:
            return cls()
        return settings if isinstance(settings, cls) else cls(**settings)


def escape(text: str) -> str:
    """``text`` as one HL7 value: its control characters (CR, LF, ...) as spaces, the
    message's delimiters (``| ^ & ~ \\``) as their escape sequences."""
    text = _CONTROL.sub(" ", text)
    for char, sequence in _ESCAPES:
        text = text.replace(char, sequence)
    return text


def unescape(text: str) -> str:
    """The value an escaped HL7 text stands for (the inverse of :func:`escape` but for the
    control characters it made spaces)."""
    return _SEQUENCE.sub(lambda match: _UNESCAPES[match.group(0)], text)


def build_oru(source_dataset: Dataset, findings: dict[str, Any], report: str,
              manifest: Manifest, model_id: str,
              settings: Hl7Settings | Mapping[str, Any] | None = None,
              created: datetime | None = None, *, patient: PatientStudy | None = None
              ) -> str:
    """The ORU^R01 (ER7, segments ended by ``\\r``) reporting ``findings`` and ``report``
    of ``model_id`` on the series of ``source_dataset``; ``created`` (default: now) is
    MSH-7; ``patient`` (default: read from ``source_dataset``) the patient and study."""
    settings = Hl7Settings.of(settings)
    patient = patient or read_patient_study(source_dataset)
    message = Message("ORU_R01", version=VERSION, validation_level=STRICT)
    _msh(message.msh, source_dataset, model_id, settings, created)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT").add_segment("PID"), patient)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _orc(order.add_segment("ORC"), patient)
    _obr(order.add_segment("OBR"), patient, settings)
    for number, (kind, code, value, unit, status) in enumerate(
            _observations(findings, report, manifest), start=1):
        _obx(order.add_group("ORU_R01_OBSERVATION").add_segment("OBX"),
             number, kind, code, value, unit, status)
    message.validate()
    segments = message.to_er7().split(SEGMENT_SEPARATOR)
    at = next(k for k, s in enumerate(segments) if s.startswith("OBR|")) + 1
    segments.insert(at, zds(patient, settings).to_er7())
    return SEGMENT_SEPARATOR.join(segments) + SEGMENT_SEPARATOR


def _msh(msh: Segment, ds: Dataset, model_id: str, settings: Hl7Settings,
         created: datetime | None) -> None:
    """Header: parties, type, control id, processing id, version, character set."""
    msh.msh_3 = escape(settings.sending_application)
    msh.msh_4 = escape(settings.sending_facility)
    msh.msh_5 = escape(settings.receiving_application)
    msh.msh_6 = escape(settings.receiving_facility)
    msh.msh_7 = (created or datetime.now(UTC)).strftime("%Y%m%d%H%M%S%z")
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = message_control_id(str(ds.SeriesInstanceUID), model_id)
    msh.msh_11 = settings.processing_id
    msh.msh_18 = "UNICODE UTF-8"


def _pid(pid: Segment, patient: PatientStudy) -> None:
    """Patient identification from the DICOM patient module."""
    pid.pid_1 = "1"
    pid.pid_3 = escape(patient.patient_id) or '""'  # required: HL7's explicit null
    for name in patient_names(patient.patient_name):
        pid.add_field("PID_5").value = name
    if patient.patient_birth_date:
        pid.pid_7 = escape(patient.patient_birth_date)
    if patient.patient_sex:
        pid.pid_8 = escape(patient.patient_sex)


def patient_names(name: str) -> list[str]:
    """PID-5 repetitions (XPN) of a DICOM PN value: the alphabetic group as the legal
    name, then the ideographic and phonetic groups, if any, with XPN-8 ``I`` and ``P``."""
    if not name:
        return []
    alphabetic, ideographic, phonetic = (name.split("=") + ["", ""])[:3]
    groups = (("", alphabetic), ("I", ideographic), ("P", phonetic))
    names = []
    for representation, group in groups:
        parts = (group.split("^") + [""] * 5)[:5] if group else []
        if not any(parts):
            continue
        family, given, middle, prefix, suffix = (escape(p) for p in parts)
        names.append("^".join([family, given, middle, suffix, prefix, "", "L",
                               representation]).rstrip("^"))
    return names


def _orc(orc: Segment, patient: PatientStudy) -> None:
    """Common order: a result (RE) of the order the accession number names."""
    orc.orc_1 = "RE"
    accession = escape(patient.accession_number)
    if accession:
        orc.orc_2 = accession
        orc.orc_3 = accession


def _obr(obr: Segment, patient: PatientStudy, settings: Hl7Settings) -> None:
    """Observation request: order numbers, service, study date-time, status P."""
    obr.obr_1 = "1"
    accession = escape(patient.accession_number)
    if accession:
        obr.obr_2 = accession
        obr.obr_3 = accession
    obr.obr_4 = "^".join(escape(v) for v in (settings.service_code, settings.service_text,
                                             settings.service_coding_system))
    when = study_datetime(patient)
    if when:
        obr.obr_7 = when
    obr.obr_25 = "P"


def study_datetime(patient: PatientStudy) -> str:
    """StudyDate + StudyTime as an HL7 TS (``YYYYMMDD[HHMM[SS]]``); empty without a date."""
    date = patient.study_date
    if len(date) != 8 or not date.isdigit():
        return ""
    time = patient.study_time.split(".")[0]
    return date + (time[:6] if time.isdigit() and len(time) in (2, 4, 6) else "")


def zds(patient: PatientStudy, settings: Hl7Settings) -> Segment:
    """The IHE ZDS segment: ZDS-1 (RP) points to the study by its Study Instance UID."""
    segment = Segment("ZDS", version=VERSION, validation_level=STRICT)
    pointer = Field("ZDS_1", datatype="RP", version=VERSION, validation_level=STRICT)
    pointer.rp_1 = escape(patient.study_instance_uid)
    pointer.rp_2 = escape(settings.sending_application)
    pointer.rp_3 = "Application"
    pointer.rp_4 = "DICOM"
    segment.add(pointer)
    return segment


def _observations(findings: dict[str, Any], report: str, manifest: Manifest
                  ) -> list[tuple[str, str, str, str, str]]:
    """(value type, OBX-3, OBX-5, OBX-6, OBX-11) of every OBX, in message order."""
    rows = []
    acl = findings.get("classification", {}).get("acl")
    probability = _code("ACL-TEAR-P", "Probability of ACL tear")
    if acl is not None and gate.finding_reasons(findings, "acl"):
        for reason in gate.finding_reasons(findings, "acl"):  # one OBX each: TX <= 199
            text = gate.reason_text([reason])
            text = text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 3] + "..."
            rows.append(("TX", _code("ACL", "ACL assessment"), escape(text), "", "P"))
        rows.append(("NM", probability, "", "", CANNOT_BE_OBTAINED))
    elif acl is not None:
        code, text = ACL_CODES["torn" if acl["decision"] == "torn" else "intact"]
        rows.append(("CWE", _code("ACL", "ACL assessment"), _code(code, text), "", "P"))
        rows.append(("NM", probability, _number(acl["probability"]), "1^1^UCUM", "P"))
    volumes = findings.get("volumes_ml", {})
    labels = manifest.outputs.segmentation.labels if manifest.outputs.segmentation else []
    for label in labels:
        code = _code(volume_code(label.name), f"{label.name} volume")
        if gate.structure_reasons(findings, label.name):
            rows.append(("NM", code, "", "", CANNOT_BE_OBTAINED))
        else:
            rows.append(("NM", code, _number(volumes.get(label.name, 0.0)), "mL^mL^UCUM", "P"))
    for line in report.rstrip("\n").split("\n"):
        rows.append(("TX", _code("REPORT", "AI report text"), escape(line), "", "P"))
    return rows


def volume_code(name: str) -> str:
    """The local observation code of a structure's volume: ``VOL-FEMORAL-CARTILAGE``."""
    return "VOL-" + "-".join(name.upper().split())


def _code(code: str, text: str) -> str:
    """A CWE/CE value of :data:`CODE_SYSTEM`."""
    return f"{escape(code)}^{escape(text)}^{CODE_SYSTEM}"


def _number(value: float) -> str:
    """An NM value: the number as the findings hold it, without an exponent."""
    return format(float(value), "f").rstrip("0").rstrip(".") or "0"


def _obx(obx: Segment, number: int, kind: str, code: str, value: str, unit: str,
         status: str = "P") -> None:
    """One observation: preliminary (status P), or X when it cannot be obtained."""
    obx.obx_1 = str(number)
    obx.obx_2 = kind
    obx.obx_3 = code
    if value:
        obx.obx_5 = value
    if unit:
        obx.obx_6 = unit
    obx.obx_11 = status


def parse_ack(text: str) -> tuple[str, str]:
    """(MSA-1 acknowledgment code, reason) of an HL7 ACK; the reason is MSA-3, else the
    ERR segment's user message (ERR-8) or error code text (ERR-3.2), else empty. Raise
    ValueError when ``text`` is no ACK."""
    text = text.strip("\x0b\x1c\r\n").replace("\r\n", "\r").replace("\n", "\r")
    try:
        ack = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    except HL7apyException as error:
        raise ValueError(f"not an HL7 message: {error}") from error
    msa = ack.children.get("MSA")
    if not msa:
        raise ValueError("no MSA segment in the acknowledgment")
    code = msa[0].msa_1.to_er7().strip().upper()
    if code not in ACK_CODES:
        raise ValueError(f"MSA-1 is {code!r}, not one of {', '.join(ACK_CODES)}")
    reason = msa[0].msa_3.to_er7().strip()
    for err in ack.children.get("ERR") or []:
        reason = reason or err.err_8.to_er7().strip() or err.err_3.err_3_2.to_er7().strip()
    return code, reason
