"""The quality gate: is a result within what its model was trained on, or "not assessable"?

A model segments and classifies whatever it is fed: forced onto a T1 series, a series that
covers half the knee or a volume that is no knee at all, it still labels something "femur"
and still reports an ACL tear with a probability of 1.00. The gate stands between the run and
the result objects and answers "not assessable, because ..." instead of a confident wrong
finding. Its limits come from the manifest's ``gate:`` section
(:mod:`aiworker.infer.gate_spec`); a model without one has no gate.

The checks (:func:`judge`) are pure functions of the loaded series, the label map and the
model's per-structure confidence (:mod:`aiworker.infer.confidence`, from its probabilities):

* **input** (a failure makes the whole result not assessable): slice count, coverage along
  the slice axis, voxel spacing, robust intensity percentiles after the manifest's own
  normalization (contrast: a T1 or a series without fat suppression puts bright fat and
  marrow where a PD FS has dark ones; heavy noise lifts the low percentiles);
* **output**: every ``required`` structure present (else the whole result is not assessable:
  what the model segmented is not the anatomy it knows), and per structure its volume, the
  number of its connected parts and the model's mean confidence inside it (a failure makes
  that structure, and every finding measured on it, not assessable; more structures failing
  than ``max_structures_not_assessable`` make the whole result not assessable: a flexed knee
  or a partial field of view upsets many structures at once).

:func:`apply` writes the verdict into the findings (``findings["quality"]``, see
:meth:`GateResult.to_json`) and turns each classification whose region is not assessable into
``decision: "not assessable"`` with its reasons (the model's own call kept as
``model_decision`` for audit). The result objects read the verdict back with
:func:`structure_reasons`, :func:`finding_reasons` and :func:`seg_withheld`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from aiworker.infer.gate_spec import Bound, GateSpec, InputGate, OutputGate

if TYPE_CHECKING:
    from pathlib import Path

    import SimpleITK as sitk

    from aiworker.infer.manifest import Manifest
    from aiworker.infer.manifest_sections import Normalization

NOT_ASSESSABLE = "not assessable"
INPUT, OUTPUT = "input", "output"


# ----------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Check:
    """One check: what was measured (``structure`` None for the whole series), the value,
    the allowed range, and the reason it gives when it fails."""

    name: str
    scope: str  # INPUT or OUTPUT
    structure: str | None
    value: float | None
    allowed: tuple[Bound, Bound]
    passed: bool
    reason: str = ""
    whole: bool = True  # a failure makes the whole result not assessable

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "scope": self.scope, "structure": self.structure,
                "value": None if self.value is None else round(float(self.value), 4),
                "allowed": list(self.allowed), "passed": self.passed}


@dataclass
class GateResult:
    """Every check of one result, and what follows from them."""

    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    @property
    def reasons(self) -> list[str]:
        """Why the whole result is not assessable (empty when it is)."""
        return [check.reason for check in self.failed if check.whole]

    @property
    def assessable(self) -> bool:
        """False when a whole-result check failed."""
        return not self.reasons

    @property
    def structures(self) -> dict[str, list[str]]:
        """Structure name -> why it alone is not assessable (only failing structures)."""
        found: dict[str, list[str]] = {}
        for check in self.failed:
            if check.structure is not None and not check.whole:
                found.setdefault(check.structure, []).append(check.reason)
        return found

    def to_json(self) -> dict[str, Any]:
        """``findings["quality"]`` without ``findings`` and ``seg`` (added by :func:`apply`)."""
        return {"assessable": self.assessable, "reasons": self.reasons,
                "structures": self.structures, "checks": [c.to_json() for c in self.checks]}


# ----------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class InputStats:
    """What the input checks measure on the series as loaded."""

    slices: int
    coverage_mm: float
    spacing_mm: tuple[float, float, float]
    percentiles: dict[float, float]


@dataclass(frozen=True)
class StructureStats:
    """What the output checks measure on one structure."""

    volume_ml: float
    components: int
    confidence: float | None


def input_stats(image: sitk.Image, normalization: Normalization,
                percentiles: list[float]) -> InputStats:
    """Slice count, coverage, spacing and intensity ``percentiles`` of the series ``image``
    after the manifest's ``normalization``."""
    import SimpleITK as sitk

    from aiworker.infer.preprocess import normalize

    spacing = tuple(float(s) for s in image.GetSpacing())
    slices = int(image.GetSize()[2])
    values: dict[float, float] = {}
    if percentiles:
        array = normalize(sitk.GetArrayViewFromImage(image), normalization)
        values = dict(zip(percentiles, (float(v) for v in np.percentile(array, percentiles)),
                          strict=True))
    return InputStats(slices, slices * spacing[2], spacing, values)  # type: ignore[arg-type]


def structure_stats(labels: np.ndarray, voxel_ml: float, names: dict[int, str],
                    confidence: dict[int, float] | None, min_voxels: int
                    ) -> dict[str, StructureStats]:
    """Volume, connected parts of at least ``min_voxels`` voxels (26-connected) and mean
    confidence of every structure ``names`` lists (value -> name) in ``labels``."""
    from scipy import ndimage  # here: the node's parent process needs gate's types only

    counts = np.bincount(labels.ravel(), minlength=256)
    boxes = ndimage.find_objects(labels)
    connectivity = np.ones((3, 3, 3), bool)
    stats = {}
    for value, name in names.items():
        parts = 0
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is not None:
            marked, count = ndimage.label(labels[box] == value, connectivity)
            sizes = np.bincount(marked.ravel())[1:]
            parts = int((sizes >= min_voxels).sum()) if count else 0
        stats[name] = StructureStats(float(counts[value]) * voxel_ml, parts,
                                     None if confidence is None else confidence.get(value))
    return stats


# ----------------------------------------------------------------------------- the checks


def judge(spec: GateSpec, manifest: Manifest, image: sitk.Image, labels: np.ndarray,
          voxel_ml: float, confidence: dict[int, float] | None) -> GateResult:
    """Every check of ``spec`` on the first input series ``image`` and the ``labels``
    (slices, rows, columns) on its slices; ``confidence`` is label value -> mean max-softmax
    (None: the model gave no probabilities, and the confidence checks say so)."""
    wanted = sorted(spec.input.intensity_percentiles)
    stats = input_stats(image, manifest.first_input.normalization, wanted)
    segmentation = manifest.outputs.segmentation
    names = {label.value: label.name for label in segmentation.labels} if segmentation else {}
    structures = structure_stats(labels, voxel_ml, names, confidence,
                                 spec.output.component_min_voxels)
    return GateResult(input_checks(spec.input, stats) + output_checks(spec.output, structures))


def input_checks(spec: InputGate, stats: InputStats) -> list[Check]:
    """The input checks of ``spec`` on ``stats``; each failure is the whole result's."""
    checks = []
    if spec.slices:
        checks.append(_within("slices", INPUT, None, stats.slices, spec.slices,
                              f"{stats.slices} slices", "slices"))
    if spec.coverage_mm:
        checks.append(_within("coverage_mm", INPUT, None, stats.coverage_mm, spec.coverage_mm,
                              f"the slices cover {stats.coverage_mm:.0f} mm along the slice "
                              "axis", "mm"))
    for axis, value in zip("xyz", stats.spacing_mm, strict=True):
        bounds = getattr(spec.spacing_mm, axis) if spec.spacing_mm else None
        if bounds:
            what = "slice spacing" if axis == "z" else f"pixel spacing ({axis})"
            checks.append(_within(f"spacing_mm.{axis}", INPUT, None, value, bounds,
                                  f"{what} {value:.2f} mm", "mm"))
    for percentile, bounds in sorted(spec.intensity_percentiles.items()):
        value = stats.percentiles[percentile]
        checks.append(_within(f"intensity_p{percentile:g}", INPUT, None, value, bounds,
                              f"intensity {_ordinal(percentile)} percentile {value:.3f} after "
                              "normalization (another contrast, or noise?)", ""))
    return checks


def output_checks(spec: OutputGate, stats: dict[str, StructureStats]) -> list[Check]:
    """The output checks of ``spec`` on the structures' ``stats``: a missing required
    structure fails the whole result, any other failure only its structure."""
    checks = []
    for name in spec.required:
        present = stats[name].volume_ml > 0
        checks.append(Check("required", OUTPUT, name, stats[name].volume_ml, (None, None),
                            present, f"{name} not found: the volume may not be a knee"))
    for name, bounds in spec.volume_ml.items():
        if stats[name].volume_ml > 0 or name not in spec.required:
            checks.append(_within("volume_ml", OUTPUT, name, stats[name].volume_ml, bounds,
                                  f"{name}: volume {stats[name].volume_ml:.2f} mL", "mL",
                                  whole=False))
    for name, most in spec.max_components.items():
        parts = stats[name].components
        checks.append(Check("components", OUTPUT, name, parts, (None, most), parts <= most,
                            f"{name}: {parts} separate parts, trained on at most {most}",
                            whole=False))
    for name, least in spec.min_confidence.items():
        value = stats[name].confidence
        if value is None and stats[name].volume_ml <= 0:
            continue  # nothing segmented: the volume and required checks speak for it
        reason = (f"{name}: the model gives no probabilities to check its confidence"
                  if value is None else
                  f"{name}: model confidence {value:.2f}, below the {least:.2f} it has on "
                  "its training data")
        checks.append(Check("confidence", OUTPUT, name, value, (least, None),
                            value is not None and value >= least, reason, whole=False))
    most = spec.max_structures_not_assessable
    failing = sorted({c.structure for c in checks if not c.passed and not c.whole},
                     key=list(stats).index)
    if most is not None:
        checks.append(Check("structures", OUTPUT, None, len(failing), (None, most),
                            len(failing) <= most,
                            f"{len(failing)} structures not assessable ({', '.join(failing)}):"
                            f" the segmentation as a whole is implausible (at most {most})"))
    return checks


def _within(name: str, scope: str, structure: str | None, value: float, bounds: list[Bound],
            what: str, unit: str, whole: bool = True) -> Check:
    """A range check whose reason reads ``<what>, the model was trained on <range>``."""
    low, high = bounds
    passed = (low is None or value >= low) and (high is None or value <= high)
    return Check(name, scope, structure, value, (low, high), passed,
                 f"{what}; the model was trained on {_range_text(low, high, unit)}", whole)


def _range_text(low: Bound, high: Bound, unit: str) -> str:
    suffix = f" {unit}" if unit else ""
    if low is not None and high is not None:
        return f"{low:g} to {high:g}{suffix}"
    return f"at least {low:g}{suffix}" if low is not None else f"at most {high:g}{suffix}"


def _ordinal(value: float) -> str:
    number = f"{value:g}"
    if math.isclose(value, round(value)) and int(value) % 100 not in (11, 12, 13):
        return number + {1: "st", 2: "nd", 3: "rd"}.get(int(value) % 10, "th")
    return number + "th"


# ----------------------------------------------------------------------------- findings


def apply(findings: dict[str, Any], verdict: GateResult, spec: GateSpec,
          manifest: Manifest) -> dict[str, Any]:
    """``findings`` with the verdict in ``quality`` and every classification measured on a
    structure that is not assessable (or of a result that is not) marked not assessable."""
    quality = verdict.to_json()
    segmentation = manifest.outputs.segmentation
    names = {label.value: label.name for label in segmentation.labels} if segmentation else {}
    per_finding = {}
    for head in manifest.outputs.classification:
        classified = findings.get("classification", {}).get(head.name)
        region = [names.get(v) for v in (head.region.label, head.region.reference_label)] \
            if head.region else []  # a head reading the network: only whole-result reasons
        reasons = verdict.reasons + [r for name in region if name
                                     for r in verdict.structures.get(name, [])]
        if classified is None or not reasons:
            continue
        per_finding[head.name] = reasons
        classified["model_decision"] = classified["decision"]
        classified["decision"] = NOT_ASSESSABLE
        classified["not_assessable"] = reasons
    quality["findings"] = per_finding
    withheld = not verdict.assessable and not spec.send_seg_when_not_assessable
    quality["seg"] = "withheld" if withheld else "sent"
    return findings | {"quality": quality}


def structure_reasons(findings: dict[str, Any], name: str) -> list[str]:
    """Why the structure ``name`` is not assessable (the whole result's reasons first);
    empty when it is, or when the model has no gate."""
    quality = findings.get("quality") or {}
    return list(quality.get("reasons", [])) + list(quality.get("structures", {}).get(name, []))


def finding_reasons(findings: dict[str, Any], head: str) -> list[str]:
    """Why the classification ``head`` is not assessable; empty when it is assessed."""
    classified = (findings.get("classification") or {}).get(head) or {}
    if classified.get("decision") != NOT_ASSESSABLE:
        return []
    return list(classified.get("not_assessable") or ["the quality gate failed"])


def whole_reasons(findings: dict[str, Any]) -> list[str]:
    """Why the whole result is not assessable; empty when it is (or has no gate)."""
    return list((findings.get("quality") or {}).get("reasons", []))


def seg_withheld(findings: dict[str, Any]) -> bool:
    """True when the gate keeps the SEG of a not-assessable result from being sent."""
    return (findings.get("quality") or {}).get("seg") == "withheld"


def withheld_objects(folder: Path) -> set[str]:
    """The object kinds (``seg``) the gate keeps from being sent for the job whose result
    folder is ``folder``, read from its findings (none without a gate, or before the
    findings are written); a classification-only model's job has no SEG to send either."""
    from aiworker.store.layout import ResultFolder

    try:
        document = json.loads(ResultFolder(folder).findings.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    findings = document.get("findings", document)  # aiworker infer nests them
    if not isinstance(findings, dict):
        return set()
    return {"seg"} if seg_withheld(findings) or findings.get("segmentation") is False else set()


def reason_text(reasons: list[str]) -> str:
    """``not assessable: <reason>; <reason>``."""
    return f"{NOT_ASSESSABLE}: " + "; ".join(reasons)
