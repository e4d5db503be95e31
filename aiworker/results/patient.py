"""The patient and study a job's results are about, read once from the source header and
made valid: real scanners write values the standard does not allow (PatientSex ``0000``,
dates with dashes, over-long descriptions, unknown character sets), and a result object
must never fail, nor repeat the fault, because of them.

:func:`read_patient_study` reads the patient and study attributes of one source instance
into a :class:`PatientStudy` (decoded text, one value each) and a :class:`HeaderWarning`
per value it dropped, fixed or cut. The rules:

* PatientSex not M, F or O: dropped (the attribute is type 2: written empty);
* DA not ``YYYYMMDD``: fixed when the date is still unambiguous (``2024-01-05``,
  ``2024.01.05``, ``2024/01/05``, a DT ``20240105120000``), else dropped;
* TM: colons removed (``12:30:45``), else a time that is not ``HH[MM[SS[.F{1,6}]]]`` with
  valid hours, minutes and seconds is dropped; fractions beyond six digits are cut;
* PN: a name without carets is one valid component and kept; more than three ``=`` groups
  or five components, or a group over 64 characters, is cut;
* LO over 64, SH over 16 characters: cut; AS not ``nnn[DWMY]``: dropped (``45Y`` fixed);
* a value with control characters (CR, LF, TAB...) has them replaced by spaces; a value
  of several values where one is allowed keeps the first;
* text in the declared SpecificCharacterSet is decoded by pydicom (an unknown term is
  reported and decoded with pydicom's default); the results are written in UTF-8
  (``ISO_IR 192``);
* StudyID, AccessionNumber and the other type 2 attributes are empty when missing.

A warning names the attribute and the problem, never the value: the warnings go to the
job's ``warnings.json`` and the logs, where patient data must not. :func:`sanitized_source`
gives a copy of a source dataset whose patient and study modules are exactly the cleaned
ones (no other patient or study attribute, no private tag), which is what highdicom copies
into the SEG, SR and Secondary Capture.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID

RESULT_CHARACTER_SET = "ISO_IR 192"
SEXES = ("M", "F", "O")
MAX_LENGTH = {"LO": 64, "SH": 16, "PN": 64}
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")  # C0 controls but ESC, and DEL
_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,}))?")
_AGE = re.compile(r"(\d{1,3})([DWMY])")
_DATE_SEPARATED = re.compile(r"(\d{4})[-./](\d{2})[-./](\d{2})")


@dataclass(frozen=True)
class HeaderWarning:
    """A source value the results do not carry as it was: which attribute, what was wrong
    with it, what was done (``dropped``, ``fixed``, ``truncated``, ``replaced``, ``kept``).
    It never holds the value."""

    attribute: str
    problem: str
    action: str

    @property
    def text(self) -> str:
        """One line for logs and the dashboard: ``PatientSex: not M, F or O; dropped``."""
        return f"{self.attribute}: {self.problem}; {self.action}"


@dataclass(frozen=True)
class PatientStudy:
    """The patient and study attributes every result object carries, valid and decoded
    (each a str, empty when the source has none or an invalid one), and the warnings made
    while reading them."""

    patient_name: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    study_instance_uid: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    accession_number: str = ""
    referring_physician_name: str = ""
    study_description: str = ""
    source_character_set: str = ""
    warnings: tuple[HeaderWarning, ...] = field(default=(), compare=False)

    def to_dataset(self, target: Dataset) -> Dataset:
        """Write the attributes into ``target`` (its character set UTF-8); ``target``."""
        target.SpecificCharacterSet = RESULT_CHARACTER_SET
        for name, (keyword, _) in ATTRIBUTES.items():
            value = getattr(self, name)
            if value or keyword in TYPE_2:
                setattr(target, keyword, value)
        return target

    def warning_dicts(self) -> list[dict[str, str]]:
        """The warnings as JSON-ready mappings (attribute, problem, action, text)."""
        return [asdict(w) | {"text": w.text} for w in self.warnings]


# field name -> (DICOM keyword, VR)
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "patient_name": ("PatientName", "PN"),
    "patient_id": ("PatientID", "LO"),
    "issuer_of_patient_id": ("IssuerOfPatientID", "LO"),
    "patient_birth_date": ("PatientBirthDate", "DA"),
    "patient_sex": ("PatientSex", "SEX"),
    "patient_age": ("PatientAge", "AS"),
    "study_instance_uid": ("StudyInstanceUID", "UI"),
    "study_date": ("StudyDate", "DA"),
    "study_time": ("StudyTime", "TM"),
    "study_id": ("StudyID", "SH"),
    "accession_number": ("AccessionNumber", "SH"),
    "referring_physician_name": ("ReferringPhysicianName", "PN"),
    "study_description": ("StudyDescription", "LO"),
}
TYPE_2 = frozenset({"PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName"})


def read_patient_study(ds: Dataset) -> PatientStudy:
    """The patient and study of the source instance ``ds``, cleaned, with a warning per
    value changed."""
    notes: list[HeaderWarning] = []
    charset = _character_set(ds, notes)
    values = {name: _clean(_text(ds, keyword, notes), keyword, vr, notes)
              for name, (keyword, vr) in ATTRIBUTES.items()}
    return PatientStudy(**values, source_character_set=charset, warnings=tuple(notes))


def sanitized_source(ds: Dataset, patient: PatientStudy) -> Dataset:
    """A shallow copy of the source dataset ``ds`` with its text decoded, without private
    tags and without any patient or study attribute but ``patient``'s, and in UTF-8: what
    highdicom may copy patient and study modules from."""
    removed = _patient_study_tags(ds)
    clean = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported once by read_patient_study
        for element in ds:  # iterating decodes each raw element in ds's character set
            if not element.tag.is_private and element.tag not in removed:
                clean.add(element)
    if hasattr(ds, "file_meta"):
        clean.file_meta = ds.file_meta
    return patient.to_dataset(clean)


def _patient_study_tags(ds: Dataset) -> set[int]:
    """Tags of every root attribute of the source IOD's Patient and Study modules (as
    highdicom copies them), the patient group (0010) and the attributes we write."""
    tags = {Tag(keyword) for keyword, _ in ATTRIBUTES.values()}
    tags |= {element.tag for element in ds if element.tag.group == 0x0010}
    try:  # highdicom's own module tables: exactly what it would copy
        from highdicom._standard_utils import (
            get_iod_module_map,
            get_module_attribute_map,
            get_sop_class_iod_map,
        )
        modules = get_iod_module_map()[get_sop_class_iod_map()[str(ds.SOPClassUID)]]
        attributes = get_module_attribute_map()
        tags |= {Tag(str(item["keyword"])) for module in modules
                 if module["ie"] in ("Patient", "Study")
                 for item in attributes[module["key"]] if not item["path"]}
    except (ImportError, KeyError, AttributeError):
        pass
    return tags


def _character_set(ds: Dataset, notes: list[HeaderWarning]) -> str:
    """The declared SpecificCharacterSet as text; a term pydicom does not know is
    reported (pydicom then decodes with its default repertoire)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = ds.get("SpecificCharacterSet")
    terms = list(value) if isinstance(value, MultiValue) else [value or ""]
    terms = [str(term).strip() for term in terms]
    if any(term and term not in python_encoding for term in terms):
        notes.append(HeaderWarning("SpecificCharacterSet", "not a DICOM character set term",
                                   "text decoded with the default repertoire, written "
                                   "as UTF-8"))
    return "\\".join(terms)


def _text(ds: Dataset, keyword: str, notes: list[HeaderWarning]) -> str:
    """The value of ``keyword`` as one decoded string ('' when absent or empty)."""
    if keyword not in ds:
        return ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = ds[keyword].value
        if isinstance(value, MultiValue | list) and len(value) > 1:
            notes.append(HeaderWarning(keyword, f"has {len(value)} values where one is "
                                       "allowed", "kept the first"))
        if isinstance(value, MultiValue | list):
            value = value[0] if len(value) else ""
        text = "" if value is None else str(value)
    if any("decode" in str(w.message) for w in caught):
        notes.append(HeaderWarning(keyword, "bytes not valid in the declared character set",
                                   "replaced by U+FFFD"))
    if _CONTROL.search(text):
        notes.append(HeaderWarning(keyword, "contains control characters (CR, LF, ...)",
                                   "replaced by spaces"))
        text = _CONTROL.sub(" ", text)
    return text.strip()


def _clean(text: str, keyword: str, vr: str, notes: list[HeaderWarning]) -> str:
    """``text`` made valid for ``vr`` by the module's rules (a warning per change)."""
    if not text:
        return ""
    cleaner = _CLEANERS.get(vr)
    return cleaner(text, keyword, notes) if cleaner else text


def _sex(text: str, keyword: str, notes: list[HeaderWarning]) -> str:
    """M, F or O; anything else dropped."""
    if text in SEXES:
        return text
    notes.append(HeaderWarning(keyword, "not one of M, F, O", "dropped"))
    return ""


def _date(text: str, keyword: str, notes: list[HeaderWarning]) -> str:
    """``YYYYMMDD``; a separated date or a DT fixed; anything else dropped."""
    candidate, problem = text, ""
    if match := _DATE_SEPARATED.fullmatch(text):
        candidate, problem = "".join(match.groups()), "date with separators"
    elif text.isdigit() and len(text) > 8 and len(text) in (10, 12, 14):
        candidate, problem = text[:8], "date and time where a date is allowed"
    if _real_date(candidate):
        if problem:
            notes.append(HeaderWarning(keyword, f"not YYYYMMDD ({problem})", "fixed"))
        return candidate
    notes.append(HeaderWarning(keyword, "not a date (YYYYMMDD)", "dropped"))
    return ""


def _real_date(text: str) -> bool:
    """Whether ``text`` is eight digits naming a calendar date."""
    if len(text) != 8 or not text.isdigit():
        return False
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _time(text: str, keyword: str, notes: list[HeaderWarning]) -> str:
    """``HH[MM[SS[.FFFFFF]]]``; colons removed, a long fraction cut, else dropped."""
    plain = text.replace(":", "") if ":" in text else text
    match = _TIME.fullmatch(plain)
    valid = match is not None and not (match.group(2) is None and match.group(3))
    if valid and match is not None:
        hours, minutes, seconds, fraction = match.groups()
        valid = (int(hours) < 24 and int(minutes or 0) < 60 and int(seconds or 0) < 61
                 and (fraction is None or seconds is not None))
    if not valid or match is None:
        notes.append(HeaderWarning(keyword, "not a time (HHMMSS.FFFFFF)", "dropped"))
        return ""
    fraction = match.group(4)
    fixed = plain if fraction is None or len(fraction) <= 6 else plain[:plain.index(".") + 7]
    if fixed != text:
        notes.append(HeaderWarning(keyword, "not HHMMSS.FFFFFF (colons or a long fraction)",
                                   "fixed"))
    return fixed


def _age(text: str, keyword: str, notes: list[HeaderWarning]) -> str:
    """``nnnD|W|M|Y``; fewer digits padded, anything else dropped."""
    match = _AGE.fullmatch(text.upper())
    if match is None:
        notes.append(HeaderWarning(keyword, "not an age (nnnD, nnnW, nnnM or nnnY)",
                                   "dropped"))
        return ""
    fixed = match.group(1).zfill(3) + match.group(2)
    if fixed != text:
        notes.append(HeaderWarning(keyword, "not nnnD, nnnW, nnnM or nnnY", "fixed"))
    return fixed


def _uid(text: str, keyword: str, notes: list[HeaderWarning]) -> str:
    """A UID is kept even when malformed: it names the study the results belong to."""
    if not UID(text).is_valid:
        notes.append(HeaderWarning(keyword, "not a valid UID", "kept (it names the study)"))
    return text


def _short_text(text: str, keyword: str, notes: list[HeaderWarning], vr: str) -> str:
    """LO or SH: cut at its maximum length."""
    limit = MAX_LENGTH[vr]
    if len(text) <= limit:
        return text
    notes.append(HeaderWarning(keyword, f"longer than {limit} characters ({vr})",
                               "truncated"))
    return text[:limit].rstrip()


def _person_name(text: str, keyword: str, notes: list[HeaderWarning]) -> str:
    """PN: at most three ``=`` groups of at most five ``^`` components and 64 characters
    each; a name without carets is one family-name component and valid as it is."""
    groups = text.split("=")
    if len(groups) > 3:
        notes.append(HeaderWarning(keyword, "more than three component groups",
                                   "truncated"))
        groups = groups[:3]
    cleaned = []
    for group in groups:
        parts = group.split("^")
        if len(parts) > 5:
            notes.append(HeaderWarning(keyword, "more than five name components",
                                       "truncated"))
            parts = parts[:5]
        value = "^".join(parts)
        if len(value) > MAX_LENGTH["PN"]:
            notes.append(HeaderWarning(keyword, "a component group longer than 64 "
                                       "characters", "truncated"))
            value = value[:MAX_LENGTH["PN"]]
        cleaned.append(value)
    return "=".join(cleaned).rstrip("=")


_CLEANERS: dict[str, Callable[[str, str, list[HeaderWarning]], str]] = {
    "SEX": _sex, "DA": _date, "TM": _time, "AS": _age, "UI": _uid, "PN": _person_name,
    "LO": lambda t, k, n: _short_text(t, k, n, "LO"),
    "SH": lambda t, k, n: _short_text(t, k, n, "SH"),
}


class _NoPatientNameInLogs(logging.Filter):
    """Drops highdicom's warning that quotes a caret-less patient name (valid DICOM: one
    family-name component), so no name reaches the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'argument "patient_name"' not in str(record.msg)


logging.getLogger("highdicom.base").addFilter(_NoPatientNameInLogs())
