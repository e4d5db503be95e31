"""The quality gate's confidence for format ``nnunet_v2``, from nnU-Net's own probabilities.

The model (tests/helpers/nnunet.py: random weights; one fold, no mirroring, to be quick) gets
a gate that checks the confidence in every label. The node then asks nnU-Net's predictor for
its probabilities, so its label map must equal what nnU-Net's own
``nnUNetPredictor.predict_single_npy_array(..., save_or_return_probabilities=True)`` gives for
the NIfTI file of the same volume read by nnU-Net's ``SimpleITKIO`` (the path
``nnUNetv2_predict --save_probabilities`` takes; test_models_nnunet.py compares the labels
with that command itself), and the confidence (mean max probability) and entropy inside
each label must be those of its probabilities, computed here with numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers.nnunet import manifest, plans, write_model

from aiworker.infer.engine import Engine
from aiworker.infer.registry import Registry
from aiworker.infer.run import gated
from aiworker.infer.volume import load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series

PLAN = plans(patch_size=[8, 32, 32], spacing=[3.0, 3.5, 3.5])
NAMES = {1: "femur", 2: "tibia", 3: "patella"}
# femur's limit is met only where the model is certain of every femur voxel: it must fail
LIMITS = {"femur": 1.0, "tibia": 0.3, "patella": 0.3}


def nnunet_reference(results: Path, image: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities (classes, z, y, x) from nnU-Net's own predictor and reader."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"),
                                perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results), (0,), "checkpoint_final.pth")
    array, properties = SimpleITKIO().read_images([str(image)])
    return predictor.predict_single_npy_array(array, properties,
                                              save_or_return_probabilities=True)


def test_the_gate_reads_the_confidence_from_nnunets_probabilities(tmp_path):
    study = write_study(tmp_path / "study", StudyOptions(
        seed=23, rescan=False, derived=False, truth=False,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=32, slices=12)))
    series = load_series(truth_series(study).files)
    sitk.WriteImage(series.image, str(tmp_path / "knee_0000.nii.gz"))
    raw = manifest(gate={"output": {"min_confidence": LIMITS}},
                   nnunet={"folds": [0], "mirroring": False})
    write_model(tmp_path / "models" / "knee-nnunet", PLAN, raw, folds=(0,))
    spec = Registry(tmp_path / "models", bundled_dir=tmp_path / "none").get("knee-nnunet")
    result = Engine(spec, "cpu").run([series])
    findings = gated(result, [series], spec.manifest)
    labels, probabilities = nnunet_reference(tmp_path / "models" / "knee-nnunet" / "results",
                                             tmp_path / "knee_0000.nii.gz")
    assert probabilities.shape == (4, *labels.shape)
    np.testing.assert_array_equal(result.labels, labels)

    top = probabilities.max(axis=0)
    entropy = -(probabilities * np.log(np.clip(probabilities, 1e-12, 1))).sum(axis=0)
    expected = {value: float(top[labels == value].mean()) for value in NAMES}
    assert min(expected.values()) < 0.999, "the probabilities are not all certain"
    assert result.confidence == pytest.approx(expected, abs=1e-5)
    assert findings["entropy"] == pytest.approx(
        {name: float(entropy[labels == value].mean()) for value, name in NAMES.items()},
        abs=1e-4)
    checks = {c["structure"]: c for c in findings["quality"]["checks"]
              if c["check"] == "confidence"}
    assert {name: (c["value"], c["passed"]) for name, c in checks.items()} == {
        name: (pytest.approx(expected[value], abs=1e-4), expected[value] >= LIMITS[name])
        for value, name in NAMES.items()}
    assert findings["quality"]["structures"]["femur"] == [
        f"femur: model confidence {expected[1]:.2f}, below the 1.00 it has on its training "
        "data"]
