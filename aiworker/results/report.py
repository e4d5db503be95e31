"""The text report of a job: what a radiologist would read, in plain text.

The report has five parts, in this order, each under its heading:

* ``EXAM``: the study description and the study date (and time);
* ``TECHNIQUE``: the series analysed (description and number) and the model
  (``name@version``);
* ``FINDINGS``: the ACL (intact or torn, with the model's probability of a tear), the PCL,
  the menisci and the cartilage with their volumes in mL, the bones, and a line naming
  every structure the model could not assess (a structure of 0 mL is "not identified");
* ``IMPRESSION``: numbered, short statements, the ACL first;

a classification head other than the ACL's gets a line of its own in both (its decision and
the probability of its positive class); a classification-only model (no segmentation) has
no volumes and no "not assessed" line of structures;
* the fixed :data:`DISCLAIMER`, on one line of its own.

A result the quality gate (:mod:`aiworker.infer.gate`) found not assessable says so instead
of any finding: ``FINDINGS`` and ``IMPRESSION`` read ``Not assessable: <reason>`` and name no
tear, no intact ligament and no volume. A structure that alone is not assessable is left out
of the volumes and named with its reason; an ACL measured on one reads ``not assessable:
<reason>``.

Lines are wrapped at :data:`WIDTH` columns (the disclaimer is kept whole). The body names no
patient: the HL7 PID segment and the DICOM patient module carry who the report is about.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset

from aiworker.infer import gate
from aiworker.infer.manifest import Manifest
from aiworker.results.patient import PatientStudy, read_patient_study

WIDTH = 72
DISCLAIMER = "Preliminary AI result, not verified by a radiologist, not for diagnostic use."
ACL, PCL = "ACL", "PCL"
GROUPS = (("Menisci", "meniscus"), ("Cartilage", "cartilage"))


@dataclass(frozen=True)
class SeriesInfo:
    """The series a model analysed, as the report names it."""

    description: str
    number: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> SeriesInfo:
        """The series of the instance ``ds``."""
        number = ds.get("SeriesNumber")
        return cls(str(ds.get("SeriesDescription", "") or "").strip(),
                   int(number) if number not in (None, "") else None)


def report_text(source_dataset: Dataset, series_info: SeriesInfo, findings: dict[str, Any],
                manifest: Manifest, *, patient: PatientStudy | None = None) -> str:
    """The report of ``findings`` (the infer stage's findings dict) made by ``manifest``'s
    model on the series ``series_info`` of the study of ``source_dataset`` (its study as
    ``patient`` gives it, default: read from ``source_dataset``)."""
    volumes = _volumes(findings, manifest)
    acl = findings.get("classification", {}).get("acl")
    whole = gate.whole_reasons(findings)
    if whole:
        found = [_upper_first(gate.reason_text(whole)) + ". No finding is reported: the "
                 "series is outside what the model was trained on."]
        impression = [f"1. {_upper_first(gate.reason_text(whole))}."]
    else:
        unassessable = {name: gate.structure_reasons(findings, name) for name in volumes}
        unassessable = {name: reasons for name, reasons in unassessable.items() if reasons}
        kept = {name: v for name, v in volumes.items() if name not in unassessable}
        others = _other_heads(findings)
        found = _findings(kept, acl, manifest.outputs.segmentation is not None) + [
            f"{name}: {gate.reason_text(reasons)}." for name, reasons in unassessable.items()]
        found[1:1] = others
        impression = _impression(kept, acl, others)
    sections = [
        ("EXAM", [_exam(patient or read_patient_study(source_dataset))]),
        ("TECHNIQUE", [_technique(series_info, manifest)]),
        ("FINDINGS", found),
        ("IMPRESSION", impression),
    ]
    lines: list[str] = []
    for heading, paragraphs in sections:
        lines += [heading, *(row for p in paragraphs for row in _wrap(p)), ""]
    return "\n".join([*lines, DISCLAIMER]) + "\n"


def _volumes(findings: dict[str, Any], manifest: Manifest) -> dict[str, float]:
    """Volume (mL) of every label of the manifest, in the manifest's order."""
    measured = findings.get("volumes_ml", {})
    labels = manifest.outputs.segmentation.labels if manifest.outputs.segmentation else []
    return {label.name: float(measured.get(label.name, 0.0)) for label in labels}


def _exam(patient: PatientStudy) -> str:
    """Study description and date of the study."""
    description = patient.study_description or "MRI (no description)"
    return f"{description}, {study_datetime_text(patient)}."


def study_datetime_text(patient: PatientStudy) -> str:
    """StudyDate and StudyTime as ``YYYY-MM-DD HH:MM`` (date only without a time)."""
    date, time = patient.study_date, patient.study_time
    try:
        day = datetime.strptime(date[:8], "%Y%m%d")
    except ValueError:
        return "date not recorded"
    if len(time) >= 4 and time[:4].isdigit():
        return f"{day:%Y-%m-%d} {time[:2]}:{time[2:4]}"
    return f"{day:%Y-%m-%d}"


def _technique(series: SeriesInfo, manifest: Manifest) -> str:
    """Which series was analysed, and by which model."""
    name = f'"{series.description}"' if series.description else "(no description)"
    number = f"series {series.number}" if series.number is not None else "series (no number)"
    what = ("automatic segmentation of the knee structures and classification of the "
            "anterior cruciate ligament" if manifest.outputs.segmentation is not None
            else "classification without segmentation")
    inputs = len(manifest.roles)
    more = f" (and {inputs - 1} more series)" if inputs > 1 else ""
    return (f"MR {name}, {number}{more}, analysed by the AI model "
            f"{manifest.name}@{manifest.version}: {what}.")


def _other_heads(findings: dict[str, Any]) -> list[str]:
    """One line per classification head other than the ACL's: decision and probability."""
    rows = []
    for name, head in (findings.get("classification") or {}).items():
        if name == "acl":
            continue
        if head["decision"] == gate.NOT_ASSESSABLE:
            rows.append(f"{_upper_first(name)}: "
                        f"{gate.reason_text(head.get('not_assessable') or ['quality gate'])}.")
        else:
            rows.append(f"{_upper_first(name)}: {head['decision']} (probability "
                        f"{head['probability']:.2f}, threshold {head['threshold']:.2f}).")
    return rows


def _findings(volumes: dict[str, float], acl: dict[str, Any] | None,
              segmented: bool = True) -> list[str]:
    """One paragraph per finding, the ACL first (no structures without a segmentation)."""
    rows = [_acl_finding(volumes, acl)]
    if PCL in volumes:
        rows.append("Posterior cruciate ligament: "
                    + (f"identified, volume {_ml(volumes[PCL])}." if volumes[PCL] > 0
                       else "not identified."))
    grouped = {name for _, word in GROUPS for name in volumes if word in name.lower()}
    for title, word in GROUPS:
        parts = [f"{_short(name, word)} {_ml(v)}" for name, v in volumes.items()
                 if name in grouped and word in name.lower() and v > 0]
        if parts:
            rows.append(f"{title} (volume): {', '.join(parts)}.")
    bones = [f"{name.lower()} {_ml(v)}" for name, v in volumes.items()
             if name not in grouped and name not in (ACL, PCL) and v > 0]
    if bones:
        rows.append(f"Bones (volume within the field of view): {', '.join(bones)}.")
    missing = _not_identified(volumes)
    if segmented:
        rows.append("Not assessed: " + (f"{', '.join(missing)} not identified (0 mL)."
                                        if missing else "none; every structure was "
                                                        "identified."))
    return rows


def _acl_finding(volumes: dict[str, float], acl: dict[str, Any] | None) -> str:
    """The ACL paragraph: the model's decision and probability, or why there is none."""
    if acl is None:
        return "Anterior cruciate ligament: not assessed (the model has no ACL classifier)."
    if acl["decision"] == gate.NOT_ASSESSABLE:
        return (f"Anterior cruciate ligament: "
                f"{gate.reason_text(acl.get('not_assessable') or ['quality gate'])}.")
    state = "torn" if acl["decision"] == "torn" else "intact"
    volume = (f", volume {_ml(volumes[ACL])}" if volumes.get(ACL, 0) > 0
              else ", not identified by the segmentation" if ACL in volumes else "")
    return (f"Anterior cruciate ligament: {state} (probability of a tear "
            f"{acl['probability']:.2f}, threshold {acl['threshold']:.2f}){volume}.")


def _impression(volumes: dict[str, float], acl: dict[str, Any] | None,
                others: list[str] | None = None) -> list[str]:
    """Numbered, short statements: the ACL, the other heads, what was not identified."""
    items = []
    if acl is None:
        items.append("ACL not assessed.")
    elif acl["decision"] == gate.NOT_ASSESSABLE:
        items.append(f"ACL {gate.reason_text(acl.get('not_assessable') or ['quality gate'])}.")
    elif acl["decision"] == "torn":
        items.append(f"Findings suggestive of ACL tear (probability {acl['probability']:.2f}).")
    else:
        items.append(f"Intact ACL (probability of a tear {acl['probability']:.2f}).")
    items += others or []
    missing = _not_identified(volumes)
    if missing:
        items.append(f"Not identified, not assessed: {', '.join(missing)}.")
    return [f"{k}. {item}" for k, item in enumerate(items, start=1)]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _not_identified(volumes: dict[str, float]) -> list[str]:
    """Structures the segmentation did not find."""
    return [name for name, v in volumes.items() if v <= 0]


def _short(name: str, word: str) -> str:
    """``Medial meniscus`` in the menisci line reads ``medial``."""
    return name.lower().replace(word, "").strip() or name.lower()


def _ml(value: float) -> str:
    """A volume for reading: two decimals below 10 mL, one above."""
    return f"{value:.2f} mL" if value < 10 else f"{value:.1f} mL"


def _wrap(paragraph: str) -> list[str]:
    """``paragraph`` wrapped at :data:`WIDTH`; a numbered item's lines hang under its text."""
    head = paragraph.split(" ", 1)[0]
    indent = " " * (len(head) + 1) if head.rstrip(".").isdigit() else ""
    return textwrap.wrap(paragraph, WIDTH, subsequent_indent=indent, break_on_hyphens=False)
