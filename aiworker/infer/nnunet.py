"""Format ``nnunet_v2``: an nnU-Net v2 results folder run through nnU-Net's own predictor.

The manifest's ``nnunet`` section names the results folder (the trainer folder holding
``dataset.json``, ``plans.json`` and ``fold_N/<checkpoint>``), the configuration, the folds
to ensemble, the checkpoint file and test-time mirroring. Everything between the series
and the label map is nnU-Net's: its preprocessor (crop to non-zero, normalization,
resampling to the plans' spacing), its sliding window with Gaussian weighting and
mirroring, the mean over folds, and the resampling back to the input's grid. The node
hands it the input volumes exactly as nnU-Net's SimpleITK reader hands a NIfTI file of the
same volume to ``nnUNetv2_predict``, so both write the same label map.

At start (no torch needed) :func:`complete` fills what the manifest leaves to the folder
(``input.channels`` from ``dataset.json``'s ``channel_names`` through ``nnunet.channels``,
the labels from ``dataset.json``'s ``labels``, coded by :mod:`aiworker.infer.labels`) and
:func:`check` lists every problem of the folder, one line each. :class:`NnunetModel`
loads the predictor once, in the inference process, on the GPU when there is one.

When the quality gate checks the model's confidence, the predictor is asked for its
probabilities too (``return_probabilities``, as ``nnUNetv2_predict --save_probabilities``
asks): the label map is then their argmax, as that command writes it, and the confidence in
each label is the mean of the largest probability over its voxels
(:func:`aiworker.infer.confidence.probability_confidence`), with the mean entropy beside it.
A region-based model's probabilities are per region, not per label: it gives none.

nnU-Net checkpoints are pickles, loaded as nnU-Net loads them: install only model folders
you trust.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aiworker.infer.confidence import probability_confidence, probability_entropy
from aiworker.infer.labels import coded_labels, missing_labels
from aiworker.infer.manifest import MANIFEST_NAME, Manifest, ModelError

log = logging.getLogger(__name__)

# the readers whose arrays the node can hand over without a file: name -> orientation
READERS = {"SimpleITKIO": None, "SimpleITKIOWithReorient": "RAS"}


def results_folder(manifest: Manifest, folder: Path) -> Path:
    """The results folder the manifest names (absolute, or inside the model folder)."""
    assert manifest.nnunet is not None
    return folder / manifest.nnunet.results


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path}: missing (an nnU-Net v2 results folder holds it)")
        return None
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: cannot read it as JSON: {exc}")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return value


def output_labels(dataset: dict[str, Any]) -> dict[int, str]:
    """Label value -> name of the label map nnU-Net writes for ``dataset.json``: its labels
    (background and ``ignore`` aside), or for a region-based model the values of
    ``regions_class_order``, one per region."""
    names = {name: value for name, value in dataset.get("labels", {}).items()
             if name != "ignore"}
    if "regions_class_order" in dataset:
        regions = [name for name, value in names.items() if value not in (0, [0])]
        order = [int(value) for value in dataset["regions_class_order"]]
        return dict(zip(order, regions, strict=False))
    return {int(value): name for name, value in names.items() if int(value) != 0}


def complete(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``raw`` with ``input.channels`` and ``outputs.segmentation.labels`` filled from the
    results folder's ``dataset.json`` where the manifest leaves them out (what cannot be
    filled is left for :func:`check` and the manifest's own checks to name)."""
    section = raw.get("nnunet")
    if not isinstance(section, dict) or not isinstance(section.get("results", "."), str):
        return raw
    dataset = _read_json(folder / section.get("results", ".") / "dataset.json", [])
    if dataset is None:
        return raw
    raw = dict(raw)
    roles = section.get("channels") or {}
    inputs = raw.get("input") if isinstance(raw.get("input"), dict) else {}
    if "channels" not in inputs and isinstance(roles, dict) and _channel_names(dataset):
        # a channel without a role keeps its own name here, for check() to name it
        raw["input"] = inputs | {"channels": [
            roles.get(name) or re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "channel"
            for name in _channel_names(dataset)]}
    outputs = raw.get("outputs") if isinstance(raw.get("outputs"), dict) else {}
    segmentation = outputs.get("segmentation") or {}
    if isinstance(segmentation, dict) and "labels" not in segmentation:
        labels, _ = coded_labels(output_labels(dataset), "dataset.json")
        if labels:
            raw["outputs"] = outputs | {"segmentation": segmentation | {"labels": labels}}
    return raw


def _channel_names(dataset: dict[str, Any]) -> list[str]:
    """``dataset.json``'s channel names in channel order (``channel_names``, or the older
    ``modality``)."""
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    return [str(channels[key]) for key in sorted(channels, key=int)]


def check(manifest: Manifest, folder: Path) -> list[str]:
    """One line per problem of the results folder: files, configuration, checkpoints, the
    reader, channels against ``input.channels`` and labels against the manifest's."""
    assert manifest.nnunet is not None
    settings, results, problems = manifest.nnunet, results_folder(manifest, folder), []
    where = folder / MANIFEST_NAME
    if not results.is_dir():
        return [f"{where}: nnunet.results: {results} is not a folder"]
    dataset = _read_json(results / "dataset.json", problems)
    plans = _read_json(results / "plans.json", problems)
    for fold in settings.folds:
        checkpoint = results / f"fold_{fold}" / settings.checkpoint
        if not checkpoint.is_file():
            problems.append(f"{where}: nnunet.folds: {checkpoint} is missing")
    if plans is not None:
        problems += _check_plans(plans, settings.configuration, results, where)
    if dataset is not None:
        problems += _check_dataset(dataset, manifest, results, where)
    return problems


def _check_plans(plans: dict[str, Any], configuration: str, results: Path,
                 where: Path) -> list[str]:
    configurations = plans.get("configurations", {})
    problems = []
    if configuration not in configurations:
        problems.append(f"{where}: nnunet.configuration: {results / 'plans.json'} has no "
                        f"{configuration!r} (it has {', '.join(configurations) or 'none'})")
    elif configurations[configuration].get("previous_stage"):
        problems.append(f"{where}: nnunet.configuration: {configuration!r} is a cascade stage "
                        "(it needs the previous stage's segmentation); not supported")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in READERS:
        problems.append(f"{results / 'plans.json'}: image_reader_writer: {reader} is not "
                        f"supported (only {', '.join(READERS)})")
    return problems


def _check_dataset(dataset: dict[str, Any], manifest: Manifest, results: Path,
                   where: Path) -> list[str]:
    settings, problems, path = manifest.nnunet, [], results / "dataset.json"
    assert settings is not None
    names = _channel_names(dataset)
    unmapped = [name for name in names if settings.channels and name not in settings.channels]
    roles = [settings.channels.get(name) for name in names] if settings.channels else None
    if unmapped:
        problems.append(f"{where}: nnunet.channels: no series role for channel(s) "
                        f"{', '.join(unmapped)} of {path}")
    elif len(names) != len(manifest.input.channels) or roles and roles != manifest.input.channels:
        problems.append(f"{where}: input.channels: {manifest.input.channels} does not match "
                        f"{path}'s channel_names {names}"
                        + (f" (mapped to {roles})" if roles else ""))
    expected = output_labels(dataset)
    segmentation = manifest.outputs.segmentation
    given = {label.value for label in segmentation.labels} if segmentation else set()
    missing = {value: name for value, name in expected.items() if value not in given}
    problems += missing_labels(missing, path, where)
    extra = sorted(given - set(expected))
    if extra:
        problems.append(f"{where}: outputs.segmentation.labels: value(s) {extra} are not "
                        f"labels of {path} (it has {sorted(expected)})")
    return problems


@dataclass
class Segmented:
    """nnU-Net's label map (slices, rows, columns) on the first input's grid, the seconds of
    its steps and, when asked for, label value -> mean max probability and mean entropy
    inside it (None: not asked for, or a region-based model)."""

    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    confidence: dict[int, float] | None = None
    entropy: dict[int, float] | None = None


class NnunetModel:
    """An nnU-Net predictor loaded once: every fold's weights on ``device``."""

    def __init__(self, manifest: Manifest, folder: Path, device: Any):
        import torch

        settings, self.model_id = manifest.nnunet, f"{manifest.name}@{manifest.version}"
        assert settings is not None
        with _quiet(self.model_id):
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            self.predictor = nnUNetPredictor(
                tile_step_size=settings.step_size, use_gaussian=True,
                use_mirroring=settings.mirroring, device=torch.device(device),
                perform_everything_on_device=torch.device(device).type == "cuda",
                allow_tqdm=False)
            try:
                self.predictor.initialize_from_trained_model_folder(
                    str(results_folder(manifest, folder)), tuple(settings.folds),
                    settings.checkpoint)
            except Exception as exc:  # nnU-Net raises whatever its files make it raise
                raise ModelError(f"{self.model_id}: nnU-Net cannot load "
                                 f"{results_folder(manifest, folder)}: {exc}") from exc
        plans = self.predictor.plans_manager
        wanted = plans.get_configuration(settings.configuration).configuration
        if self.predictor.configuration_manager.configuration != wanted:
            raise ModelError(f"{self.model_id}: the checkpoints were trained with another "
                             f"configuration than nnunet.configuration "
                             f"{settings.configuration!r}")
        self.orientation = READERS.get(plans.plans.get("image_reader_writer", "SimpleITKIO"))

    def segment(self, images: list[Any], confidence_of: list[int] | None = None) -> Segmented:
        """What nnU-Net predicts for these volumes (SimpleITK images, one per channel): the
        label map on ``images[0]``'s grid and the seconds of its steps (``preprocess``,
        ``model``, ``resample``); with ``confidence_of`` (label values) also its confidence
        in each of them, from its probabilities."""
        import SimpleITK as sitk
        import torch
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape as to_segmentation,
        )

        predictor, timings = self.predictor, {}
        source_orientation = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
            images[0].GetDirection())
        if self.orientation:
            images = [sitk.DICOMOrient(image, self.orientation) for image in images]
        array, properties = reader_input(images)
        started = time.perf_counter()
        with _quiet(self.model_id):
            preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
            data, _, properties = preprocessor.run_case_npy(
                array, None, properties, predictor.plans_manager,
                predictor.configuration_manager, predictor.dataset_json)
            timings["preprocess"] = _since(started)
            started = time.perf_counter()
            logits = predictor.predict_logits_from_preprocessed_data(
                torch.from_numpy(data)).cpu()
            timings["model"] = _since(started)
            started = time.perf_counter()
            wanted = confidence_of is not None and not predictor.label_manager.has_regions
            converted = to_segmentation(logits, predictor.plans_manager,
                                        predictor.configuration_manager,
                                        predictor.label_manager, properties,
                                        return_probabilities=wanted,
                                        num_threads_torch=torch.get_num_threads())
        labels, probabilities = converted if wanted else (converted, None)
        result = Segmented(labels)
        if probabilities is not None and confidence_of is not None:
            result.confidence = probability_confidence(probabilities, labels, confidence_of)
            result.entropy = probability_entropy(probabilities, labels, confidence_of)
        if self.orientation:
            image = sitk.GetImageFromArray(labels.astype(np.uint8))
            image.CopyInformation(images[0])
            labels = sitk.GetArrayFromImage(sitk.DICOMOrient(image, source_orientation))
        timings["resample"] = _since(started)
        result.labels, result.timings = np.ascontiguousarray(labels, dtype=np.uint8), timings
        return result


def reader_input(images: list[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The array (channels, slices, rows, columns) and properties that nnU-Net's
    ``SimpleITKIO.read_images`` returns for NIfTI files of these volumes."""
    import SimpleITK as sitk

    first = images[0]
    array = np.vstack([sitk.GetArrayFromImage(image)[None] for image in images],
                      dtype=np.float32, casting="unsafe")
    properties = {"sitk_stuff": {"spacing": first.GetSpacing(), "origin": first.GetOrigin(),
                                 "direction": first.GetDirection()},
                  "spacing": list(np.abs(list(first.GetSpacing())[::-1]))}
    return array, properties


@contextlib.contextmanager
def _quiet(model_id: str):
    """nnU-Net talks on stdout; its lines go to the debug log instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                log.debug("%s: nnU-Net: %s", model_id, line.strip())


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 4)
