"""Tiny models and volumes for inference tests: a model folder written on the fly, networks
whose output is a known function of their input, and series built from arrays.

:class:`Threshold` is the workhorse: its label is 1 wherever the (normalized) input exceeds
one half, so feeding it the indicator of a structure makes the engine a perfect segmenter
of that structure, and every difference between its labels and the structure is the
engine's geometry (orientation, resampling, the way back to the source slices).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import yaml

from aiworker.infer.registry import ModelSpec, Registry
from aiworker.infer.volume import LoadedSeries

# the bundled knee-demo's input and inference sections (aiworker.models.knee_demo.train)
KNEE_INPUT: dict[str, Any] = {
    "channels": ["sag_pd_fs"], "orientation": "PIL", "spacing_mm": [1.0, 1.0, 3.0],
    "normalization": {"method": "percentile", "lower": 0.5, "upper": 99.5}}
KNEE_INFERENCE: dict[str, Any] = {"roi_size": [128, 128, 32], "overlap": 0.25,
                                  "sw_batch_size": 4, "amp_dtype": "bfloat16",
                                  "time_limit_s": 300}
STRUCTURE = {"value": "91723000", "scheme_designator": "SCT", "meaning": "Anatomical structure"}
TYPES = {1: ("Femur", "71341001"), 2: ("Tibia", "12611008"), 3: ("Patella", "64234005")}


class Threshold(torch.nn.Module):
    """Logits of two channels: 0.5 for background, the input's first channel for label 1;
    so the label is 1 exactly where the input exceeds one half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x[:, :1], 0.5), x[:, :1]], dim=1)


class Busy(torch.nn.Module):
    """:class:`Threshold`'s logits after ``iterations`` products of 512 x 512 matrices
    (~5 ms each on one core): a model that runs long enough for a test to catch its job
    running."""

    def __init__(self, iterations: int = 600):
        super().__init__()
        self.iterations = iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.ones(512, 512)
        for _ in range(self.iterations):
            work = torch.tanh(work @ work / 512.0)
        return torch.cat([torch.full_like(x[:, :1], 0.5), x[:, :1] + 0.0 * work[0, 0]], dim=1)


def labels(*values: int) -> list[dict[str, Any]]:
    """Manifest ``outputs.segmentation.labels`` entries for ``values`` (1 Femur, ...)."""
    return [{"value": v, "name": TYPES[v][0], "color": [200, 200, 200],
             "category": dict(STRUCTURE),
             "type": {"value": TYPES[v][1], "scheme_designator": "SCT", "meaning": TYPES[v][0]}}
            for v in values]


def manifest(fmt: str = "torchscript", values: tuple[int, ...] = (1,), **changes: Any
             ) -> dict[str, Any]:
    """A manifest like knee-demo's with the labels ``values``; ``changes`` replace
    top-level sections (``segmentation`` and ``classification`` replace those outputs)."""
    raw: dict[str, Any] = {
        "name": "tiny", "version": "1.0", "format": fmt,
        "input": copy.deepcopy(KNEE_INPUT), "inference": copy.deepcopy(KNEE_INFERENCE),
        "outputs": {"segmentation": {"labels": labels(*values)}},
        "intended_use": "Tests only; not a medical device."}
    if "segmentation" in changes:
        raw["outputs"]["segmentation"] |= changes.pop("segmentation")
    if "classification" in changes:
        raw["outputs"]["classification"] = changes.pop("classification")
    return raw | changes


def write_model(root: Path, network: torch.nn.Module, raw: dict[str, Any]) -> ModelSpec:
    """Write ``network`` (scripted for torchscript, its state dict for state_dict) and the
    manifest ``raw`` into ``root/<name>`` and return it as the registry finds it."""
    folder = root / raw["name"]
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    if raw["format"] == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(network.eval()), str(folder / "model.ts"))
    else:
        torch.save(network.state_dict(), folder / "model.pt")
    return Registry(root, bundled_dir=root / "no-bundled-models").get(raw["name"])


def series_of(array: np.ndarray, spacing: tuple[float, float, float],
              direction: np.ndarray, origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
              like: LoadedSeries | None = None) -> LoadedSeries:
    """A loaded series holding ``array`` (slices, rows, columns); its geometry is ``like``'s
    when given, else ``spacing``, ``direction`` (3 x 3, columns = row, column, normal) and
    ``origin``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    if like is not None:
        image.CopyInformation(like.image)
        return LoadedSeries(image, like.sop_instance_uids, like.frame_numbers, like.series_uid,
                            like.study_uid, like.frame_of_reference_uid, like.sop_class_uid)
    image.SetSpacing(spacing)
    image.SetDirection([float(v) for v in np.asarray(direction, float).ravel()])
    image.SetOrigin(origin)
    slices = array.shape[0]
    return LoadedSeries(image, [f"2.25.{k + 1}" for k in range(slices)], None, "2.25.100",
                        "2.25.200", "2.25.300", "1.2.840.10008.5.1.4.1.1.4")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def slices_with(mask: np.ndarray) -> set[int]:
    """The slice indices (first axis) of a (slices, rows, columns) mask that hold any voxel."""
    return {int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))}
