"""The text report: sections in order, the ACL wording and probability for a torn and an
intact ligament, volumes, structures not identified, the disclaimer, no patient name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from helpers.results import MODEL_ID
from pydicom.dataset import Dataset

from aiworker.infer.manifest import Manifest, load_manifest
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series
from aiworker.results.report import DISCLAIMER, WIDTH, SeriesInfo, report_text

MODEL_YAML = Path(__file__).parents[1] / "aiworker" / "models" / "knee_demo" / "model.yaml"
NAME = "O'BRIEN^SIOBHÁN"
SECTIONS = ("EXAM", "TECHNIQUE", "FINDINGS", "IMPRESSION")


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MODEL_YAML)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """One instance of the sagittal PD FS series of a small phantom study."""
    study = write_study(tmp_path_factory.mktemp("study"), StudyOptions(
        seed=41, patient_name=NAME, truth=False, rescan=False, derived=False,
        overrides=Overrides(matrix=(48, 64), slices=6), volume_spacing=1.5))
    return pydicom.dcmread(truth_series(study).files[0])


def findings(manifest: Manifest, decision: str, probability: float,
             **volumes: float) -> dict[str, Any]:
    """A findings dict as the infer stage writes it, every structure 1-11 mL unless given."""
    measured = {label.name: float(label.value) for label in manifest.outputs.segmentation.labels}
    return {"model": MODEL_ID, "series_uid": "1.2.3",
            "volumes_ml": measured | volumes,
            "classification": {"acl": {"probability": probability, "threshold": 0.5,
                                       "decision": decision, "features": {}}}}


def section(text: str, heading: str) -> str:
    """The lines under ``heading`` up to the next blank line."""
    lines = text.split("\n")
    start = lines.index(heading) + 1
    return "\n".join(lines[start:lines.index("", start)])


def test_sections_come_in_order_and_the_disclaimer_closes(source, manifest):
    text = report_text(source, SeriesInfo.from_dataset(source),
                       findings(manifest, "torn", 0.97), manifest)
    lines = text.split("\n")
    positions = [lines.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)
    assert text.rstrip("\n").split("\n")[-1] == DISCLAIMER
    assert DISCLAIMER == ("Preliminary AI result, not verified by a radiologist, "
                          "not for diagnostic use.")
    assert all(len(line) <= WIDTH for line in lines if line != DISCLAIMER)


def test_exam_and_technique_name_the_study_the_series_and_the_model(source, manifest):
    text = report_text(source, SeriesInfo.from_dataset(source),
                       findings(manifest, "intact", 0.04), manifest)
    date = str(source.StudyDate)
    exam = section(text, "EXAM")
    assert str(source.StudyDescription) in exam
    assert f"{date[:4]}-{date[4:6]}-{date[6:8]} {source.StudyTime[:2]}:{source.StudyTime[2:4]}" \
        in exam
    technique = " ".join(section(text, "TECHNIQUE").split("\n"))
    assert f'"{source.SeriesDescription}"' in technique
    assert f"series {source.SeriesNumber}," in technique
    assert MODEL_ID in technique


def test_a_torn_acl_reads_as_a_suspected_tear_with_its_probability(source, manifest):
    text = report_text(source, SeriesInfo.from_dataset(source),
                       findings(manifest, "torn", 0.9712), manifest)
    found = " ".join(section(text, "FINDINGS").split("\n"))
    assert "Anterior cruciate ligament: torn (probability of a tear 0.97" in found
    impression = section(text, "IMPRESSION").split("\n")
    assert impression[0] == "1. Findings suggestive of ACL tear (probability 0.97)."
    assert "Intact ACL" not in text


def test_an_intact_acl_reads_as_intact(source, manifest):
    text = report_text(source, SeriesInfo.from_dataset(source),
                       findings(manifest, "intact", 0.031), manifest)
    found = " ".join(section(text, "FINDINGS").split("\n"))
    assert "Anterior cruciate ligament: intact (probability of a tear 0.03" in found
    assert section(text, "IMPRESSION").split("\n")[0] == \
        "1. Intact ACL (probability of a tear 0.03)."
    assert "suggestive of ACL tear" not in text


def test_findings_give_menisci_cartilage_and_bone_volumes_in_ml(source, manifest):
    text = report_text(source, SeriesInfo.from_dataset(source),
                       findings(manifest, "intact", 0.1, **{"Medial meniscus": 2.345,
                                                           "Femoral cartilage": 12.34}),
                       manifest)
    found = " ".join(section(text, "FINDINGS").split("\n"))
    assert "Menisci (volume): medial 2.35 mL, lateral 9.00 mL." in found
    assert "Cartilage (volume): femoral 12.3 mL, tibial 6.00 mL, patellar 7.00 mL." in found
    assert "femur 1.00 mL, tibia 2.00 mL, patella 3.00 mL, fibula 4.00 mL" in found
    assert "Posterior cruciate ligament: identified, volume 11.0 mL." in found
    assert "Not assessed: none" in found


def test_a_structure_of_zero_ml_is_not_identified_and_not_assessed(source, manifest):
    text = report_text(source, SeriesInfo.from_dataset(source),
                       findings(manifest, "intact", 0.2, PCL=0.0, **{"Lateral meniscus": 0.0}),
                       manifest)
    found = " ".join(section(text, "FINDINGS").split("\n"))
    assert "Posterior cruciate ligament: not identified." in found
    assert "Not assessed: Lateral meniscus, PCL not identified (0 mL)." in found
    assert "lateral" not in found.split("Menisci (volume):")[1].split(".")[0]
    assert section(text, "IMPRESSION").split("\n")[1] == \
        "2. Not identified, not assessed: Lateral meniscus, PCL."


def test_a_model_without_an_acl_classifier_says_the_acl_was_not_assessed(source, manifest):
    result = findings(manifest, "intact", 0.2)
    result["classification"] = {}
    text = report_text(source, SeriesInfo.from_dataset(source), result, manifest)
    assert "Anterior cruciate ligament: not assessed" in text
    assert section(text, "IMPRESSION").split("\n")[0] == "1. ACL not assessed."


def test_the_body_names_no_patient(source, manifest):
    text = report_text(source, SeriesInfo.from_dataset(source),
                       findings(manifest, "torn", 0.8), manifest)
    assert str(source.PatientName) == NAME
    for part in ("O'BRIEN", "SIOBHÁN", str(source.PatientID), str(source.PatientBirthDate)):
        assert part.lower() not in text.lower()
