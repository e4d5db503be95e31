"""The quality gate's confidence for format ``nnunet_v2``, from nnU-Net's own probabilities.

The model (tests/nnunet_support.py: random weights; one fold, no mirroring, to be quick) gets
a gate that checks the confidence in every label. The node then asks nnU-Net's predictor for its
probabilities, so its label map must equal what ``nnUNetv2_predict_from_modelfolder
--save_probabilities`` writes (run as its own process on a NIfTI file of the same volume),
and the confidence (mean max probability) and entropy inside each label must be those of
the probabilities that command saves, computed here with numpy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunet_support import manifest, plans, write_model

from aiworker.infer.engine import Engine
from aiworker.infer.registry import Registry
from aiworker.infer.run import gated
from aiworker.infer.volume import load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series

PREDICT = Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"
PLAN = plans(patch_size=[8, 32, 32], spacing=[3.0, 3.5, 3.5])
NAMES = {1: "femur", 2: "tibia", 3: "patella"}
# femur's limit is met only where the model is certain of every femur voxel: it must fail
LIMITS = {"femur": 1.0, "tibia": 0.3, "patella": 0.3}


def test_the_gate_reads_the_confidence_from_nnunets_probabilities(tmp_path):
    study = write_study(tmp_path / "study", StudyOptions(
        seed=23, rescan=False, derived=False, truth=False,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=32, slices=12)))
    series = load_series(truth_series(study).files)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(series.image, str(tmp_path / "in" / "knee_0000.nii.gz"))
    raw = manifest(gate={"output": {"min_confidence": LIMITS}},
                   nnunet={"folds": [0], "mirroring": False})
    write_model(tmp_path / "models" / "knee-nnunet", PLAN, raw, folds=(0,))
    proc = subprocess.Popen(
        [str(PREDICT), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
         "-m", str(tmp_path / "models" / "knee-nnunet" / "results"), "-f", "0", "--disable_tta",
         "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "1", "-nps", "1",
         "--save_probabilities", "--disable_progress_bar"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        spec = Registry(tmp_path / "models", bundled_dir=tmp_path / "none").get("knee-nnunet")
        result = Engine(spec, "cpu").run([series])
        findings = gated(result, [series], spec.manifest)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, output[-3000:]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "knee.nii.gz")))
    probabilities = np.load(tmp_path / "out" / "knee.npz")["probabilities"]
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
