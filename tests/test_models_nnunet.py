"""Format ``nnunet_v2``: an nnU-Net v2 results folder run through nnU-Net's own predictor.

The model is built here from a plans file (tests/helpers/nnunet.py: a three-stage
PlainConvUNet, random weights, two folds ensembled, test-time mirroring on). The node's
label map must equal, voxel for voxel, the one ``nnUNetv2_predict_from_modelfolder`` (run
as its own process on a NIfTI file of the same volume) writes, both for the engine in
this process and for a job of the running node that got the study over DICOM and sent its
SEG and SR to a real Orthanc.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from helpers.nnunet import manifest, plans, write_manifest, write_model, write_results
from helpers.tools import dciodvfy_errors, needs_dcmtk, wait_until
from test_e2e_orthanc import orthanc_results
from test_infer_e2e import send, wait_for_job

from aiworker.infer.engine import Engine
from aiworker.infer.manifest import ManifestError, parse_manifest
from aiworker.infer.registry import Registry
from aiworker.infer.volume import LoadedSeries, load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, WrittenStudy, write_study
from aiworker.phantom.truth import truth_series
from aiworker.results.uids import result_uid
from aiworker.store.layout import LABELS_FILE, SEG_FILE, SR_FILE

PREDICT = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
# the phantom's sagittal PD FS is 2.92 x 2.92 x 3.6 mm: nnU-Net resamples it to the plans'
# grid and its prediction back
PLAN = plans(patch_size=[8, 32, 32], spacing=[3.0, 3.5, 3.5])
NAMES = {1: ("femur", "71341001"), 2: ("tibia", "12611008"), 3: ("patella", "64234005")}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site models_dir holding the nnU-Net model (folder ``knee-nnunet``)."""
    root = tmp_path_factory.mktemp("models")
    write_model(root / "knee-nnunet", PLAN)
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> WrittenStudy:
    """A phantom knee study with only its sagittal PD FS (16 slices of 48 x 48)."""
    return write_study(tmp_path_factory.mktemp("knee") / "study", StudyOptions(
        seed=17, rescan=False, derived=False, truth=False,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=48, slices=16)))


@pytest.fixture(scope="module")
def series(study: WrittenStudy) -> LoadedSeries:
    return load_series(truth_series(study).files)


@pytest.fixture(scope="module")
def reference(model: Path, series: LoadedSeries, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Any]:
    """``nnUNetv2_predict_from_modelfolder`` on a NIfTI file of the series, started at once
    in its own process; the fixture's value waits for it and reads its label map."""
    root = tmp_path_factory.mktemp("nnunet-cli")
    (root / "in").mkdir()
    sitk.WriteImage(series.image, str(root / "in" / "knee_0000.nii.gz"))
    proc = subprocess.Popen(
        [str(PREDICT), "-i", str(root / "in"), "-o", str(root / "out"),
         "-m", str(model / "knee-nnunet" / "results"), "-f", "0", "1",
         "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_progress_bar"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def labels() -> sitk.Image:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output[-3000:]
        return sitk.ReadImage(str(root / "out" / "knee.nii.gz"))

    yield labels
    proc.kill()
    proc.wait()


def registry(models: Path) -> Registry:
    return Registry(models, bundled_dir=models / "no-bundled-models")


def test_the_engine_writes_what_nnunetv2_predict_writes(model, series, reference):
    spec = registry(model).get("knee-nnunet")
    assert spec.manifest.input.channels == ["main"]  # dataset.json's PD_FS, by nnunet.channels
    assert [(label.value, label.name, label.type.value, label.category.meaning)
            for label in spec.manifest.outputs.segmentation.labels] == \
        [(value, name, code, "Anatomical Structure") for value, (name, code) in NAMES.items()]
    engine = Engine(spec, "cpu")
    result = engine.run([series])
    cli = reference()

    assert result.labels.shape == sitk.GetArrayFromImage(series.image).shape
    np.testing.assert_array_equal(result.labels, sitk.GetArrayFromImage(cli))
    np.testing.assert_allclose(cli.GetOrigin(), series.image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(cli.GetDirection(), series.image.GetDirection(), atol=1e-5)
    counts = np.bincount(result.labels.ravel(), minlength=4)
    assert (counts > 200).all(), f"every label in sizeable parts: {counts}"
    voxel_ml = math.prod(series.image.GetSpacing()) / 1000
    assert result.findings["volumes_ml"] == {
        name: round(float(counts[value]) * voxel_ml, 3) for value, (name, _) in NAMES.items()}
    assert set(result.timings) == {"preprocess", "model", "postprocess", "resample"}
    assert result.device == "cpu"


def test_a_bad_results_folder_fails_at_start_with_one_line_per_problem(tmp_path):
    folder = tmp_path / "bad"
    dataset = {"channel_names": {"0": "PD_FS", "1": "T1"}, "file_ending": ".nii.gz",
               "labels": {"background": 0, "femur": 1, "blob": 2}, "numTraining": 1}
    plan = plans([8, 32, 32], [3.0, 3.5, 3.5]) | {"image_reader_writer": "NibabelIO"}
    write_results(folder / "results", plan, folds=(0,), dataset=dataset)
    write_manifest(folder, manifest(nnunet={"folds": [0, 3], "configuration": "2d"}))
    with pytest.raises(ManifestError) as caught:
        registry(tmp_path)
    where, results = folder / "model.yaml", folder / "results"
    assert caught.value.problems == [
        f"{where}: nnunet.folds: {results / 'fold_3' / 'checkpoint_final.pth'} is missing",
        f"{where}: nnunet.configuration: {results / 'plans.json'} has no '2d' "
        "(it has 3d_fullres)",
        f"{results / 'plans.json'}: image_reader_writer: NibabelIO is not supported "
        "(only SimpleITKIO, SimpleITKIOWithReorient)",
        f"{where}: nnunet.channels: no series role for channel(s) T1 of "
        f"{results / 'dataset.json'}",
        f"{where}: outputs.segmentation.labels: no label for {results / 'dataset.json'}'s "
        "label 2 'blob' (DICOM PS3.16 has no SNOMED CT concept of that name: give its name, "
        "color, category and type)"]


def test_the_manifest_names_the_folds_and_keeps_preprocessing_to_nnunet():
    raw = manifest()
    raw["nnunet"].pop("folds")
    with pytest.raises(ManifestError) as caught:
        parse_manifest(yaml.safe_dump(raw), Path("m.yaml"))
    assert "m.yaml: nnunet.folds: Field required" in caught.value.problems
    label = {"value": 1, "name": "Femur", "color": [1, 2, 3],
             "category": {"value": "91723000", "meaning": "Anatomical structure"},
             "type": {"value": "71341001", "meaning": "Femur"}}
    raw = manifest(input={"channels": ["main"], "spacing_mm": [1, 1, 3]}, weights="x.pt",
                   outputs={"segmentation": {"labels": [label]}})
    with pytest.raises(ManifestError) as caught:
        parse_manifest(yaml.safe_dump(raw), Path("m.yaml"))
    assert caught.value.problems == [
        "m.yaml: weights: not for format nnunet_v2: nnunet.results names the folder",
        "m.yaml: input.spacing_mm: nnU-Net preprocesses as its plans say; not for format "
        "nnunet_v2"]


@needs_dcmtk
def test_a_sent_study_gets_nnunets_labels_in_its_seg_and_sr(node_factory, orthanc_factory,
                                                           model, study, reference):
    orthanc = orthanc_factory({})
    node = node_factory(
        destinations={"pacs": {"kind": "dicom", "host": "127.0.0.1",
                               "port": orthanc.dicom_port, "ae_title": "ORTHANC"}},
        pipelines=[{"name": "knee", "rules": "config/rules/knee.yaml",
                    "model": "knee-nnunet", "outputs": ["seg", "sr"],
                    "send_to": ["pacs"]}],
        inference={"models_dir": str(model), "threads": 1},
        dispatch={"interval_s": 0.1})
    send(node, study)
    job = wait_for_job(node, "done", 60)
    target = truth_series(study)
    labels = sitk.ReadImage(str(Path(job["result_dir"]) / LABELS_FILE))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels),
                                  sitk.GetArrayFromImage(reference()))
    objects = wait_until(lambda: orthanc_results(orthanc, study.study_uid), 30,
                         "the SEG and SR in Orthanc")
    seg, sr = objects["SEG"], objects["SR"]
    for name in (SEG_FILE, SR_FILE):
        assert dciodvfy_errors(Path(job["result_dir"]) / name) == [], name
    model_id = "knee-nnunet@1.0.0"
    assert seg.SOPInstanceUID == result_uid(target.uid, model_id, "seg")
    assert sr.SOPInstanceUID == result_uid(target.uid, model_id, "sr")
    assert [(s.SegmentNumber, s.SegmentLabel,
             s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in seg.SegmentSequence] \
        == [(value, name, code) for value, (name, code) in NAMES.items()]
    truth = sitk.GetArrayFromImage(labels)
    frames = seg.pixel_array.reshape(-1, *truth.shape[1:])
    voxels = {value: 0 for value in NAMES}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        voxels[number] += int(frame.astype(bool).sum())
    assert voxels == {value: int((truth == value).sum()) for value in NAMES}
