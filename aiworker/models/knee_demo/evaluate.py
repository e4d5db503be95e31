"""Measure knee-demo on held-out phantoms: ``python -m aiworker.models.knee_demo.evaluate``.

Each case is a whole study written as DICOM by the phantom generator with its default
settings (seeds from :data:`~.data.HELD_OUT_SEEDS`, never used in training or fitting), so the
figures cover the node's real path: the sagittal PD FS files are read with
:func:`~aiworker.infer.volume.load_series` and run through the engine
(:class:`~aiworker.infer.engine.Engine`).
Dice is computed on the source slices against the study's ``truth/labels.nii.gz``; the ACL
head is scored against ``truth/facts.json`` (AUC, and sensitivity and specificity at the
manifest's threshold).

Then each shift condition of :mod:`~.conditions` (``--condition-cases`` cases each, seeds of
their own): the sagittal series rendered in memory (the same renderer and geometry as the
DICOM files) and run through the same engine, Dice per structure against its truth and the
ACL head's AUC, sensitivity and specificity. A case whose inference fails counts as failed
(Dice 0, not in the AUC). Prints the model card's Markdown tables and writes the figures
as JSON (``--out``). ``--models-dir`` adds a folder of models (e.g. a retrained one beside
the bundled one); the quality gate is not applied: the tables measure the model itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from aiworker.infer.engine import Engine
from aiworker.infer.registry import Registry
from aiworker.infer.volume import LoadedSeries, load_series
from aiworker.models.knee_demo.conditions import CONDITIONS, condition_seeds, render_case
from aiworker.models.knee_demo.data import HELD_OUT_SEEDS
from aiworker.models.knee_demo.labels import STRUCTURES
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series

HERE = Path(__file__).resolve().parent
log = logging.getLogger("knee_demo.evaluate")


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


def evaluate(cases: int, workers: int, model: str = "knee-demo",
             models_dir: Path | None = None) -> dict:
    """The reference: ``cases`` held-out studies written as DICOM and read back."""
    engine = Engine(Registry(models_dir).get(model), device="auto")
    seeds = [HELD_OUT_SEEDS[0] + i for i in range(cases)]
    records = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(workers) as pool:
        for files, truth_path, is_torn in pool.map(write_case, seeds, [Path(tmp)] * cases):
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_path)))
            records.append(_run(engine, load_series(files), truth, is_torn))
    return {"model": engine.model_id, **summary(records, seeds, _threshold(engine))}


def evaluate_condition(engine: Engine, condition: str, cases: int, workers: int) -> dict:
    """``cases`` held-out phantoms of ``condition``, rendered in memory."""
    seeds = condition_seeds(condition, cases)
    records = []
    with ProcessPoolExecutor(workers) as pool:
        for case in pool.map(render_case, seeds, [condition] * cases):
            loaded = LoadedSeries(case.image, [], None, "1.2.3", "1.2", "1.2.3.4",
                                  "1.2.840.10008.5.1.4.1.1.4")
            records.append(_run(engine, loaded, case.labels, case.torn))
    return summary(records, seeds, _threshold(engine))


def _threshold(engine: Engine) -> float:
    return engine.manifest.outputs.classification[0].threshold


def _run(engine: Engine, series, truth: np.ndarray, torn: bool) -> dict:
    """One case: Dice per structure, the ACL probability (None when inference failed)."""
    started = time.perf_counter()
    try:
        result = engine.run([series])
    except Exception as exc:  # a shifted input may break the model's pipeline: count it
        log.warning("inference failed: %s", exc)
        return {"dice": {name: 0.0 for name, *_ in STRUCTURES.values()}, "probability": None,
                "torn": torn, "seconds": None}
    seconds = time.perf_counter() - started
    return {"dice": {name: dice(result.labels == value, truth == value)
                     for value, (name, *_) in STRUCTURES.items()},
            "probability": result.findings["classification"]["acl"]["probability"],
            "torn": torn, "seconds": seconds}


def summary(records: list[dict], seeds: list[int], threshold: float) -> dict:
    """Dice mean / sd / min per structure and the ACL head's AUC, sensitivity and
    specificity over ``records``."""
    names = list(records[0]["dice"])
    ran = [r for r in records if r["probability"] is not None]
    probabilities, torn = [r["probability"] for r in ran], [r["torn"] for r in ran]
    called = [p >= threshold for p in probabilities]
    positives, negatives = sum(torn), len(torn) - sum(torn)
    seconds = [r["seconds"] for r in ran]
    return {
        "cases": len(records), "seeds": [seeds[0], seeds[-1]],
        "failed": len(records) - len(ran),
        "dice": {name: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v)), 4),
                        "min": round(float(np.min(v)), 4)}
                 for name in names for v in [[r["dice"][name] for r in records]]},
        "acl": {"torn": positives, "intact": negatives, "threshold": threshold,
                "auc": round(auc(probabilities, torn), 4),
                "sensitivity": round(sum(c and t for c, t in zip(called, torn, strict=True))
                                     / max(positives, 1), 4),
                "specificity": round(sum(not c and not t for c, t in zip(called, torn,
                                                                         strict=True))
                                     / max(negatives, 1), 4)},
        "seconds_per_series": round(float(np.median(seconds)), 3) if seconds else None,
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


def conditions_markdown(metrics: dict) -> str:
    """One row per condition: bones, ACL Dice, the ACL head (the model card's shift table)."""
    lines = ["| condition | cases | femur | tibia | patella | ACL | ACL-tear AUC | sens | spec "
             "| failed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {**({"reference": metrics} if "dice" in metrics else {}),
            **metrics.get("conditions", {})}
    for name, m in rows.items():
        d, acl = m["dice"], m["acl"]
        lines.append(f"| {name} | {m['cases']} | {d['Femur']['mean']:.3f} | "
                     f"{d['Tibia']['mean']:.3f} | {d['Patella']['mean']:.3f} | "
                     f"{d['ACL']['mean']:.3f} | {acl['auc']:.3f} | {acl['sensitivity']:.3f} | "
                     f"{acl['specificity']:.3f} | {m.get('failed', 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--condition-cases", type=int, default=8)
    parser.add_argument("--conditions", nargs="*", default=list(CONDITIONS),
                        choices=CONDITIONS)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--model", default="knee-demo")
    parser.add_argument("--models-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "metrics.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = Engine(Registry(args.models_dir).get(args.model), device="auto")
    metrics = (evaluate(args.cases, args.workers, args.model, args.models_dir) if args.cases
               else {"model": engine.model_id})  # --cases 0: the shift conditions only
    metrics["conditions"] = {}
    for condition in args.conditions:
        metrics["conditions"][condition] = evaluate_condition(
            engine, condition, args.condition_cases, args.workers)
        log.info("%s: %s", condition, json.dumps(metrics["conditions"][condition]["acl"]))
        args.out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    args.out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if "dice" in metrics:
        print(markdown(metrics), end="\n\n")
    print(conditions_markdown(metrics))


if __name__ == "__main__":
    main()
