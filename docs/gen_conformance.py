"""The DICOM Conformance Statement's and the HL7 page's generated parts, from the node's own
lists: the SOP classes and transfer syntaxes the SCP accepts (pynetdicom's unrestricted
storage service, as :mod:`aiworker.receive.scp` configures it, and the AE it builds), the
C-STORE statuses it answers (the table in that module's docstring, held to its status
constants by tests/test_conformance.py), the SOP classes, transfer syntaxes and modules of
the objects the SCU sends (:mod:`aiworker.results`), and an ORU^R01 built by
:func:`aiworker.results.hl7.build_oru`."""

from __future__ import annotations

import re
import types
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID_dictionary
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from aiworker.config_loader import load_config
from aiworker.infer.manifest import load_manifest
from aiworker.receive import scp
from aiworker.receive.dataset import IMPLEMENTATION_VERSION
from aiworker.results import patient, preview, seg, sr
from aiworker.results.hl7 import build_oru
from aiworker.results.report import SeriesInfo, report_text

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "aiworker.yaml"
MODEL = REPO / "aiworker" / "models" / "knee_demo" / "model.yaml"

# The objects the node sends by C-STORE (destinations' ``accepts``): SOP class and the
# transfer syntax its file is written in.
SENT_OBJECTS: dict[str, tuple[UID, UID]] = {
    "seg": (seg.SOP_CLASSES["binary"], seg.TRANSFER_SYNTAX),
    "sr": (sr.SOP_CLASS, sr.TRANSFER_SYNTAX),
    "sc": (preview.SOP_CLASS, preview.TRANSFER_SYNTAX),
}
# aiworker.dispatch.outbox proposes each file's own syntax first, then these (the test
# watches a real association to hold the table to it).
SCU_FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Transfer syntaxes pydicom knows whose data sets the node still cannot store, and why.
STORED_NOTES = {
    "1.2.840.10008.1.2.4.94": "image instances carry no Pixel Data in this syntax: 0xA900",
    "1.2.840.10008.1.2.4.95": "not inflated (pydicom does not mark it deflated): 0xC210; "
                              "image instances without Pixel Data: 0xA900",
    "1.2.840.10008.1.2.4.204": "image instances carry no Pixel Data in this syntax: 0xA900",
    "1.2.840.10008.1.2.4.205": "not inflated (pydicom does not mark it deflated): 0xC210; "
                               "image instances without Pixel Data: 0xA900",
}
# Modules of usage U or C the created objects carry (tests check each object against it).
# (patient-study: only Patient's Age, when the source has one.)
OPTIONAL_MODULES_WRITTEN = {
    "seg": {"patient-study", "frame-of-reference", "general-reference",
            "common-instance-reference"},
    "sr": {"patient-study"},
    "sc": {"patient-study", "general-equipment", "general-reference"},
}
EXAMPLE_VOLUMES_ML = (169.416, 143.555, 22.777, 11.336, 24.798, 3.126, 5.125, 3.807, 3.828,
                      1.553, 2.51)  # knee-demo's labels in manifest order, as a phantom gives
OBJECT_NAMES = {"seg": "Segmentation (SEG)", "sr": "Comprehensive 3D SR (TID 1500)",
                "sc": "Secondary Capture (preview)"}


def node_ae():
    """The AE the node's receiver builds from the shipped configuration."""
    config = load_config(SHIPPED, environ={})
    return scp.Receiver.build_ae(types.SimpleNamespace(config=config)), config


def storage_sop_classes() -> list[UID]:
    """Every storage SOP class the SCP accepts by UID (pynetdicom's storage service list;
    private and unknown UIDs are accepted as well)."""
    return [UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


def stored_transfer_syntaxes() -> list[UID]:
    """The transfer syntaxes a received instance is stored in: every one pydicom knows
    (the SCP's check is ``UID.is_transfer_syntax``)."""
    return [UID(uid) for uid in UID_dictionary if UID(uid).is_transfer_syntax]


def verification_syntaxes() -> list[UID]:
    """The transfer syntaxes the SCP accepts for Verification."""
    ae, _ = node_ae()
    (context,) = [cx for cx in ae.supported_contexts if cx.abstract_syntax == Verification]
    return [UID(ts) for ts in context.transfer_syntax]


def scu_proposals() -> dict[str, list[UID]]:
    """Object kind -> the transfer syntaxes its presentation context proposes, in order."""
    return {kind: list(dict.fromkeys([own, *SCU_FALLBACK_SYNTAXES]))
            for kind, (_, own) in SENT_OBJECTS.items()}


def store_statuses() -> dict[int, str]:
    """Status -> meaning: success, then the table of :mod:`aiworker.receive.scp`."""
    lines = (scp.__doc__ or "").splitlines()
    rules = [n for n, line in enumerate(lines) if line.startswith("=") and not line.strip("= ")]
    table = lines[rules[0] + 1:rules[1]] if len(rules) >= 2 else []
    statuses: dict[int, str] = {0x0000: "success: the instance is in the spool (written, "
                                        "fsynced, renamed) and recorded in the state DB"}
    code = None
    for line in table:
        found = re.match(r"^0x([0-9A-F]{4})\s+(.*)$", line)
        if found:
            code = int(found.group(1), 16)
            statuses[code] = found.group(2).strip()
        elif code is not None and line.strip():
            statuses[code] += " " + line.strip()
    return {k: v.replace("``", "`") for k, v in statuses.items()}


def _name(uid: UID) -> str:
    """PS3.6's name of ``uid``; for a UID newer than pydicom's dictionary, pynetdicom's
    keyword as words."""
    if uid.name == str(uid):
        from pynetdicom.sop_class import _STORAGE_CLASSES

        keyword = next((k for k, v in _STORAGE_CLASSES.items() if v == uid), "")
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", keyword) or str(uid)
    retired = UID_dictionary.get(uid, ("", "", "", ""))[3]
    return uid.name + (" (retired)" if retired else "")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def scp_sop_classes_table() -> str:
    rows = [(Verification.name, f"`{Verification}`", "SCP", "C-ECHO")]
    rows += [(_name(uid), f"`{uid}`", "SCP", "C-STORE") for uid in storage_sop_classes()]
    rows.append(("any private SOP class, or a public UID pynetdicom does not know",
                 "(any)", "SCP", "C-STORE"))
    return _table(("SOP class", "UID", "role", "DIMSE"), rows)


def scp_transfer_syntaxes_table() -> str:
    rows = [(_name(ts), f"`{ts}`", STORED_NOTES.get(str(ts), ""))
            for ts in stored_transfer_syntaxes()]
    return _table(("transfer syntax", "UID", "note"), rows)


def verification_syntaxes_table() -> str:
    return _table(("transfer syntax", "UID"),
                  [(_name(ts), f"`{ts}`") for ts in verification_syntaxes()])


def scu_table() -> str:
    rows = []
    for kind, (sop_class, _) in SENT_OBJECTS.items():
        proposed = ", ".join(f"{_name(ts)} (`{ts}`)" for ts in scu_proposals()[kind])
        rows.append((f"`{kind}`", _name(sop_class), f"`{sop_class}`", proposed))
    rows.append(("(`aiworker echo`)", Verification.name, f"`{Verification}`",
                 "pynetdicom's default list"))
    return _table(("object", "SOP class", "UID", "transfer syntaxes proposed, in order"), rows)


def store_statuses_table() -> str:
    rows = [(f"0x{code:04X}", "success" if code == 0 else
             "failure (" + ("PS3.4" if code in (0xA700, 0xA900) else "0xC2xx: this node's")
             + ")", meaning) for code, meaning in store_statuses().items()]
    return _table(("status", "kind", "meaning"), rows)


def identifiers_table() -> str:
    ae, config = node_ae()
    rows = [("Implementation Class UID (association)", f"`{PYNETDICOM_IMPLEMENTATION_UID}`"),
            ("Implementation Version Name (association)", f"`{PYNETDICOM_IMPLEMENTATION_VERSION}`"),
            ("Implementation Version Name (file meta of stored instances)",
             f"`{IMPLEMENTATION_VERSION}`"),
            ("AE title (`node.ae_title`)", f"`{config.node.ae_title}`"),
            ("port (`node.port`)", str(config.node.port)),
            ("maximum PDU received (`node.max_pdu_bytes`)", str(ae.maximum_pdu_size)),
            ("simultaneous associations accepted (`node.max_associations`)",
             str(config.node.max_associations)),
            ("ARTIM / ACSE timeout, s (`node.acse_timeout_s`)", f"{ae.acse_timeout:g}"),
            ("DIMSE timeout, s (`node.dimse_timeout_s`)", f"{ae.dimse_timeout:g}"),
            ("network timeout, s (`node.network_timeout_s`)", f"{ae.network_timeout:g}"),
            ("Called AE Title must match", "yes" if ae.require_called_aet else "no")]
    return _table(("item", "value (shipped configuration)"), rows)


def iod_modules(kind: str) -> list[tuple[str, str, str]]:
    """(information entity, module, usage) of the IOD of ``kind`` (highdicom's tables)."""
    from highdicom._standard_utils import get_iod_module_map, get_sop_class_iod_map

    iod = get_sop_class_iod_map()[str(SENT_OBJECTS[kind][0])]
    return [(m["ie"], m["key"], m["usage"]) for m in get_iod_module_map()[iod]]


def iod_modules_tables() -> str:
    out = []
    for kind in SENT_OBJECTS:
        out.append(f"#### {OBJECT_NAMES[kind]}\n")
        rows = [(ie, module, usage, "yes" if usage == "M"
                 or module in OPTIONAL_MODULES_WRITTEN[kind] else "no")
                for ie, module, usage in iod_modules(kind)]
        out.append(_table(("IE", "module", "usage", "written"), rows))
    return "\n".join(out)


def segments_table() -> str:
    """The SEG's segments and their codes, from the bundled model's manifest."""
    manifest = load_manifest(MODEL)
    labels = manifest.outputs.segmentation.labels if manifest.outputs.segmentation else []

    def code(c) -> str:
        return f"({c.value}, {c.scheme_designator}, \"{c.meaning}\")" if c else ""

    return _table(("segment", "label", "property category", "property type",
                   "anatomic region"),
                  [(str(n), label.name, code(label.category), code(label.type),
                    code(label.anatomic_region)) for n, label in enumerate(labels, start=1)])


def example_oru() -> str:
    """An ORU^R01 as :func:`build_oru` makes it, for a made-up patient and run."""
    manifest = load_manifest(MODEL)
    ds = Dataset()
    ds.SpecificCharacterSet = patient.RESULT_CHARACTER_SET
    ds.PatientName, ds.PatientID = "DOE^JANE", "PAT-0001"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240109", "133700", "ACC-42"
    ds.StudyDescription, ds.SeriesDescription, ds.SeriesNumber = "MR KNEE RIGHT", "PD FS SAG", 5
    labels = manifest.outputs.segmentation.labels if manifest.outputs.segmentation else []
    findings = {"volumes_ml": dict(zip((label.name for label in labels), EXAMPLE_VOLUMES_ML,
                                       strict=False)),
                "classification": {"acl": {"probability": 0.91, "threshold": 0.5,
                                           "decision": "torn"}}}
    report = report_text(ds, SeriesInfo.from_dataset(ds), findings, manifest)
    message = build_oru(ds, findings, report, manifest, "knee-demo@2.2.0",
                        created=datetime(2024, 1, 9, 14, 2, 11, tzinfo=UTC))
    return "```text\n" + message.replace("\r", "\n") + "```\n"


def ack_outcomes_table() -> str:
    """MSA-1 -> what the outbox does (:data:`aiworker.dispatch.mllp.OUTCOMES`)."""
    from aiworker.dispatch import mllp

    meaning = {mllp.DELIVERED: "sent: the row is done",
               mllp.RETRY: "failed attempt: sent again after the backoff, until the horizon",
               mllp.DEAD: "dead at once: the same message cannot succeed; resend by hand"}
    return _table(("MSA-1", "outbox", "meaning"),
                  [(f"`{code}`", outcome, meaning[outcome])
                   for code, outcome in mllp.OUTCOMES.items()])


GENERATED = {
    "scp-sop-classes": scp_sop_classes_table,
    "scp-transfer-syntaxes": scp_transfer_syntaxes_table,
    "verification-transfer-syntaxes": verification_syntaxes_table,
    "scu-sop-classes": scu_table,
    "store-statuses": store_statuses_table,
    "implementation-identifiers": identifiers_table,
    "iod-modules": iod_modules_tables,
    "seg-segments": segments_table,
    "hl7-example": example_oru,
    "hl7-ack-outcomes": ack_outcomes_table,
}
