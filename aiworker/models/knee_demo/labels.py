"""The structures knee-demo segments: label value, name, display colour and SNOMED CT codes.

The values are those of the phantom's label map (:data:`aiworker.phantom.anatomy.LABELS`),
so the phantom's ground truth needs no translation; every other phantom label is background.
Codes: segmented property category SCT 91723000 "Anatomical structure"; the types as listed
in the project's DICOM SEG requirements (cartilage is SCT 309312004 "Cartilage", the bone it
covers is in the name).
"""

from __future__ import annotations

ANATOMICAL_STRUCTURE = {"value": "91723000", "scheme_designator": "SCT",
                        "meaning": "Anatomical structure"}

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
             "type": {"value": code, "scheme_designator": "SCT", "meaning": meaning}}
    if value in CARTILAGE_REGION:
        region_code, region_meaning = CARTILAGE_REGION[value]
        label["anatomic_region"] = {"value": region_code, "scheme_designator": "SCT",
                                    "meaning": region_meaning}
    return label
