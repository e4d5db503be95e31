"""Run one resident model on loaded series: preprocess, sliding window, postprocess, findings.

An :class:`Engine` loads its model once, on the device the node was given (``auto``: CUDA
when torch sees a GPU, else the CPU), and then runs any number of series. A run:

1. **preprocess**: the input series (one per manifest channel role) are oriented, resampled,
   cropped/padded and normalized (:func:`aiworker.infer.preprocess.model_input`);
2. **model**: MONAI sliding-window inference over the ROI of the manifest with batched
   windows, under ``torch.inference_mode`` and, on a GPU, autocast to the manifest's AMP
   dtype;
3. **postprocess**: argmax, optionally the largest connected part of each label, the
   classification heads (measured on the label map in model space) and, when the
   manifest's quality gate checks it, the model's confidence in each label (mean
   max-softmax, :func:`aiworker.infer.confidence.structure_confidence`; ``Result.confidence``);
4. **resample**: the label map back onto the first input series by nearest neighbour, so
   slice k of the result belongs to that series' slice k; volumes are counted there.

An nnU-Net model (format ``nnunet_v2``) runs steps 1, 2 and 4 as nnU-Net does
(:class:`aiworker.infer.nnunet.NnunetModel`: its preprocessing, sliding window, fold
ensemble and resampling, on the input series as loaded; its confidence from its own
probabilities); the label map is then cleaned, measured and classified as any model's, on
the source slices.

A model run on whole inputs (several series each on its own grid, or classification heads
that read the network; :mod:`aiworker.infer.whole`) is called once with one tensor per
input; its segmentation, if it has one, lies on the first input's grid, and a model with no
segmentation gives an empty label map on the first series (no SEG is made from it).

Failures carry a ``kind``: :class:`ModelError` (``model``: the network rejects the input
shape or its output does not fit the manifest) and :class:`ResourceError` (``resource``: out
of memory, device lost). Out of GPU memory, the run is tried once more on the CPU.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from aiworker.infer import findings, whole
from aiworker.infer.confidence import structure_confidence
from aiworker.infer.manifest import Manifest, ModelError
from aiworker.infer.preprocess import ModelInput, labels_image, model_input, voxel_ml
from aiworker.infer.registry import ModelSpec, load_model, model_id
from aiworker.infer.volume import LoadedSeries, labels_to_series

T = TypeVar("T")

log = logging.getLogger(__name__)


class ResourceError(Exception):
    """The device ran out of memory or went away; the same job may succeed later."""

    kind = "resource"


@dataclass
class Result:
    """One series' labels on its own slices, the findings, and seconds per step."""

    labels: np.ndarray  # (slices, rows, columns) uint8, slice k = source slice k
    label_image: sitk.Image  # the same with the source series' geometry
    findings: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    # label value -> mean max-softmax inside it (None: not measured, or no probabilities)
    confidence: dict[int, float] | None = None


def pick_device(setting: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; otherwise the device named."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class Engine:
    """One model, loaded once, that segments and classifies series."""

    def __init__(self, spec: ModelSpec, device: str = "auto"):
        self.spec = spec
        self.manifest: Manifest = spec.manifest
        self.device = pick_device(device)
        self.nnunet: Any = None
        self.network: torch.nn.Module | None = None
        if self.manifest.format == "nnunet_v2":
            from aiworker.infer.nnunet import NnunetModel

            self.nnunet = NnunetModel(self.manifest, spec.folder, self.device)
        else:
            self.network = load_model(spec, self.device)
        self._cpu_network: torch.nn.Module | None = None

    @property
    def model_id(self) -> str:
        return model_id(self.spec)

    def run(self, series: list[LoadedSeries]) -> Result:
        """Segment and classify ``series`` (one per input channel, in channel order)."""
        if self.nnunet is not None:
            return self._run_nnunet(series)
        if self.manifest.whole_inputs:
            return self._run_whole(series)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        prepared = model_input([s.image for s in series], self.manifest.input)
        timings["preprocess"] = _since(started)
        started = time.perf_counter()
        logits, device = self._with_cpu_fallback(lambda on: self.infer(prepared.array, on))
        timings["model"] = _since(started)
        started = time.perf_counter()
        labels = self.labels_from_logits(logits)
        confidence = self.confidence(logits, labels)
        heads = self.classify(labels, prepared)
        timings["postprocess"] = _since(started)
        started = time.perf_counter()
        on_source = labels_to_series(labels_image(labels, prepared.reference), series[0])
        label_image = sitk.GetImageFromArray(on_source)
        label_image.CopyInformation(series[0].image)
        volumes = findings.volumes_ml(on_source, voxel_ml(series[0].image), self.manifest)
        timings["resample"] = _since(started)
        result_findings = {"model": self.model_id, "series_uid": series[0].series_uid,
                           "volumes_ml": volumes, "classification": heads}
        return Result(on_source, label_image, result_findings, timings, device.type, confidence)

    def confidence(self, logits: np.ndarray, labels: np.ndarray) -> dict[int, float] | None:
        """Mean max-softmax inside each predicted label (what the quality gate's
        ``min_confidence`` reads), or None when the manifest's gate does not check it."""
        values = self._confidence_of()
        return None if values is None else structure_confidence(logits, labels, values)

    def _confidence_of(self) -> list[int] | None:
        """The label values whose confidence the gate checks (all labels), else None."""
        gate = self.manifest.gate
        segmentation = self.manifest.outputs.segmentation
        if gate is None or not gate.output.min_confidence or segmentation is None:
            return None
        return [label.value for label in segmentation.labels]

    def _run_whole(self, series: list[LoadedSeries]) -> Result:
        """One call of the network on every input, each on its own grid; the segmentation
        (if any) back on the first series, the heads from the network's outputs."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        prepared = whole.prepare([s.image for s in series], self.manifest)
        timings["preprocess"] = _since(started)
        started = time.perf_counter()
        found, device = self._with_cpu_fallback(
            lambda on: self.call([p.array for p in prepared], on))
        timings["model"] = _since(started)
        started = time.perf_counter()
        segmentation, confidence = self.manifest.outputs.segmentation, None
        heads: dict[str, Any] = {}
        if segmentation is not None:
            logits = whole.pick(found, segmentation.output, self.model_id)
            if logits.shape[1:] != prepared[0].array.shape[1:]:
                raise ModelError(f"{self.model_id}: the segmentation output {logits.shape} "
                                 "does not match the first input "
                                 f"{prepared[0].array.shape} voxel for voxel")
            labels = self.labels_from_logits(logits)
            confidence = self.confidence(logits, labels)
            heads = {head.name: findings.classify(head, labels, prepared[0].array[0],
                                                  prepared[0].reference.GetSpacing())
                     for head in self.manifest.outputs.classification if head.region}
            on_source = labels_to_series(labels_image(labels, prepared[0].reference), series[0])
        else:
            on_source = np.zeros(series[0].array().shape, np.uint8)
        for head in self.manifest.outputs.classification:
            if head.network is not None:
                heads[head.name] = whole.network_finding(
                    head, whole.pick(found, head.network.output, self.model_id), self.model_id)
        timings["postprocess"] = _since(started)
        label_image = sitk.GetImageFromArray(on_source)
        label_image.CopyInformation(series[0].image)
        result_findings = {"model": self.model_id, "series_uid": series[0].series_uid,
                           "volumes_ml": findings.volumes_ml(on_source, voxel_ml(series[0].image),
                                                             self.manifest),
                           "classification": {h.name: heads[h.name]
                                              for h in self.manifest.outputs.classification}}
        if segmentation is None:
            result_findings["segmentation"] = False  # no SEG: a classification-only model
        return Result(on_source, label_image, result_findings, timings, device.type, confidence)

    def _run_nnunet(self, series: list[LoadedSeries]) -> Result:
        """nnU-Net's label map on the first series' slices, then cleaned and measured there
        (a classification head reads the source series' own intensities)."""
        try:
            segmented = self.nnunet.segment([s.image for s in series], self._confidence_of())
        except torch.cuda.OutOfMemoryError as exc:
            raise ResourceError(f"out of GPU memory on {self.device}") from exc
        except Exception as exc:  # whatever nnU-Net raises on our input is the model's
            raise ModelError(f"{self.model_id}: nnU-Net fails on an input of size "
                             f"{series[0].image.GetSize()}: {_first_line(exc)}") from exc
        started = time.perf_counter()
        on_source, timings = segmented.labels, segmented.timings
        segmentation = self.manifest.outputs.segmentation
        if segmentation and segmentation.largest_component:
            on_source = findings.largest_components(
                on_source, [label.value for label in segmentation.labels])
        spacing = series[0].image.GetSpacing()
        heads = {head.name: findings.classify(head, on_source.transpose(2, 1, 0),
                                              series[0].array().transpose(2, 1, 0), spacing)
                 for head in self.manifest.outputs.classification}
        label_image = sitk.GetImageFromArray(on_source)
        label_image.CopyInformation(series[0].image)
        volumes = findings.volumes_ml(on_source, voxel_ml(series[0].image), self.manifest)
        timings["postprocess"] = _since(started)
        result_findings = {"model": self.model_id, "series_uid": series[0].series_uid,
                           "volumes_ml": volumes, "classification": heads}
        if segmented.entropy is not None:  # nats, beside the confidence the gate reads
            names = {label.value: label.name for label in segmentation.labels} \
                if segmentation else {}
            result_findings["entropy"] = {names[v]: round(e, 4)
                                          for v, e in segmented.entropy.items() if v in names}
        return Result(on_source, label_image, result_findings, timings, self.device.type,
                      segmented.confidence)

    def infer(self, array: np.ndarray, device: torch.device | None = None) -> np.ndarray:
        """Logits (classes, x, y, z) for a model input array (channels, x, y, z)."""
        device = device or self.device
        network = self.network if device == self.device else self._on_cpu()
        settings = self.manifest.inference
        roi = settings.roi_size or list(array.shape[1:])
        amp = device.type == "cuda" and settings.amp_dtype != "none"
        dtype = getattr(torch, settings.amp_dtype) if amp else None
        inputs = torch.from_numpy(array[None]).to(device)
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                logits = sliding_window_inference(inputs, roi, settings.sw_batch_size,
                                                  network, settings.overlap, mode="gaussian")
        except torch.cuda.OutOfMemoryError as exc:
            raise ResourceError(f"out of GPU memory on {device}") from exc
        except Exception as exc:  # whatever the network raises on our input is its failure
            if device.type == "cuda" and ("CUDA" in str(exc) or "device" in str(exc).lower()):
                raise ResourceError(f"GPU failed: {_first_line(exc)}") from exc
            raise ModelError(f"{self.model_id}: the network rejects an input of shape "
                             f"{tuple(inputs.shape)}: {_first_line(exc)}") from exc
        if isinstance(logits, (tuple, list, dict)):
            raise ModelError(f"{self.model_id}: the network returns several outputs; "
                             "a segmentation model returns one tensor")
        if logits.shape[2:] != inputs.shape[2:]:
            raise ModelError(f"{self.model_id}: the network's output {tuple(logits.shape)} "
                             f"does not match its input {tuple(inputs.shape)} voxel for voxel")
        return logits[0].float().cpu().numpy()

    def call(self, arrays: list[np.ndarray], device: torch.device | None = None
             ) -> whole.Outputs:
        """The network's outputs for whole inputs (one (channels, x, y, z) array each),
        called once with one tensor per input."""
        device = device or self.device
        network = self.network if device == self.device else self._on_cpu()
        settings = self.manifest.inference
        amp = device.type == "cuda" and settings.amp_dtype != "none"
        dtype = getattr(torch, settings.amp_dtype) if amp else None
        tensors = [torch.from_numpy(array[None]).to(device) for array in arrays]
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=amp):
                returned = network(*tensors)
        except torch.cuda.OutOfMemoryError as exc:
            raise ResourceError(f"out of GPU memory on {device}") from exc
        except Exception as exc:  # whatever the network raises on our input is its failure
            if device.type == "cuda" and ("CUDA" in str(exc) or "device" in str(exc).lower()):
                raise ResourceError(f"GPU failed: {_first_line(exc)}") from exc
            raise ModelError(f"{self.model_id}: the network rejects inputs of shape "
                             f"{shapes}: {_first_line(exc)}") from exc
        return whole.outputs(returned, self.model_id)

    def _with_cpu_fallback(self, run: Callable[[torch.device], T]) -> tuple[T, torch.device]:
        """``run`` on the engine's device and that device; on the CPU instead when the GPU
        failed it (out of memory, a CUDA error)."""
        try:
            return run(self.device), self.device
        except ResourceError:
            if self.device.type != "cuda":
                raise
            log.warning("model %s: GPU failed, running this series on the CPU", self.model_id)
            torch.cuda.empty_cache()
            cpu = torch.device("cpu")
            return run(cpu), cpu

    def labels_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """Argmax label map (x, y, z) uint8, cut to largest parts if the manifest says so."""
        segmentation = self.manifest.outputs.segmentation
        expected = 1 + max((label.value for label in segmentation.labels), default=0) \
            if segmentation else None
        if expected is not None and logits.shape[0] < expected:
            raise ModelError(f"{self.model_id}: the network outputs {logits.shape[0]} "
                             f"channels but the manifest's labels need {expected}")
        labels = np.argmax(logits, axis=0).astype(np.uint8)
        if segmentation and segmentation.largest_component:
            labels = findings.largest_components(labels, [lb.value for lb in segmentation.labels])
        return labels

    def classify(self, labels: np.ndarray, prepared: ModelInput) -> dict[str, Any]:
        """Every classification head's finding, keyed by head name."""
        spacing = prepared.reference.GetSpacing()
        return {head.name: findings.classify(head, labels, prepared.array[0], spacing)
                for head in self.manifest.outputs.classification}

    def _on_cpu(self) -> torch.nn.Module:
        if self._cpu_network is None:
            self._cpu_network = load_model(self.spec, "cpu")
        return self._cpu_network


def _first_line(exc: Exception) -> str:
    """An exception's message in one line of at most 160 characters: for a TorchScript
    error (a traceback of the script) its final error line, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("The following operation failed in the TorchScript"):
        errors = [line.partition(": ")[2] for line in lines
                  if re.match(r"\w+(Error|Exception): ", line)]
        lines = errors[-1:] or lines
    return (lines or [type(exc).__name__])[0][:160]


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 4)
