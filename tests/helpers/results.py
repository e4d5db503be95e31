"""A model run made from a phantom's ground truth, for tests of the result objects and of
sending them: the truth labels stand in for the prediction, and the findings are counted
on them as the engine counts its own."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from aiworker.infer import findings as infer_findings
from aiworker.infer.manifest import load_manifest
from aiworker.infer.volume import LoadedSeries, labels_to_series, load_series
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.phantom.truth import truth_series

MANIFEST = load_manifest(Path(__file__).parents[2] / "aiworker" / "models" / "knee_demo"
                         / "model.yaml")
MODEL_ID = "knee-demo@2.2.0"
VOLUME = "118565006"  # SCT Volume, the SR's measurement
TRACKING_IDENTIFIER = "112039"  # DCM Tracking Identifier


@dataclass
class TruthRun:
    """The sagittal PD FS of a torn-ACL phantom, its truth as labels, and the findings."""

    paths: list[Path]
    loaded: LoadedSeries
    labels: np.ndarray
    voxel_ml: float
    findings: dict


def truth_series_labels(folder: Path, seed: int, matrix: int, *, acl: str = "random",
                        enhanced: bool = False) -> tuple[list[Path], LoadedSeries, np.ndarray]:
    """Write a phantom (sagittal PD FS only, ``matrix`` square) under ``folder``: its files,
    the series loaded, and the truth label map on the series' slices (every phantom label,
    see :func:`model_labels`)."""
    study = write_study(folder, StudyOptions(
        seed=seed, acl=acl, enhanced=enhanced, rescan=False, derived=False,
        overrides=Overrides(roles=("sag_pd_fs",), matrix=matrix)))
    paths = truth_series(study).files
    loaded = load_series(paths)
    return paths, loaded, labels_to_series(sitk.ReadImage(str(study.truth.labels)), loaded)


def model_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` with only knee-demo's structures (the phantom's others are background)."""
    return np.where(labels <= 11, labels, 0).astype(np.uint8)


def truth_run(folder: Path, seed: int, matrix: int) -> TruthRun:
    """Write a torn-ACL phantom (sagittal PD FS only, ``matrix`` square) under ``folder``
    and make the run a job on it would be, with the truth as the prediction."""
    paths, loaded, truth = truth_series_labels(folder, seed, matrix, acl="torn")
    labels = model_labels(truth)
    voxel_ml = math.prod(loaded.image.GetSpacing()) / 1000.0
    findings = {"model": MODEL_ID, "series_uid": loaded.series_uid,
                "volumes_ml": infer_findings.volumes_ml(labels, voxel_ml, MANIFEST),
                "classification": {"acl": {"probability": 0.91, "threshold": 0.5,
                                            "decision": "torn", "features": {}}}}
    return TruthRun(paths, loaded, labels, voxel_ml, findings)


def sr_volumes(sr: Path | pydicom.Dataset) -> dict[str, float]:
    """Tracking identifier -> Volume (ml) of every measurement group of an SR (a file or a
    data set)."""
    volumes = {}

    def walk(items, group: dict) -> None:
        for item in items:
            concept = item.ConceptNameCodeSequence[0].CodeValue
            if concept == TRACKING_IDENTIFIER:
                group["name"] = item.TextValue
            if concept == VOLUME:
                measured = item.MeasuredValueSequence[0]
                assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "ml"
                group["ml"] = float(measured.NumericValue)
            if "ContentSequence" in item:
                inner: dict = {}
                walk(item.ContentSequence, inner)
                if {"name", "ml"} <= inner.keys():
                    volumes[inner["name"]] = inner["ml"]
                group.update({k: v for k, v in inner.items() if k not in group})

    walk((sr if isinstance(sr, pydicom.Dataset) else pydicom.dcmread(sr)).ContentSequence, {})
    return volumes
