"""``aiworker infer``: offline selection and inference over folders of phantom studies, run
through the console script; and ``aiworker train-demo``'s pass-through of its options.

Until the bundled knee-demo model exists, a tiny UNet with random weights in a temporary
models_dir stands in: these tests check where labels land and what the files say, not how
good the labels are. The bundled model's accuracy is checked when its model.yaml is there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml
from monai.networks.nets import UNet
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from typer.testing import CliRunner

from aiworker.cli import app
from aiworker.infer.registry import BUNDLED_MODELS
from aiworker.infer.volume import load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study

AIWORKER = Path(sys.executable).parent / "aiworker"
TINY_UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8],
             "strides": [2]}
SCT_STRUCTURE = {"value": "91723000", "scheme_designator": "SCT",
                 "meaning": "Anatomical structure"}
TINY_MANIFEST: dict[str, Any] = {
    "name": "knee-tiny", "version": "0.0.1", "format": "state_dict",
    "network": {"class": "UNet", "args": TINY_UNET},
    "input": {"channels": ["sag_pd_fs"], "orientation": "PIL", "spacing_mm": [2.0, 2.0, 4.0],
              "normalization": {"method": "zscore"}, "size": [32, 32, 16]},
    "inference": {"roi_size": [32, 32, 16], "sw_batch_size": 1, "time_limit_s": 60},
    "outputs": {
        "segmentation": {"labels": [
            {"value": 1, "name": "Femur", "color": [230, 216, 170], "category": SCT_STRUCTURE,
             "type": {"value": "71341001", "scheme_designator": "SCT", "meaning": "Femur"}},
            {"value": 2, "name": "Tibia", "color": [200, 180, 140], "category": SCT_STRUCTURE,
             "type": {"value": "12611008", "scheme_designator": "SCT", "meaning": "Tibia"}},
        ]},
        "classification": [{"name": "acl", "classes": ["intact", "torn"], "positive": "torn",
                            "region": {"label": 1, "reference_label": 2,
                                       "features": ["volume_ratio"], "mean": [1.0],
                                       "scale": [1.0], "coefficients": [1.0],
                                       "intercept": 0.0}}],
    },
    "intended_use": "Tests only; not a medical device.",
}
TIMINGS = {"load", "preprocess", "model", "postprocess", "resample", "write", "seg", "sr", "report",
           "hl7", "preview", "total"}
ENTRY_KEYS = {"study_uid", "status", "pipeline", "model", "series", "output", "device",
              "findings", "timings", "error"}
HAVE_KNEE_DEMO = (BUNDLED_MODELS / "knee_demo" / "model.yaml").exists()


# --- helpers -----------------------------------------------------------------------------


def small_study(folder: Path, seed: int) -> Path:
    """A two-series phantom (sagittal and coronal PD FS, 64 x 64, 16 slices) with its truth."""
    write_study(folder, StudyOptions(
        seed=seed, vendor="siemens", descriptions="vendor", rescan=False, derived=False,
        overrides=Overrides(("sag_pd_fs", "cor_pd_fs"), 64, 16), volume_spacing=2.0))
    return folder


def facts(case: Path) -> dict[str, Any]:
    return json.loads((case / "truth" / "facts.json").read_text())


def sag_pd_fs(case: Path) -> dict[str, Any]:
    """The facts of the study's sagittal PD FS series (the one the knee rules pick)."""
    return next(s for s in facts(case)["series"] if s["role"] == "sag_pd_fs")


def series_files(case: Path, series: dict[str, Any]) -> list[Path]:
    return sorted((case / series["folder"]).glob("*.dcm"))


def infer(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``aiworker infer`` on the CPU, as a user would; rich tables get a wide terminal."""
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([str(AIWORKER), "infer", *map(str, args), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env=env)


def entries_by_study(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    entries = json.loads(proc.stdout)
    assert all(set(entry) == ENTRY_KEYS for entry in entries)
    return {entry["study_uid"]: entry for entry in entries}


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    """Same size, and origin, spacing and direction equal up to NIfTI's float32 storage."""
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4)


def assert_study_outputs(out: Path, case: Path, entry: dict[str, Any], model: str) -> None:
    """The study's three files exist and say what ``entry`` says about the chosen series."""
    chosen = sag_pd_fs(case)
    folder = out / facts(case)["study_uid"]
    assert entry["status"] == "done" and entry["error"] is None
    assert entry["output"] == str(folder) and entry["model"] == model
    assert entry["series"] == {"main": {"series_uid": chosen["series_uid"],
                                        "series_number": chosen["series_number"],
                                        "description": chosen["series_description"]}}
    loaded = load_series(series_files(case, chosen))
    labels = sitk.ReadImage(str(folder / "labels.nii.gz"))
    assert_same_grid(labels, loaded.image)
    assert labels.GetPixelID() == sitk.sitkUInt8
    written = json.loads((folder / "findings.json").read_text())
    assert written["selection"]["pipeline"] == "knee"
    assert written["selection"]["series"]["main"]["series_uid"] == chosen["series_uid"]
    assert written["findings"]["series_uid"] == chosen["series_uid"]
    assert written["findings"] == entry["findings"]
    assert set(written["findings"]["volumes_ml"]) >= {"Femur", "Tibia"}
    assert written["findings"]["classification"]["acl"]["decision"] in ("intact", "torn")
    timings = json.loads((folder / "timings.json").read_text())
    assert set(timings) == TIMINGS and timings == entry["timings"]
    assert all(value >= 0 for value in timings.values())
    assert timings["total"] >= timings["load"] + timings["model"]
    seg, sr = (pydicom.dcmread(folder / name) for name in ("seg.dcm", "sr.dcm"))
    assert seg.SOPClassUID == SegmentationStorage and sr.SOPClassUID == Comprehensive3DSRStorage
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == chosen["series_uid"]
    assert {item.SegmentLabel for item in seg.SegmentSequence} == set(
        written["findings"]["volumes_ml"])
    assert "not for diagnostic use" in (folder / "report.txt").read_text()
    assert (folder / "oru.hl7").read_bytes().startswith(b"MSH|^~\\&|AIWORKER|AIWORKER|RIS|")
    assert (folder / "preview.png").read_bytes().startswith(b"\x89PNG")
    sc = pydicom.dcmread(folder / "sc.dcm")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in {
        ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0]
        .ReferencedInstanceSequence}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.logical_and(a, b).sum()) / max(1, int(a.sum() + b.sum()))


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site models_dir holding knee-tiny: a small UNet, random weights, fixed seed."""
    root = tmp_path_factory.mktemp("models")
    folder = root / "knee-tiny"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(UNet(**TINY_UNET).state_dict(), folder / "model.pt")
    (folder / "model.yaml").write_text(yaml.safe_dump(TINY_MANIFEST))
    return root


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small phantom studies (case folders with dicom/ and truth/)."""
    root = tmp_path_factory.mktemp("studies")
    return [small_study(root / f"case-{i}", seed=4100 + i) for i in range(2)]


# --- tests -------------------------------------------------------------------------------


def test_json_run_writes_labels_findings_and_timings_per_study(
        cases: list[Path], models_dir: Path, tmp_path: Path) -> None:
    studies = tmp_path / "in"
    for case in cases:  # a folder of studies, as a user would collect them
        shutil.copytree(case / "dicom", studies / case.name)
    out = tmp_path / "out"
    proc = infer(studies, "--out", out, "--model", "knee-tiny", "--models-dir", models_dir,
                 "--json")
    assert proc.returncode == 0, proc.stderr
    entries = entries_by_study(proc)
    assert sorted(entries) == sorted(facts(case)["study_uid"] for case in cases)
    for case in cases:
        entry = entries[facts(case)["study_uid"]]
        assert entry["device"] == "cpu" and entry["pipeline"] == "knee"
        assert_study_outputs(out, case, entry, "knee-tiny@0.0.1")
    assert sorted(p.name for p in out.iterdir()) == sorted(entries)
    assert quiet_libraries(proc.stderr), proc.stderr


def quiet_libraries(stderr: str) -> bool:
    """Only aiworker's own loggers log below WARNING (the libraries keep quiet)."""
    lines = [re.match(r"^\S+ \S+ (\w+) +([\w.]+): ", line) for line in stderr.splitlines()]
    return all(m.group(2).split(".")[0] == "aiworker" or m.group(1) in ("WARNING", "ERROR")
               for m in lines if m)


def test_study_without_a_sagittal_pd_fs_is_reported_and_the_run_goes_on(
        cases: list[Path], models_dir: Path, tmp_path: Path) -> None:
    good, no_sag, broken = (tmp_path / name for name in ("good", "no-sag", "broken"))
    shutil.copytree(cases[0], good)
    small_study(no_sag, seed=4200)
    shutil.rmtree(no_sag / sag_pd_fs(no_sag)["folder"])
    small_study(broken, seed=4201)
    victim = series_files(broken, sag_pd_fs(broken))[8]
    victim.write_bytes(victim.read_bytes()[:-3000])  # pixel data cut short: not decodable
    studies = tmp_path / "in"
    for case in (good, no_sag, broken):
        shutil.copytree(case / "dicom", studies / case.name)
    out = tmp_path / "out"
    proc = infer(studies, "--out", out, "--model", "knee-tiny", "--models-dir", models_dir,
                 "--json")
    assert proc.returncode == 1, proc.stderr
    entries = entries_by_study(proc)
    assert len(entries) == 3
    assert_study_outputs(out, good, entries[facts(good)["study_uid"]], "knee-tiny@0.0.1")
    missing = entries[facts(no_sag)["study_uid"]]
    assert missing["status"] == "no_series" and missing["series"] == {}
    assert missing["error"]["kind"] == "data"
    assert missing["error"]["reason"].startswith("no series selected: role main: none of "
                                                 "the 1 series")
    failed = entries[facts(broken)["study_uid"]]
    assert failed["status"] == "failed" and failed["error"]["kind"] == "data"
    assert failed["series"]["main"]["series_uid"] == sag_pd_fs(broken)["series_uid"]
    assert "cannot be decoded" in failed["error"]["reason"] or \
        "does not match" in failed["error"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == [facts(good)["study_uid"]]


def test_summary_table_names_each_study_and_why_one_has_no_result(
        cases: list[Path], models_dir: Path, tmp_path: Path) -> None:
    no_sag = tmp_path / "no-sag"
    shutil.copytree(cases[1], no_sag)
    shutil.rmtree(no_sag / sag_pd_fs(no_sag)["folder"])
    studies = tmp_path / "in"
    shutil.copytree(cases[0] / "dicom", studies / "a")
    shutil.copytree(no_sag / "dicom", studies / "b")
    proc = infer(studies, "--out", tmp_path / "out", "--model", "knee-tiny",
                 "--models-dir", models_dir)
    assert proc.returncode == 1, proc.stderr
    rows = {uid: next(line for line in proc.stdout.splitlines() if uid in line)
            for uid in (facts(cases[0])["study_uid"], facts(cases[1])["study_uid"])}
    good_row, missing_row = rows.values()
    chosen = sag_pd_fs(cases[0])
    assert f"{chosen['series_number']} '{chosen['series_description']}'" in good_row
    assert "intact (p " in good_row or "torn (p " in good_row
    assert "no series selected" in missing_row
    missing_uid = facts(cases[1])["study_uid"]
    assert f"{missing_uid}: data: no series selected: role main: none of the 1 series " \
        "meets its conditions" in proc.stdout.splitlines()


def test_unknown_model_stops_the_run_before_any_study(cases: list[Path], tmp_path: Path
                                                      ) -> None:
    proc = infer(cases[0] / "dicom", "--out", tmp_path / "out", "--model", "no-such-model")
    assert proc.returncode == 2
    assert "model 'no-such-model' not found (available:" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAVE_KNEE_DEMO, reason="the bundled knee-demo model is not trained yet")
def test_bundled_knee_demo_segments_the_femur_on_the_sagittal_series(tmp_path: Path) -> None:
    case = tmp_path / "case"
    write_study(case, StudyOptions(seed=900_123, vendor="siemens", rescan=False, derived=False))
    out = tmp_path / "out"
    proc = infer(case / "dicom", "--out", out, "--json")  # the configured pipeline: knee-demo
    assert proc.returncode == 0, proc.stderr
    (entry,) = entries_by_study(proc).values()
    assert entry["model"].startswith("knee-demo@")
    assert_study_outputs(out, case, entry, entry["model"])
    labels = sitk.ReadImage(str(out / facts(case)["study_uid"] / "labels.nii.gz"))
    truth = sitk.ReadImage(str(case / "truth" / "labels.nii.gz"))
    assert_same_grid(labels, truth)
    femur = dice(sitk.GetArrayFromImage(labels) == 1, sitk.GetArrayFromImage(truth) == 1)
    assert femur >= 0.85, f"femur Dice {femur:.3f}"


def test_train_demo_passes_its_options_to_the_training_script(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from aiworker.models.knee_demo import train

    calls: list[list[str]] = []
    monkeypatch.setattr(train, "main", calls.append)
    result = CliRunner().invoke(app, ["train-demo", "--seed", "3", "--cases", "4",
                                      "--iterations", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls == [["--seed", "3", "--cases", "4", "--iterations", "5",
                      "--out", str(tmp_path)]]
