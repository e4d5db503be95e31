#!/usr/bin/env python3
"""An nnU-Net v2 model through ``aiworker infer`` and through ``nnUNetv2_predict_from_modelfolder``
on the same series, in the same run: seconds per step, wall time and peak RSS of each.

Builds a model from a plans file with random weights (tests/helpers/nnunet.py: a three-stage
PlainConvUNet, patch ``--patch``, features ``--features``, ``--folds`` folds, mirroring on)
and a phantom study (one sagittal PD FS of ``--matrix`` square, ``--slices`` slices), then
runs, one after the other, each as its own process on the CPU:

* ``aiworker infer STUDY --model knee-nnunet --json``: selection, load, nnU-Net's
  preprocess / model / resample, postprocess, and the result files (labels, findings, SEG,
  SR, report, HL7, preview), with the seconds of each step from its JSON;
* ``nnUNetv2_predict_from_modelfolder`` on a NIfTI file of the series as loaded
  (``-npp 1 -nps 1``: one preprocessing and one export worker).

Peak RSS is the largest sum of the resident sizes of the process and its children (nnU-Net's
workers), polled every 20 ms with psutil. The two label maps are compared voxel for voxel.
A table, then one JSON line, are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from helpers.nnunet import manifest, plans, write_model  # noqa: E402

from aiworker.infer.volume import load_series  # noqa: E402
from aiworker.phantom.protocol import Overrides  # noqa: E402
from aiworker.phantom.study import StudyOptions, write_study  # noqa: E402
from aiworker.phantom.truth import truth_series  # noqa: E402

BIN = Path(sys.executable).parent


def measured(command: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run ``command``; its result, wall seconds and the peak RSS (MiB) of its process tree."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)
        peak, root = 0, psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - started
        output.seek(0)
        text = output.read()
    result = subprocess.CompletedProcess(command, proc.returncode, text, "")
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({proc.returncode}):\n{text[-3000:]}")
    return result, wall, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--patch", type=int, nargs=3, default=[16, 96, 96], help="z y x")
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 0.8, 0.8],
                        help="the plans' spacing, z y x mm")
    parser.add_argument("--features", type=int, nargs=3, default=[16, 32, 64])
    parser.add_argument("--folds", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-nnunet-"))
    folds = tuple(range(args.folds))
    plan = plans(args.patch, args.spacing, args.features)
    write_model(work / "models" / "knee-nnunet", plan,
                manifest(nnunet={"folds": list(folds)}), folds=folds)
    study = write_study(work / "study", StudyOptions(
        seed=3, rescan=False, derived=False, truth=False,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=args.matrix, slices=args.slices)))
    series = load_series(truth_series(study).files)
    (work / "nifti").mkdir()
    sitk.WriteImage(series.image, str(work / "nifti" / "knee_0000.nii.gz"))

    ours, ours_wall, ours_rss = measured(
        [str(BIN / "aiworker"), "infer", str(work / "study"), "--out", str(work / "out"),
         "--model", "knee-nnunet", "--models-dir", str(work / "models"), "--device", "cpu",
         "--json"])
    [job] = json.loads(ours.stdout[ours.stdout.index("["):])
    theirs, theirs_wall, theirs_rss = measured(
        [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(work / "nifti"),
         "-o", str(work / "predicted"), "-m", str(work / "models" / "knee-nnunet" / "results"),
         "-f", *map(str, folds), "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_progress_bar"])
    ours_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(job["output"])
                                                            / "labels.nii.gz")))
    theirs_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "predicted"
                                                              / "knee.nii.gz")))
    differ = int((ours_labels != theirs_labels).sum())

    size = series.image.GetSize()
    print(f"series {size[0]}x{size[1]}x{size[2]}, plans patch {args.patch} at "
          f"{args.spacing} mm, features {args.features}, {args.folds} fold(s), mirroring, "
          f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores)")
    print(f"{'step':<12}{'aiworker infer':>16}")
    for step, seconds in job["timings"].items():
        print(f"{step:<12}{seconds:>15.2f}s")
    print(f"{'':<12}{'aiworker infer':>16}{'nnUNetv2_predict':>18}")
    print(f"{'wall':<12}{ours_wall:>15.2f}s{theirs_wall:>17.2f}s")
    print(f"{'peak RSS':<12}{ours_rss:>12.0f} MiB{theirs_rss:>14.0f} MiB")
    print(f"label maps: {differ} of {ours_labels.size} voxels differ")
    print(json.dumps({"series": list(size), "patch": args.patch, "folds": args.folds,
                      "aiworker": {"timings": job["timings"], "wall_s": round(ours_wall, 3),
                                   "peak_rss_mib": round(ours_rss)},
                      "nnunetv2_predict": {"wall_s": round(theirs_wall, 3),
                                           "peak_rss_mib": round(theirs_rss)},
                      "voxels_differ": differ, "labels": np.unique(ours_labels).tolist()}))


if __name__ == "__main__":
    main()
