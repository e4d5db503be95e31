"""The quality gate (aiworker.infer.gate): each check with its reasons, the manifest's
``gate:`` section and its errors, a not-assessable result through the result objects (SR,
HL7, report, SEG withheld or sent as the manifest says), and a 16-slice study through a
running node that comes out not assessable in ``aiworker status --json``."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers.results import MANIFEST, MODEL_ID, truth_run
from helpers.tools import dciodvfy_errors, needs_dcmtk, wait_until
from pydicom.uid import MRImageStorage
from test_dispatch_outbox import StoreSCP
from test_infer_e2e import content_items, needs_knee_demo, send, wait_for_job

from aiworker.infer import gate
from aiworker.infer.confidence import structure_confidence
from aiworker.infer.gate import InputStats, StructureStats
from aiworker.infer.gate_spec import GateSpec
from aiworker.infer.manifest import ManifestError, parse_manifest
from aiworker.infer.run import gated
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.results.hl7 import volume_code
from aiworker.results.objects import write_results
from aiworker.results.sr import FINDING_CODES, PROBABILITY, UNDETERMINED, VOLUME
from aiworker.store.layout import HL7_FILE, REPORT_FILE, SEG_FILE

SPEC = GateSpec.model_validate({
    "input": {"slices": [20, 40], "coverage_mm": [84, None],
              "spacing_mm": {"x": [0.25, 0.7], "y": [0.25, 0.7], "z": [2.4, 4.3]},
              "intensity_percentiles": {50: [0.04, 0.14]}},
    "output": {"required": ["Femur", "ACL"], "volume_ml": {"ACL": [0.6, 2.5]},
               "max_components": {"ACL": 2}, "min_confidence": {"ACL": 0.8, "PCL": 0.8}}})
NORMAL = InputStats(32, 96.0, (0.4, 0.4, 3.0), {50.0: 0.08})
GOOD = {"Femur": StructureStats(300.0, 1, 0.97), "ACL": StructureStats(1.2, 1, 0.9),
        "PCL": StructureStats(1.8, 1, 0.93)}


def failed(checks: list[gate.Check]) -> list[str]:
    return [check.reason for check in checks if not check.passed]


def test_a_normal_series_passes_every_input_check() -> None:
    checks = gate.input_checks(SPEC.input, NORMAL)
    assert [c.name for c in checks] == ["slices", "coverage_mm", "spacing_mm.x", "spacing_mm.y",
                                        "spacing_mm.z", "intensity_p50"]
    assert all(c.passed for c in checks) and gate.output_checks(SPEC.output, GOOD)
    assert all(c.passed for c in gate.output_checks(SPEC.output, GOOD))


def test_partial_coverage_fails_on_slices_and_coverage_with_the_trained_range() -> None:
    reasons = failed(gate.input_checks(SPEC.input, InputStats(16, 48.0, (0.4, 0.4, 3.0),
                                                              {50.0: 0.08})))
    assert reasons == ["16 slices; the model was trained on 20 to 40 slices",
                       "the slices cover 48 mm along the slice axis; the model was trained "
                       "on at least 84 mm"]


def test_spacing_and_contrast_fail_with_their_values() -> None:
    reasons = failed(gate.input_checks(SPEC.input, InputStats(32, 160.0, (1.2, 0.4, 5.0),
                                                              {50.0: 0.41})))
    assert reasons == [
        "pixel spacing (x) 1.20 mm; the model was trained on 0.25 to 0.7 mm",
        "slice spacing 5.00 mm; the model was trained on 2.4 to 4.3 mm",
        "intensity 50th percentile 0.410 after normalization (another contrast, or noise?); "
        "the model was trained on 0.04 to 0.14"]


def test_output_checks_fail_per_structure_and_a_missing_required_one_fails_the_whole() -> None:
    bad = GOOD | {"ACL": StructureStats(0.2, 3, 0.55), "PCL": StructureStats(1.8, 1, None)}
    result = gate.GateResult(gate.output_checks(SPEC.output, bad))
    assert result.assessable and result.reasons == []
    assert result.structures == {
        "ACL": ["ACL: volume 0.20 mL; the model was trained on 0.6 to 2.5 mL",
                "ACL: 3 separate parts, trained on at most 2",
                "ACL: model confidence 0.55, below the 0.80 it has on its training data"],
        "PCL": ["PCL: the model gives no probabilities to check its confidence"]}
    missing = gate.GateResult(gate.output_checks(SPEC.output, GOOD | {
        "ACL": StructureStats(0.0, 0, None)}))
    assert not missing.assessable
    assert missing.reasons == ["ACL not found: the volume may not be a knee"]
    assert missing.structures == {}  # no volume or confidence complaint on top


def test_structure_stats_count_parts_and_confidence_is_the_mean_max_softmax() -> None:
    labels = np.zeros((4, 20, 20), np.uint8)
    labels[1:3, 2:6, 2:6] = 10  # 32 voxels
    labels[1:3, 12:16, 12:16] = 10  # a second part
    labels[0, 0, 0] = 10  # a speck under the minimum
    logits = np.zeros((12, *labels.shape), np.float32)
    logits[10][labels == 10] = np.log(3.0)  # softmax max = 3 / (3 + 11) inside the ACL
    confidence = structure_confidence(logits, labels, [1, 10])
    assert confidence == {10: pytest.approx(3 / 14)}  # label 1 has no voxel: left out
    stats = gate.structure_stats(labels, 0.5, {1: "Femur", 10: "ACL"}, confidence, 20)
    assert stats["ACL"] == StructureStats(65 * 0.5, 2, pytest.approx(3 / 14))
    assert stats["Femur"] == StructureStats(0.0, 0, None)


def test_input_stats_read_slices_coverage_spacing_and_normalized_percentiles() -> None:
    array = np.arange(10 * 8 * 8, dtype=np.float32).reshape(10, 8, 8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.6, 3.3))
    stats = gate.input_stats(image, MANIFEST.input.normalization, [50.0])
    assert (stats.slices, stats.coverage_mm, stats.spacing_mm) == (10, 33.0, (0.5, 0.6, 3.3))
    assert stats.percentiles[50.0] == pytest.approx(0.5, abs=0.01)


def test_apply_marks_the_acl_finding_and_withholds_the_seg_of_a_whole_failure() -> None:
    findings = {"classification": {"acl": {"decision": "torn", "probability": 1.0}}}
    per_structure = gate.GateResult(gate.output_checks(SPEC.output, GOOD | {
        "PCL": StructureStats(1.8, 1, 0.5)}))
    marked = gate.apply(json.loads(json.dumps(findings)), per_structure, SPEC, MANIFEST)
    acl = marked["classification"]["acl"]
    assert (acl["decision"], acl["model_decision"]) == ("not assessable", "torn")
    assert acl["not_assessable"] == [
        "PCL: model confidence 0.50, below the 0.80 it has on its training data"]
    assert marked["quality"]["assessable"] and marked["quality"]["seg"] == "sent"
    assert marked["quality"]["findings"] == {"acl": acl["not_assessable"]}
    assert gate.structure_reasons(marked, "PCL") == acl["not_assessable"]
    assert gate.structure_reasons(marked, "Femur") == []

    whole = gate.GateResult(gate.input_checks(SPEC.input, InputStats(16, 48.0, (0.4, 0.4, 3.0),
                                                                    {50.0: 0.08})))
    marked = gate.apply(json.loads(json.dumps(findings)), whole, SPEC, MANIFEST)
    assert not marked["quality"]["assessable"] and gate.seg_withheld(marked)
    assert gate.finding_reasons(marked, "acl") == whole.reasons
    assert gate.structure_reasons(marked, "Femur") == whole.reasons
    sending = SPEC.model_copy(update={"send_seg_when_not_assessable": True})
    assert not gate.seg_withheld(gate.apply(json.loads(json.dumps(findings)), whole, sending,
                                            MANIFEST))


def test_a_model_without_a_gate_keeps_its_findings_unchanged() -> None:
    class Result:
        findings = {"volumes_ml": {"Femur": 1.0}}

    ungated = MANIFEST.model_copy(update={"gate": None})
    assert gated(Result(), [], ungated) is Result.findings


def test_the_manifest_gate_section_is_checked_with_key_paths(tmp_path: Path) -> None:
    base = MANIFEST.model_copy(update={"gate": None}).to_yaml()
    path = tmp_path / "model.yaml"
    with pytest.raises(ManifestError) as raised:
        parse_manifest(base + "gate:\n  output:\n    volume_ml: {Menisc: [1, 2]}\n"
                              "    required: [Femur, Knee]\n", path)
    assert raised.value.problems == [
        f"{path}: gate.output.required: 'Knee' is not a name of outputs.segmentation.labels",
        f"{path}: gate.output.volume_ml: 'Menisc' is not a name of "
        "outputs.segmentation.labels"]
    with pytest.raises(ManifestError) as raised:
        parse_manifest(base + "gate:\n  input:\n    slices: [40, 20]\n    coverge_mm: 1\n", path)
    assert sorted(raised.value.problems) == [
        f"{path}: gate.input.coverge_mm: unknown key (got 1)",
        f"{path}: gate.input.slices: min 40 is above max 20 (got [40, 20])"]
    assert parse_manifest(base + "gate: {send_seg_when_not_assessable: true}\n",
                          path).gate.send_seg_when_not_assessable


def test_the_bundled_manifest_ships_a_gate_derived_from_training_data() -> None:
    spec = MANIFEST.gate
    assert spec is not None and "training studies" in (spec.derived_from or "")
    assert spec.input.slices[0] > 16 and spec.input.coverage_mm[0] > 16 * 3.5
    assert set(spec.output.required) >= {"ACL", "PCL"} and not spec.send_seg_when_not_assessable


# ----------------------------------------------------------------------------- results


@pytest.fixture(scope="module")
def unassessable(tmp_path_factory: pytest.TempPathFactory):
    """A phantom's run whose findings the gate found not assessable (16 slices), written as
    result objects twice: SEG withheld (the bundled manifest) and sent (a manifest that
    says so)."""
    root = tmp_path_factory.mktemp("gate")
    run = truth_run(root / "study", seed=61, matrix=64)
    whole = gate.GateResult(gate.input_checks(SPEC.input, InputStats(16, 48.0, (0.4, 0.4, 3.0),
                                                                    {50.0: 0.08})))
    withheld = gate.apply(json.loads(json.dumps(run.findings)), whole, SPEC, MANIFEST)
    sending = SPEC.model_copy(update={"send_seg_when_not_assessable": True})
    sent = gate.apply(json.loads(json.dumps(run.findings)), whole, sending, MANIFEST)
    files = write_results(root / "withheld", run.paths, run.loaded, run.labels, withheld,
                          MANIFEST, MODEL_ID)
    with_seg = write_results(root / "sent", run.paths, run.loaded, run.labels, sent,
                             MANIFEST, MODEL_ID)
    return files, with_seg, whole.reasons


def sr_evaluations(path: Path) -> dict[str, str]:
    """Concept code -> value code of every CODE item of an SR."""
    return {item.ConceptNameCodeSequence[0].CodeValue: item.ConceptCodeSequence[0].CodeValue
            for item in content_items(pydicom.dcmread(path))
            if "ConceptCodeSequence" in item and "ConceptNameCodeSequence" in item}


def measured(path: Path) -> set[str]:
    return {item.ConceptNameCodeSequence[0].CodeValue
            for item in content_items(pydicom.dcmread(path)) if item.ValueType == "NUM"}


def test_the_sr_states_undetermined_and_measures_nothing(unassessable) -> None:
    files, with_seg, _ = unassessable
    for sr in (files.sr, with_seg.sr):
        evaluations = sr_evaluations(sr)
        assert evaluations[FINDING_CODES["acl"].value] == UNDETERMINED.value == "373068000"
        assert evaluations["71341001"] == UNDETERMINED.value  # Femur: presence undetermined
        assert not measured(sr) & {VOLUME.value, PROBABILITY.value}
        assert dciodvfy_errors(sr) == []
    assert files.seg is None and not (files.sr.parent / SEG_FILE).exists()
    evidence = pydicom.dcmread(files.sr).CurrentRequestedProcedureEvidenceSequence
    classes = {i.ReferencedSOPClassUID for s in evidence[0].ReferencedSeriesSequence
               for i in s.ReferencedSOPSequence}
    assert classes == {MRImageStorage}  # the SEG that is not sent is no evidence
    assert with_seg.seg is not None and with_seg.seg.is_file()


def test_hl7_and_report_say_not_assessable_and_claim_no_tear(unassessable) -> None:
    files, _, reasons = unassessable
    segments = files.hl7.read_bytes().decode("utf-8").split("\r")
    obx = [s.split("|") for s in segments if s.startswith("OBX|")]
    acl = [(f[2], f[5], f[11]) for f in obx if f[3].startswith("ACL^")]
    assert acl == [("TX", f"not assessable: {reason}", "P") for reason in reasons]
    [p] = [f for f in obx if f[3].startswith("ACL-TEAR-P^")]
    assert (p[5], p[11]) == ("", "X")
    [femur] = [f for f in obx if f[3].startswith(volume_code("Femur") + "^")]
    assert (femur[5], femur[11]) == ("", "X")
    message = files.hl7.read_bytes().decode("utf-8")
    assert "ACL-TORN" not in message and "ACL-INTACT" not in message
    report = files.report.read_text(encoding="utf-8")
    assert "FINDINGS\nNot assessable: 16 slices; the model was trained on 20 to 40" in report
    body = report.lower()
    assert "torn" not in body and "intact" not in body and " ml" not in body


# ----------------------------------------------------------------------------- end to end


@needs_dcmtk
@needs_knee_demo
def test_a_16_slice_study_through_the_node_is_not_assessable(node_factory, tmp_path) -> None:
    """A sagittal PD FS of 16 slices (partial coverage) sent with storescu: the job is done,
    ``status --json`` says not assessable with the reasons, the PACS (a real storescp)
    gets the SR but no SEG, the ORU^R01 and the report say not assessable, and so does the
    dashboard's study page."""
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        node = node_factory(
            destinations={"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs.port,
                                   "ae_title": pacs.ae_title}},
            pipelines=[{"name": "knee", "rules": "config/rules/knee.yaml",
                        "model": "knee-demo", "send_to": ["pacs"]}],
            dispatch={"interval_s": 0.2}, inference={"threads": 2})
        study = write_study(tmp_path / "knee", StudyOptions(
            seed=930_001, rescan=False, derived=False, truth=False,
            overrides=Overrides(roles=("sag_pd_fs",), matrix=256, slices=16)))
        send(node, study)
        wait_for_job(node, "done", 120)
        [job] = node.study_status(study.study_uid)["selection"]["knee"]["jobs"]
        quality = job["findings"]["quality"]
        assert quality["assessable"] is False and quality["seg"] == "withheld"
        assert "16 slices; the model was trained on" in quality["reasons"][0]
        assert any(r.startswith("the slices cover") for r in quality["reasons"])
        acl = job["findings"]["classification"]["acl"]
        assert acl["decision"] == "not assessable" and acl["not_assessable"] == quality["reasons"]
        folder = Path(job["result_dir"])
        assert not (folder / SEG_FILE).exists()
        assert "Not assessable: 16 slices" in (folder / REPORT_FILE).read_text()
        assert "|TX|ACL^ACL assessment^99AIW||not assessable: 16 slices" in \
            (folder / HL7_FILE).read_bytes().decode()
        rows = wait_until(lambda: [r for r in node.sql("SELECT object_kind, state FROM outbox")
                                   if r["state"] == "sent"] or None, 30, "the SR sent")
        assert [r["object_kind"] for r in rows] == ["sr"]
        [received] = pacs.received()
        assert pydicom.dcmread(received).Modality == "SR"
        url = f"http://127.0.0.1:{node.config['web']['port']}/studies/{study.study_uid}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            page = answer.read().decode("utf-8")
        assert 'id="quality"' in page and "16 slices; the model was trained on" in page
        assert "The SEG is not sent" in page and ">torn<" not in page
    finally:
        pacs.stop()
