"""The structures knee-demo segments: label value, name, display colour and SNOMED CT codes.

The values are those of the phantom's label map (:data:`aiworker.phantom.anatomy.LABELS`),
so the phantom's ground truth needs no translation; every other phantom label is background.
Codes: segmented property category SCT 91723000 "Anatomical structure"; the types as listed
in the project's DICOM SEG requirements (cartilage is SCT 309312004 "Cartilage", the bone it
covers is its anatomic region). Each code carries in ``checked`` where it was checked:
:data:`IN_DICOM` for those DICOM PS3.16 lists (pydicom's copy of its code tables, tested in
tests/test_knee_demo.py), :data:`NOT_CHECKED` for those no reachable source lists.
"""

from __future__ import annotations

IN_DICOM = "DICOM PS3.16 code tables (as shipped in pydicom 3.0.2)"
NOT_CHECKED = ("not checked against a SNOMED CT release: none was reachable when the model was "
               "built (no SNOMED CT browser or release offline; not in DICOM PS3.16); code "
               "and meaning as the project's requirements give them")
CHECKED = {"91723000": IN_DICOM, "71341001": IN_DICOM, "12611008": IN_DICOM,
           "64234005": IN_DICOM, "87342007": IN_DICOM, "309312004": IN_DICOM,
           "49390008": NOT_CHECKED, "10013000": NOT_CHECKED, "895007": NOT_CHECKED,
           "16219000": NOT_CHECKED}
ANATOMICAL_STRUCTURE = {"value": "91723000", "scheme_designator": "SCT",
                        "meaning": "Anatomical structure", "checked": IN_DICOM}

# value: (name, colour RGB, SCT code, code meaning)
STRUCTURES: dict[int, tuple[str, tuple[int, int, int], str, str]] = {
    1: ("Femur", (230, 216, 170), "71341001", "Femur"),
    2: ("Tibia", (200, 180, 140), "12611008", "Tibia"),
    3: ("Patella", (240, 200, 120), "64234005", "Patella"),
    4: ("Fibula", (180, 160, 120), "87342007", "Fibula"),
    5: ("Femoral cartilage", (80, 160, 255), "309312004", "Cartilage"),
    6: ("Tibial cartilage", (60, 200, 230), "309312004", "Cartilage"),
    7: ("Patellar cartilage", (120, 120, 255), "309312004", "Cartilage"),
    8: ("Medial meniscus", (255, 140, 0), "49390008", "Medial meniscus"),
    9: ("Lateral meniscus", (255, 200, 0), "10013000", "Lateral meniscus"),
    10: ("ACL", (255, 40, 40), "895007",
         "Structure of anterior cruciate ligament of knee joint"),
    11: ("PCL", (200, 0, 200), "16219000",
         "Structure of posterior cruciate ligament of knee joint"),
}
ACL, PCL = 10, 11
CLASSES = 1 + max(STRUCTURES)


# cartilage is one code; the bone it covers is its anatomic region (the SEG carries it)
CARTILAGE_REGION: dict[int, tuple[str, str]] = {
    5: ("71341001", "Femur"), 6: ("12611008", "Tibia"), 7: ("64234005", "Patella")}


def manifest_labels() -> list[dict]:
    """The ``outputs.segmentation.labels`` entries of model.yaml."""
    return [_label(value, *entry) for value, entry in STRUCTURES.items()]


def _label(value: int, name: str, color: tuple[int, int, int], code: str, meaning: str
           ) -> dict:
    label = {"value": value, "name": name, "color": list(color),
             "category": dict(ANATOMICAL_STRUCTURE),
             "type": {"value": code, "scheme_designator": "SCT", "meaning": meaning,
                      "checked": CHECKED[code]}}
    if value in CARTILAGE_REGION:
        region_code, region_meaning = CARTILAGE_REGION[value]
        label["anatomic_region"] = {"value": region_code, "scheme_designator": "SCT",
                                    "meaning": region_meaning, "checked": CHECKED[region_code]}
    return label
