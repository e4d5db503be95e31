"""Models that read several series, each on its own grid, and models that only classify.

The model is built here: an MRNet-style ACL classifier in TorchScript that takes a sagittal,
a coronal and an axial tensor (``network(sag, cor, ax)``) and returns a dict whose ``acl``
output holds two logits, a fixed function of the three volumes' mean intensities. Its
manifest gives each input its own spacing and size, and it has no segmentation. Tests check
what each input is resampled to, the probability against that function, and, through the
running node (storescu -> node -> storescp): the job only for the study that has all three
series (the other's selection names the missing role), an SR with the classification
(dciodvfy clean, no segment referenced), the Secondary Capture in place of the SEG, no SEG,
and the text report and HL7 message carrying the ACL call.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from helpers.tools import dciodvfy_errors, needs_dcmtk, wait_until
from test_dispatch_outbox import StoreSCP
from test_infer_e2e import send, wait_for_job

from aiworker.infer import whole
from aiworker.infer.engine import Engine
from aiworker.infer.manifest import ManifestError, parse_manifest
from aiworker.infer.manifest_sections import ClassificationHead
from aiworker.infer.preprocess import labels_image
from aiworker.infer.registry import Registry
from aiworker.infer.volume import LoadedSeries, labels_to_series, load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study
from aiworker.results.sr import ABSENT, FINDING_CODES, PRESENT
from aiworker.store.layout import HL7_FILE, REPORT_FILE, SC_FILE, SEG_FILE, SR_FILE

ROLES = {"sag": "sag_pd_fs", "cor": "cor_pd_fs", "ax": "ax_pd_fs"}
SIZES = {"sag": [40, 40, 12], "cor": [32, 32, 10], "ax": [24, 24, 8]}
SPACINGS = {"sag": [3.0, 3.0, 4.0], "cor": [4.0, 4.0, 5.0], "ax": [5.0, 5.0, 6.0]}
WEIGHTS = {"sag": 6.0, "cor": -4.0, "ax": 2.0}
BIAS = -1.0


class ThreeViews(torch.nn.Module):
    """Logits (intact, torn) = (0, 6 mean(sag) - 4 mean(cor) + 2 mean(ax) - 1), and each
    input's spatial shape as a second output (which the manifest does not read)."""

    def forward(self, sag: torch.Tensor, cor: torch.Tensor, ax: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        score = 6.0 * sag.mean() - 4.0 * cor.mean() + 2.0 * ax.mean() - 1.0
        logits = torch.stack([torch.zeros_like(score), score]).reshape(1, 2)
        shapes = torch.tensor([list(sag.shape[2:]), list(cor.shape[2:]), list(ax.shape[2:])],
                              dtype=torch.float32).reshape(1, 9)
        return {"acl": logits, "shapes": shapes}


def manifest(**changes) -> dict:
    raw = {
        "name": "three-view-acl", "version": "1.0.0", "format": "torchscript",
        "weights": "model.ts",
        "inputs": [{"channels": [role], "orientation": "LPS", "spacing_mm": SPACINGS[role],
                    "size": SIZES[role],
                    "normalization": {"method": "percentile", "lower": 1, "upper": 99}}
                   for role in ROLES],
        "outputs": {"classification": [{
            "name": "acl", "classes": ["intact", "torn"], "positive": "torn",
            "threshold": 0.5, "network": {"output": "acl", "activation": "softmax"}}]},
        "gate": {"input": {"slices": [10, None]}},
        "intended_use": "Tests only; not a medical device."}
    return raw | changes


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site models_dir with the three-view classifier (folder ``three-view``)."""
    root = tmp_path_factory.mktemp("models")
    folder = root / "three-view"
    folder.mkdir()
    with warnings.catch_warnings():  # TorchScript is a format manifests promise to read
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(ThreeViews()), str(folder / "model.ts"))
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest(), sort_keys=False),
                                       encoding="utf-8")
    return root


def phantom(folder: Path, seed: int, roles: tuple[str, ...]) -> WrittenStudy:
    return write_study(folder, StudyOptions(
        seed=seed, rescan=False, derived=False, truth=False,
        overrides=Overrides(roles=roles, matrix=40, slices=12)))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> WrittenStudy:
    """A phantom knee study with a sagittal, a coronal and an axial PD FS series."""
    return phantom(tmp_path_factory.mktemp("three") / "study", 31, tuple(ROLES.values()))


def views(study: WrittenStudy) -> list[LoadedSeries]:
    """The study's series in the model's role order (sag, cor, ax), told apart by the axis
    their slices are stacked along (L-R: sagittal, A-P: coronal, S-I: axial)."""
    files: dict[str, list[Path]] = {}
    for path in sorted(study.dicom_dir.rglob("*")):
        if path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            files.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    by_axis = {}
    for paths in files.values():
        loaded = load_series(paths)
        normal = np.array(loaded.image.GetDirection()).reshape(3, 3)[:, 2]
        by_axis[int(np.argmax(np.abs(normal)))] = loaded
    assert sorted(by_axis) == [0, 1, 2]
    return [by_axis[axis] for axis in range(3)]


def registry(root: Path) -> Registry:
    return Registry(root, bundled_dir=root / "no-bundled-models")


def expected_probability(series: list[LoadedSeries], spec) -> float:
    prepared = whole.prepare([s.image for s in series], spec.manifest)
    score = BIAS + sum(WEIGHTS[role] * float(p.array.mean())
                       for role, p in zip(ROLES, prepared, strict=True))
    return 1.0 / (1.0 + math.exp(-score))


def test_each_input_is_resampled_on_its_own_grid_and_fed_as_its_own_tensor(models, study):
    spec = registry(models).get("three-view-acl")
    assert spec.manifest.roles == list(ROLES) and spec.manifest.whole_inputs
    series = views(study)
    prepared = whole.prepare([s.image for s in series], spec.manifest)
    for role, item in zip(ROLES, prepared, strict=True):
        assert item.array.shape == (1, *SIZES[role])
        assert item.reference.GetSize() == tuple(SIZES[role])
        np.testing.assert_allclose(item.reference.GetSpacing(), SPACINGS[role])
        direction = np.array(item.reference.GetDirection()).reshape(3, 3)
        assert (np.diag(direction) > 0.9).all(), f"{role}: LPS (to within the obliquity)"
        assert 0.0 <= item.array.min() and item.array.max() <= 1.0 and item.array.std() > 0.05
    engine = Engine(spec, "cpu")
    found = engine.call([item.array for item in prepared])
    np.testing.assert_array_equal(whole.pick(found, "shapes", "m"),
                                  [n for role in ROLES for n in SIZES[role]])
    result = engine.run(series)
    acl = result.findings["classification"]["acl"]
    p = expected_probability(series, spec)
    assert acl["probability"] == pytest.approx(p, abs=1e-4)
    assert acl["decision"] == ("torn" if p >= 0.5 else "intact")
    assert acl["probabilities"]["torn"] + acl["probabilities"]["intact"] == pytest.approx(1)
    assert result.findings["segmentation"] is False and result.findings["volumes_ml"] == {}
    assert result.labels.shape == series[0].array().shape and not result.labels.any()
    assert set(result.timings) == {"preprocess", "model", "postprocess"}
    with pytest.raises(Exception, match="reads 3 series"):
        engine.run(series[:2])


class TwoViewsSegmenting(torch.nn.Module):
    """Output 0: logits (background, bright) of the sagittal input, bright where its
    normalized intensity is above 0.5; output 1: one logit, the coronal input's mean."""

    def forward(self, sag: torch.Tensor, cor: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([0.5 - sag, sag - 0.5], dim=1), cor.mean().reshape(1, 1)


def test_a_multi_input_model_segments_on_its_first_input_and_classifies_from_its_outputs(
        tmp_path, study):
    folder = tmp_path / "models" / "two-view"
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(TwoViewsSegmenting()), str(folder / "model.ts"))
    code = {"value": "91723000", "meaning": "Anatomical structure"}
    raw = manifest(name="two-view", inputs=manifest()["inputs"][:2], gate=None, outputs={
        "segmentation": {"labels": [{"value": 1, "name": "Bright", "color": [255, 0, 0],
                                     "category": code, "type": code}], "output": 0},
        "classification": [{"name": "cor", "classes": ["dim", "bright"],
                             "positive": "bright", "network": {"output": 1,
                                                               "activation": "sigmoid"}}]})
    (folder / "model.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec = registry(tmp_path / "models").get("two-view")
    series = views(study)[:2]
    result = Engine(spec, "cpu").run(series)

    prepared = whole.prepare([s.image for s in series], spec.manifest)
    bright = (prepared[0].array[0] > 0.5).astype(np.uint8)
    expected = labels_to_series(labels_image(bright, prepared[0].reference), series[0])
    assert 0 < expected.sum() < expected.size / 2
    np.testing.assert_array_equal(result.labels, expected)
    voxel_ml = math.prod(series[0].image.GetSpacing()) / 1000
    assert result.findings["volumes_ml"] == {"Bright": round(expected.sum() * voxel_ml, 3)}
    assert "segmentation" not in result.findings
    p = 1 / (1 + math.exp(-float(prepared[1].array.mean())))
    assert result.findings["classification"]["cor"]["probability"] == pytest.approx(p, abs=1e-4)


def test_a_network_head_reads_sigmoid_or_softmax_and_names_a_wrong_output():
    head = ClassificationHead.model_validate({
        "name": "acl", "classes": ["intact", "torn"], "positive": "torn",
        "network": {"output": 1, "activation": "sigmoid"}})
    finding = whole.network_finding(head, np.array([0.0]), "m")
    assert (finding["probability"], finding["decision"]) == (0.5, "torn")
    assert whole.network_finding(head, np.array([-2.0]), "m")["decision"] == "intact"
    with pytest.raises(Exception, match="no output 1 .*1 output"):
        whole.pick([np.zeros(2)], 1, "m")
    with pytest.raises(Exception, match="sigmoid reads one value"):
        whole.network_finding(head, np.zeros(2), "m")


def test_the_manifest_checks_inputs_and_heads_with_one_line_per_problem():
    both = manifest(input={"channels": ["sag"]}, inference={"roi_size": [8, 8, 8]})
    both["inputs"][1]["channels"] = ["sag"]
    both["outputs"]["classification"][0]["region"] = {
        "label": 1, "features": ["volume_ml"], "mean": [0], "scale": [1],
        "coefficients": [1], "intercept": 0}
    with pytest.raises(ManifestError) as caught:
        parse_manifest(yaml.safe_dump(both), Path("m.yaml"))
    assert caught.value.problems == [
        "m.yaml: outputs.classification.0: give exactly one of region (a model over a "
        "segmented region) and network (an output of the network)"]
    del both["outputs"]["classification"][0]["region"]
    with pytest.raises(ManifestError) as caught:
        parse_manifest(yaml.safe_dump(both), Path("m.yaml"))
    assert caught.value.problems == [
        "m.yaml: input: give input (one tensor) or inputs (one per tensor), not both"]
    del both["input"]
    with pytest.raises(ManifestError) as caught:
        parse_manifest(yaml.safe_dump(both), Path("m.yaml"))
    assert caught.value.problems == [
        "m.yaml: inputs: each role feeds one channel; repeated: sag",
        "m.yaml: inference.roi_size: a model run on whole inputs (inputs, or a network "
        "classification head) has no sliding window; leave it out"]
    parsed = parse_manifest(yaml.safe_dump(manifest()), Path("m.yaml"))
    assert parse_manifest(parsed.to_yaml(), Path("m.yaml")) == parsed


RULES = {"description": "three planes for the three-view ACL classifier", "roles": {
    role: {"require": [{"tag": "Modality", "equals": "MR"},
                       {"feature": "plane", "equals": plane},
                       {"feature": "fat_suppressed", "equals": True}]}
    for role, plane in (("sag", "sagittal"), ("cor", "coronal"), ("ax", "axial"))}}


def sr_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of an SR, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        found += [item, *sr_items(item)]
    return found


@needs_dcmtk
def test_a_study_with_every_view_gets_an_sr_and_report_without_seg(node_factory, tmp_path,
                                                                  models, study):
    partial = phantom(tmp_path / "partial", 32, ("sag_pd_fs", "cor_pd_fs"))
    rules = tmp_path / "three-views.yaml"
    rules.write_text(yaml.safe_dump(RULES), encoding="utf-8")
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        node = node_factory(
            destinations={"pacs": {"kind": "dicom", "host": "127.0.0.1", "port": pacs.port,
                                   "ae_title": "PACS", "accepts": ["sr", "sc"]}},
            pipelines=[{"name": "views", "rules": str(rules), "model": "three-view-acl",
                        "outputs": ["seg", "sr", "report", "hl7"], "send_to": ["pacs"]}],
            inference={"models_dir": str(models), "threads": 1},
            dispatch={"interval_s": 0.1})
        send(node, partial)
        send(node, study)
        job = wait_for_job(node, "done", 60)
        received = wait_until(lambda: len(pacs.received()) == 2 and pacs.received(), 30,
                              "the SR and the Secondary Capture at the PACS")
        missing = wait_until(lambda: (node.study_status(partial.study_uid) or {}).get(
            "selection", {}).get("views"), 30, "the partial study's selection")
    finally:
        pacs.stop()
    assert missing["matched"] is False and missing["jobs"] == []
    assert missing["reason"] == "role ax: none of the 2 series meets its conditions"
    assert job["study_uid"] == study.study_uid
    assert len(node.sql("SELECT * FROM jobs")) == 1

    folder = Path(job["result_dir"])
    assert not (folder / SEG_FILE).exists() and (folder / SC_FILE).is_file()
    objects = {ds.SOPClassUID: ds for ds in (pydicom.dcmread(path) for path in received)}
    assert sorted(str(ds.SOPClassUID.name) for ds in objects.values()) == [
        "Comprehensive 3D SR Storage", "Secondary Capture Image Storage"], \
        "the SC goes in place of the SEG; no SEG exists"
    assert dciodvfy_errors(folder / SR_FILE) == []
    [sr] = [ds for ds in objects.values() if ds.Modality == "SR"]
    spec = registry(models).get("three-view-acl")
    p = expected_probability(views(study), spec)
    torn = p >= 0.5
    items = sr_items(sr)
    evaluations = [i for i in items if i.ValueType == "CODE"
                   and i.ConceptNameCodeSequence[0].CodeValue == FINDING_CODES["acl"].value]
    assert [e.ConceptCodeSequence[0].CodeValue for e in evaluations] == \
        [(PRESENT if torn else ABSENT).value]
    [probability] = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                     if i.ValueType == "NUM"]
    assert probability == pytest.approx(p, abs=1e-4)
    assert [i.TextValue for i in items if i.ValueType == "TEXT"
            and i.ConceptNameCodeSequence[0].CodeValue == "112039"] == ["acl"]
    assert not [i for i in items if i.ValueType == "IMAGE"], "no segment to reference"

    report = (folder / REPORT_FILE).read_text(encoding="utf-8")
    state = "torn" if torn else "intact"
    assert f"Anterior cruciate ligament: {state} (probability of a tear {p:.2f}" in report
    assert "(and 2 more series)" in report and "classification without segmentation" in report
    assert "Not assessed" not in report and "mL" not in report
    message = (folder / HL7_FILE).read_bytes().decode("utf-8").split("\r")
    obx = [segment.split("|") for segment in message if segment.startswith("OBX")]
    assert [o[5].split("^")[0] for o in obx if o[3].startswith("ACL^")] == \
        [{"torn": "ACL-TORN", "intact": "ACL-INTACT"}[state]]
    assert [float(o[5]) for o in obx if o[3].startswith("ACL-TEAR-P")] == \
        [pytest.approx(p, abs=1e-4)]
    assert not [o for o in obx if o[3].startswith("VOL-")]
