"""Dirty-but-common patient and study headers, as real scanners and PACS write them, made by
editing a phantom series' headers: each :class:`Variant` says what it changes, which
attributes the results must warn about, and what value each result object must carry.

The values are fake but look like patient data, so a test can check that no warning
repeats them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

DELETE = None
PRIVATE_SECRET = "SECRET-PRIVATE-PHI"


@dataclass(frozen=True)
class Variant:
    """One dirty header: ``edits`` (keyword -> value, or :data:`DELETE`), ``warned`` (the
    attributes a warning must name, no more), ``expect`` (keyword -> the value every
    result object carries), ``private`` (add a private patient block)."""

    name: str
    edits: Mapping[str, str | None]
    warned: frozenset[str] = frozenset()
    expect: Mapping[str, str] = field(default_factory=dict)
    private: bool = False


VARIANTS: tuple[Variant, ...] = (
    Variant("philips-sex-0000-one-component-name",
            {"PatientSex": "0000", "PatientName": "KNEEPATIENT"},
            frozenset({"PatientSex"}), {"PatientSex": "", "PatientName": "KNEEPATIENT"}),
    Variant("sex-unknown-U", {"PatientSex": "U"}, frozenset({"PatientSex"}),
            {"PatientSex": ""}),
    Variant("sex-word-male", {"PatientSex": "male"}, frozenset({"PatientSex"}),
            {"PatientSex": ""}),
    Variant("dates-with-separators",
            {"StudyDate": "2024-01-05", "PatientBirthDate": "1971.03.15"},
            frozenset({"StudyDate", "PatientBirthDate"}),
            {"StudyDate": "20240105", "PatientBirthDate": "19710315"}),
    Variant("datetime-as-date-time-with-colons",
            {"StudyDate": "20240105120000", "StudyTime": "12:30:45.1234567"},
            frozenset({"StudyDate", "StudyTime"}),
            {"StudyDate": "20240105", "StudyTime": "123045.123456"}),
    Variant("ambiguous-date-impossible-time",
            {"StudyDate": "05/01/2024", "StudyTime": "25:61", "PatientBirthDate": "00000000"},
            frozenset({"StudyDate", "StudyTime", "PatientBirthDate"}),
            {"StudyDate": "", "StudyTime": "", "PatientBirthDate": ""}),
    Variant("name-groups-caretless-physician",
            {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
             "ReferringPhysicianName": "HOUSEDOC"},
            frozenset(), {"PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう",
                          "ReferringPhysicianName": "HOUSEDOC"}),
    Variant("no-ids-no-study-date",
            {"StudyID": DELETE, "AccessionNumber": DELETE, "PatientID": "",
             "StudyDate": DELETE, "StudyTime": DELETE},
            frozenset(), {"StudyID": "", "AccessionNumber": "", "PatientID": "",
                          "StudyDate": ""}),
    Variant("latin-1-iso-ir-100",
            {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jörg",
             "StudyDescription": "Kniegelenk rechts Übersicht"},
            frozenset(), {"PatientName": "Müller^Jörg",
                          "StudyDescription": "Kniegelenk rechts Übersicht"}),
    Variant("utf-8-iso-ir-192",
            {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Ødegård^Åse",
             "StudyDescription": "MR KNÄ HÖGER ÇAĞLAR"},
            frozenset(), {"PatientName": "Ødegård^Åse",
                          "StudyDescription": "MR KNÄ HÖGER ÇAĞLAR"}),
    Variant("bogus-character-set",
            {"SpecificCharacterSet": "LATIN-1", "PatientName": "Señor^José"},
            frozenset({"SpecificCharacterSet"}), {"PatientName": "Señor^José"}),
    Variant("iso-2022-ir-100",
            {"SpecificCharacterSet": "ISO 2022 IR 100", "PatientName": "Dürr^Käthe"},
            frozenset(), {"PatientName": "Dürr^Käthe"}),
    Variant("gb18030", {"SpecificCharacterSet": "GB18030", "PatientName": "王^小明"},
            frozenset(), {"PatientName": "王^小明"}),
    Variant("private-patient-block-and-extras",
            {"PatientComments": "SECRET-COMMENT-PHI", "EthnicGroup": "WAY-TOO-LONG-ETHNIC-GROUP",
             "PatientAge": "45Y"},
            frozenset({"PatientAge"}), {"PatientAge": "045Y"}, private=True),
    Variant("over-long-lo-and-sh",
            {"StudyDescription": "MRI KNEE RIGHT WITHOUT CONTRAST " * 3,
             "PatientID": "PID" + "7" * 70, "AccessionNumber": "ACC12345678901234567"},
            frozenset({"StudyDescription", "PatientID", "AccessionNumber"}),
            {"PatientID": ("PID" + "7" * 70)[:64], "AccessionNumber": "ACC1234567890123"}),
    Variant("control-characters-and-multivalue",
            {"StudyDescription": "KNEE\r\nRIGHT", "PatientID": "PIDA\\PIDB"},
            frozenset({"StudyDescription", "PatientID"}),
            {"StudyDescription": "KNEE  RIGHT", "PatientID": "PIDA"}),
)


def phi_values(variant: Variant) -> list[str]:
    """The edited values that look like patient data (what no warning may contain)."""
    values = [v for k, v in variant.edits.items() if v and k != "SpecificCharacterSet"]
    parts = {p for v in values for p in [v, *v.replace("=", "^").split("^")] if len(p) >= 3}
    return sorted(parts | ({PRIVATE_SECRET} if variant.private else set()))


def apply_variant(ds: Dataset, variant: Variant) -> Dataset:
    """``ds`` with the variant's edits (and private block) applied in place."""
    for keyword, value in variant.edits.items():
        if value is DELETE:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if variant.private:
        block = ds.private_block(0x0011, "PHILIPS MR IMAGING DD 001", create=True)
        block.add_new(0x10, "LO", PRIVATE_SECRET)
        block.add_new(0x11, "PN", "PRIVATE^NAME")
    return ds


def write_variant(paths: Sequence[Path], variant: Variant, folder: Path) -> list[Path]:
    """The series ``paths`` written again under ``folder`` with the variant's headers."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        ds = pydicom.dcmread(path)
        for _element in ds:  # decode all text in the phantom's own character set first
            pass
        apply_variant(ds, variant)
        target = folder / Path(path).name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid values are the point
            ds.save_as(target)
        written.append(target)
    return written
