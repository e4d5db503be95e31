"""De-identification of one export's data sets: DICOM PS3.15 Annex E, Basic Application
Level Confidentiality Profile, with the options a researcher picks.

Two kept libraries do the work; this module only decides which of them acts on what:

- the profile's table (PS3.15 Table E.1-1, the 2026c edition) comes from
  ``dicom-anonymizer``'s database (``dicomfields_2026c``: the D, Z, X, U and combined action
  lists), so the attributes removed are the standard's, not a list of ours;
- ``dicognito`` replaces what the table says to replace, consistently across the whole
  export (one :class:`dicognito.anonymizer.Anonymizer` for every file): every UID but the
  class and transfer syntax UIDs (so a SEG's and an SR's references still point at the
  exported images), person names, IDs and accession numbers (the pseudonyms), and dates
  (shifted back by one offset of 62-730 days, so intervals survive).

Per element, in this order: private elements are removed (``Dataset.remove_private_tags``);
an X action removes the element, a Z action empties it, unless ``dicognito`` replaces its
kind of value (PN, UI, IDs, dates: the pseudonym or a shifted date is the "dummy value" the
profile allows); a D action on anything else removes it. The options change that:

``retain-dates`` (DCM 113107, Retain Longitudinal Temporal Information Modified Dates):
    every DA/DT/TM is kept, shifted by the export's offset. Without it dates under a Z or X
    action go, and the ones an object needs (a D action, e.g. an SR's Content Date) become
    ``19000101`` / ``000000``.
``retain-device`` (113109, Retain Device Identity): the Rtn. Dev. Id. column's K attributes
    (:data:`DEVICE_IDENTITY`) are kept as they were.
``clean-descriptors`` (113105, Clean Descriptors): the Clean Desc. column's C attributes
    (:data:`DESCRIPTORS`) are kept when none of the source's identifying values (names,
    IDs, accession number, birth date, institution) occurs in them, else removed.

The node's own SR keeps its content tree (DCM 113104, Clean Structured Content): it holds
codes, numbers, the model's name and UIDs (remapped), never text from the source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import version

import pydicom
from dicognito.anonymizer import Anonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

OPTIONS = {
    "retain-dates": codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption,
    "retain-device": codes.DCM.RetainDeviceIdentityOption,
    "clean-descriptors": codes.DCM.CleanDescriptorsOption,
}
PROFILES = {  # --profile NAME: the options it turns on
    "basic": (),
    "retain-dates": ("retain-dates",),
    "research": ("retain-dates", "retain-device", "clean-descriptors"),
}
BASIC = codes.DCM.BasicApplicationConfidentialityProfile
STRUCTURED = codes.DCM.CleanStructuredContentOption
DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
DATE_VRS = frozenset(DUMMY)
REPLACED_VRS = frozenset({"PN", "UI"})  # dicognito replaces every such value

# PS3.15 Table E.1-1, the "Rtn. Dev. Id. Opt." column's K attributes that MR and the node's
# objects carry (the table itself is dicom-anonymizer's; the option columns are not in it).
DEVICE_IDENTITY = ("DeviceSerialNumber", "StationName", "DeviceUID", "DeviceLabel",
                   "DetectorID", "GantryID", "GeneratorID", "PlateID", "CassetteID",
                   "SourceSerialNumber", "PerformedStationName", "PerformedStationAETitle",
                   "ScheduledStationName", "ScheduledStationAETitle", "StationAETitle")
# The "Clean Desc. Opt." column's C attributes.
DESCRIPTORS = ("StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments",
               "AcquisitionComments", "DerivationDescription", "RequestedProcedureDescription",
               "PerformedProcedureStepDescription", "ScheduledProcedureStepDescription",
               "AdditionalPatientHistory", "AdmittingDiagnosesDescription", "ReasonForStudy",
               "RequestedContrastAgent", "ContrastBolusAgent", "ClinicalTrialSeriesDescription",
               "SegmentDescription", "CommentsOnThePerformedProcedureStep")
IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate",
               "AccessionNumber", "InstitutionName", "InstitutionAddress",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
               "StudyID", "PatientAddress")


def _tags(*lists: Iterable[tuple[int, ...]]) -> frozenset[int]:
    """The table's plain (group, element) entries as tags (masked ones: :data:`MASKED`)."""
    return frozenset(int(Tag(entry[0], entry[1])) for entries in lists for entry in entries
                     if len(entry) == 2)


# Repeating groups (curves 50xx, overlays 60xx): (group, element, group mask, element mask)
MASKED = tuple(entry for entry in table.X_TAGS if len(entry) == 4)


def _masked(tag: int) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    return any(group & gm == g and element & em == e for g, e, gm, em in MASKED)


REMOVE = _tags(table.X_TAGS, table.X_D_TAGS)
EMPTY = _tags(table.Z_TAGS, table.X_Z_TAGS)
DUMMY_TEXT = _tags(table.X_Z_D_TAGS)  # may be Type 1 (a SEG's Device Serial Number)
REFERENCES = _tags(table.X_Z_U_STAR_TAGS)  # reference sequences: kept, their UIDs remapped
REPLACE = _tags(table.D_TAGS, table.Z_D_TAGS)
DICOGNITO_IDS = frozenset(int(tag_for_keyword(k)) for k in (
    "AccessionNumber", "OtherPatientIDs", "PatientID", "StudyID", "StationName",
    "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "InstitutionName", "InstitutionAddress", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest"))
CONTENT_SEQUENCE = int(tag_for_keyword("ContentSequence"))


@dataclass(frozen=True)
class Options:
    """The options a profile turns on (names of :data:`OPTIONS`)."""

    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.names) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}: use "
                             f"{', '.join(OPTIONS)}")

    @classmethod
    def of(cls, profile: str, extra: Iterable[str] = ()) -> Options:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}: use {', '.join(PROFILES)}")
        return cls(tuple(dict.fromkeys((*PROFILES[profile], *extra))))

    def __contains__(self, name: object) -> bool:
        return name in self.names


@dataclass
class Deidentifier:
    """One export's de-identification: the same pseudonyms and UIDs for every file given to
    :meth:`apply`. ``seed`` seeds ``dicognito`` (a fresh random one per export: the same
    seed maps the same source to the same values)."""

    options: Options
    seed: str
    uid_map: dict[str, str] = field(default_factory=dict)
    pseudonyms: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._anonymizer = Anonymizer(seed=self.seed)
        self._recorder = _Recorder()
        if "retain-device" in self.options:
            for keyword in DEVICE_IDENTITY:
                self._anonymizer.add_element_handler(_Keep(int(tag_for_keyword(keyword))))
        if "retain-dates" not in self.options:
            self._anonymizer.add_element_handler(_DummyDates())
        self._anonymizer.add_element_handler(self._recorder)  # sees every UI first

    def apply(self, ds: Dataset, own_sr: bool = False) -> None:
        """De-identify ``ds`` in place; ``own_sr``: it is the node's SR (content kept)."""
        identifying = _identifying_values(ds)
        source_patient = str(ds.get("PatientID", ""))
        ds.remove_private_tags()
        self._table(ds, own_sr, identifying)
        self._anonymizer.anonymize(ds)
        self._recorder.resolve(self.uid_map)
        if source_patient:
            self.pseudonyms[source_patient] = str(ds.get("PatientID", ""))
        self._mark(ds, own_sr)

    def _table(self, ds: Dataset, own_sr: bool, identifying: list[str]) -> None:
        """PS3.15 Table E.1-1's actions, through every sequence; what dicognito replaces
        is left to it."""
        kept = _kept_tags(self.options)
        for element in list(ds):
            tag = int(element.tag)
            if element.VR == "SQ" and not (own_sr and tag == CONTENT_SEQUENCE):
                for item in element.value:
                    self._table(item, own_sr, identifying)
            if tag in kept or (own_sr and tag == CONTENT_SEQUENCE):
                continue
            if "clean-descriptors" in self.options and tag in _DESCRIPTOR_TAGS:
                if _mentions(element.value, identifying):
                    del ds[tag]
                continue
            deferred = element.VR in REPLACED_VRS or tag in DICOGNITO_IDS or tag in REFERENCES or (
                element.VR in DATE_VRS and ("retain-dates" in self.options or tag in REPLACE))
            if deferred:
                continue
            if tag in REMOVE or tag in REPLACE or _masked(tag):
                del ds[tag]
            elif tag in DUMMY_TEXT and element.VR in ("LO", "SH", "LT", "ST", "UT"):
                element.value = "REMOVED" if element.value else None
            elif tag in EMPTY or tag in DUMMY_TEXT:
                element.value = Sequence() if element.VR == "SQ" else None

    def _mark(self, ds: Dataset, own_sr: bool) -> None:
        """Say what was done: Patient Identity Removed, the method in words and codes."""
        applied = [BASIC, *(OPTIONS[name] for name in self.options.names)]
        if own_sr:
            applied.append(STRUCTURED)
        ds.PatientIdentityRemoved = "YES"
        words = ", ".join(c.meaning for c in applied)
        ds.DeidentificationMethod = (f"aiworker export (dicognito {version('dicognito')}): "
                                     f"{words}")[:64]
        ds.DeidentificationMethodCodeSequence = [_code_item(c) for c in applied]
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if "retain-dates" in self.options else "REMOVED")


class _Recorder(ElementAnonymizer):
    """Notes each UI element's value before dicognito replaces it, and after the data set
    is done (:meth:`resolve`) what it became: the export's UID mapping."""

    def __init__(self) -> None:
        self.pending: list[tuple[pydicom.DataElement, list[str]]] = []

    def __call__(self, dataset: Dataset, data_element: pydicom.DataElement) -> bool:
        if data_element.VR == "UI" and data_element.value:
            self.pending.append((data_element, _values(data_element.value)))
        return False

    def resolve(self, uid_map: dict[str, str]) -> None:
        for element, before in self.pending:
            for old, new in zip(before, _values(element.value), strict=True):
                if old != new:
                    uid_map[old] = new
        self.pending.clear()

    def describe_actions(self) -> Iterable[str]:
        yield "record UID replacements"


class _Keep(ElementAnonymizer):
    """Keeps one attribute as it was (an option's K)."""

    def __init__(self, tag: int):
        self.tag = tag

    def __call__(self, dataset: Dataset, data_element: pydicom.DataElement) -> bool:
        return int(data_element.tag) == self.tag

    def describe_actions(self) -> Iterable[str]:
        yield f"keep {Tag(self.tag)}"


class _DummyDates(ElementAnonymizer):
    """Without retain-dates: a date or time an object needs becomes a dummy value."""

    def __call__(self, dataset: Dataset, data_element: pydicom.DataElement) -> bool:
        if data_element.VR not in DATE_VRS:
            return False
        if data_element.value not in (None, ""):
            data_element.value = DUMMY[data_element.VR]
        return True

    def describe_actions(self) -> Iterable[str]:
        yield "replace dates and times with 19000101 / 000000"


_DESCRIPTOR_TAGS = frozenset(int(tag_for_keyword(k)) for k in DESCRIPTORS)


def _kept_tags(options: Options) -> frozenset[int]:
    if "retain-device" not in options:
        return frozenset()
    return frozenset(int(tag_for_keyword(k)) for k in DEVICE_IDENTITY)


def _identifying_values(ds: Dataset) -> list[str]:
    """The source's identifying values (and their name parts), for the descriptor check."""
    values: list[str] = []
    for keyword in IDENTIFYING:
        raw = ds.get(keyword)
        for value in raw if isinstance(raw, list | pydicom.multival.MultiValue) else [raw]:
            text = str(value or "").strip()
            values += [text, *re.split(r"[\^=]+", text)]
    return sorted({v.upper() for v in values if len(v) >= 3})


def _values(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | pydicom.multival.MultiValue) \
        else [str(value)]


def _mentions(value: object, identifying: list[str]) -> bool:
    text = str(value or "").upper()
    return any(v in text for v in identifying)


def _code_item(code: pydicom.sr.coding.Code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = code.value, code.scheme_designator
    item.CodeMeaning = code.meaning
    return item
