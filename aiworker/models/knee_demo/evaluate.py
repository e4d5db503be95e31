"""Measure knee-demo on held-out phantoms: ``python -m aiworker.models.knee_demo.evaluate``.

Each case is a whole study written as DICOM by the phantom generator with its default
settings (seeds from :data:`~.data.HELD_OUT_SEEDS`, never used in training or fitting), so the
figures cover the node's real path: the sagittal PD FS files are read with
:func:`~aiworker.infer.volume.load_series` and run through the engine
(:class:`~aiworker.infer.engine.Engine`).
Dice is computed on the source slices against the study's ``truth/labels.nii.gz``; the ACL
head is scored against ``truth/facts.json`` (AUC, and sensitivity and specificity at the
manifest's threshold). Prints a Markdown table for the model card and writes the figures as
JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from aiworker.infer.engine import Engine
from aiworker.infer.registry import Registry
from aiworker.infer.volume import load_series
from aiworker.models.knee_demo.data import HELD_OUT_SEEDS
from aiworker.models.knee_demo.labels import STRUCTURES
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series

HERE = Path(__file__).resolve().parent


def write_case(seed: int, root: Path) -> tuple[list[Path], Path, bool]:
    """Write the study ``seed``; return its sagittal PD FS files, truth labels, ACL torn."""
    study = write_study(root / f"case-{seed}", StudyOptions(seed=seed, workers=1))
    return ([Path(p) for p in truth_series(study).files], study.truth.labels,
            bool(study.case.acl_torn))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def auc(scores: list[float], positive: list[bool]) -> float:
    """Area under the ROC curve (the probability that a positive outranks a negative)."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def evaluate(cases: int, workers: int, model: str = "knee-demo") -> dict:
    engine = Engine(Registry().get(model), device="auto")
    threshold = engine.manifest.outputs.classification[0].threshold
    seeds = [HELD_OUT_SEEDS[0] + i for i in range(cases)]
    scores: dict[str, list[float]] = {name: [] for name, *_ in STRUCTURES.values()}
    probabilities, torn, seconds = [], [], []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(workers) as pool:
        for files, truth_path, is_torn in pool.map(write_case, seeds, [Path(tmp)] * cases):
            started = time.perf_counter()
            result = engine.run([load_series(files)])
            seconds.append(time.perf_counter() - started)
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path)))
            for value, (name, *_) in STRUCTURES.items():
                scores[name].append(dice(result.labels == value, truth == value))
            probabilities.append(result.findings["classification"]["acl"]["probability"])
            torn.append(is_torn)
    called = [p >= threshold for p in probabilities]
    positives, negatives = sum(torn), len(torn) - sum(torn)
    return {
        "model": engine.model_id, "cases": cases, "seeds": [seeds[0], seeds[-1]],
        "dice": {name: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v)), 4),
                        "min": round(float(np.min(v)), 4)} for name, v in scores.items()},
        "acl": {"torn": positives, "intact": negatives, "threshold": threshold,
                "auc": round(auc(probabilities, torn), 4),
                "sensitivity": round(sum(c and t for c, t in zip(called, torn, strict=True))
                                     / max(positives, 1), 4),
                "specificity": round(sum(not c and not t for c, t in zip(called, torn,
                                                                         strict=True))
                                     / max(negatives, 1), 4)},
        "seconds_per_series": round(float(np.median(seconds)), 3),
    }


def markdown(metrics: dict) -> str:
    """The model card's metrics tables."""
    lines = ["| structure | Dice mean | sd | min |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {d['mean']:.3f} | {d['sd']:.3f} | {d['min']:.3f} |"
              for name, d in metrics["dice"].items()]
    acl = metrics["acl"]
    lines += ["", "| ACL tear | value |", "|---|---:|",
              f"| cases (torn / intact) | {acl['torn']} / {acl['intact']} |",
              f"| AUC | {acl['auc']:.3f} |",
              f"| sensitivity at {acl['threshold']} | {acl['sensitivity']:.3f} |",
              f"| specificity at {acl['threshold']} | {acl['specificity']:.3f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default="knee-demo")
    parser.add_argument("--out", type=Path, default=HERE / "metrics.json")
    args = parser.parse_args(argv)
    metrics = evaluate(args.cases, args.workers, args.model)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(markdown(metrics))


if __name__ == "__main__":
    main()
