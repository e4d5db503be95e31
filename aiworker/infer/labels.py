"""Manifest labels from a model's own label names (nnU-Net's ``dataset.json``, a MONAI
bundle's ``configs/metadata.json``), coded from DICOM's own tables.

A SEG segment needs a segmented property category and type. For a label the manifest does
not describe, :func:`coded_labels` looks its name up among the SNOMED CT concepts of DICOM
PS3.16 CID 7151 (Segmentation Property Types, as pydicom ships them), matching the meaning
or the keyword case-insensitively ("femur", "Femur", "left_kidney"), and takes the category
from the type's own context group: CID 7192 types are Anatomical structures, CID 7191 types
Tissues, and so on (CID 7150's categories); a name found there nowhere is looked up among
the anatomic regions and structures (CIDs 4031, 4, 8134: Anatomical structures, such as the
tibia). A name found nowhere is a problem the caller reports: the manifest must then give
that label's codes itself.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

# CID 7150 category keyword -> the CID that lists its segmentation property types
CATEGORY_TYPES = {"AnatomicalStructure": 7192, "Tissue": 7191, "PhysicalObject": 7193,
                  "MorphologicallyAbnormalStructure": 7194, "Function": 7195,
                  "SpatialAndRelationalConcept": 7196, "BodySubstance": 7197,
                  "Substance": 7198}
ALL_TYPES = 7151
ANATOMY = (4031, 4, 8134)  # Common Anatomic Regions, Anatomic Region, Anatomic Structure
CHECKED = "DICOM PS3.16 (as shipped in pydicom), matched by the model's label name"
PALETTE = [(230, 216, 170), (80, 160, 255), (255, 140, 0), (60, 200, 120), (255, 40, 40),
           (200, 0, 200), (240, 200, 120), (0, 200, 230), (160, 120, 255), (255, 200, 0)]


def _folded(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@cache
def _types() -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """Folded meaning or keyword -> (category, type) codes as manifest ``Code`` mappings."""
    from pydicom.sr._cid_dict import cid_concepts
    from pydicom.sr.codedict import codes

    found: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for category, cid in CATEGORY_TYPES.items():
        category_code = _code(getattr(codes.SCT, category))
        for keyword in cid_concepts[cid].get("SCT", []):
            if keyword not in cid_concepts[ALL_TYPES].get("SCT", []):
                continue
            type_code = _code(getattr(codes.SCT, keyword))
            for key in (_folded(keyword), _folded(type_code["meaning"])):
                found.setdefault(key, (category_code, type_code))
    anatomical = _code(codes.SCT.AnatomicalStructure)
    for cid in ANATOMY:
        for keyword in cid_concepts[cid].get("SCT", []):
            type_code = _code(getattr(codes.SCT, keyword))
            for key in (_folded(keyword), _folded(type_code["meaning"])):
                found.setdefault(key, (anatomical, type_code))
    return found


def _code(code: Any) -> dict[str, str]:
    return {"value": code.value, "scheme_designator": code.scheme_designator,
            "meaning": code.meaning[:64], "checked": CHECKED}


def coded_labels(names: dict[int, str], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Manifest ``outputs.segmentation.labels`` entries for ``names`` (value -> name; 0, the
    background, is left out) and one problem line per name with no DICOM concept (``where``
    begins it: the file that names the label)."""
    labels, problems = [], []
    for index, (value, name) in enumerate(sorted(names.items())):
        if value == 0:
            continue
        codes = _types().get(_folded(name))
        if codes is None:
            problems.append(f"{where}: label {value} {name!r} is no SNOMED CT segmentation "
                            "property type or anatomic structure in DICOM PS3.16; give its "
                            "name, color, category and type in outputs.segmentation.labels")
            continue
        labels.append({"value": value, "name": name[:64], "color": list(PALETTE[index % 10]),
                       "category": codes[0], "type": codes[1]})
    return labels, problems


def missing_labels(missing: dict[int, str], source: Path, where: Path) -> list[str]:
    """One line per label of the model's own file (``source``) the manifest lacks, saying
    when DICOM has no concept of its name to fill it with."""
    return [f"{where}: outputs.segmentation.labels: no label for {source}'s label {value} "
            f"{name!r}" + (" (DICOM PS3.16 has no SNOMED CT concept of that name: give its "
                           "name, color, category and type)"
                           if coded_labels({value: name}, "")[1] else "")
            for value, name in sorted(missing.items())]
