"""The quality gate's limits: the manifest's ``gate:`` section (:class:`GateSpec`).

A model without one has no gate and its results are unchanged. The checks that read these
limits are in :mod:`aiworker.infer.gate`. ::

    gate:
      input:                        # the series fed to the first channel, as loaded
        slices: [20, 40]            # [min, max]; null leaves a side open
        coverage_mm: [84, null]     # slices x step between slices
        spacing_mm: {x: [0.25, 0.65], y: [0.25, 0.65], z: [2.4, 4.3]}
        intensity_percentiles:      # percentile of the normalized series -> its range
          50: [0.04, 0.14]
          90: [0.24, 0.42]
      output:                       # the labels on the source slices
        required: [Femur, Tibia, ACL, PCL]
        volume_ml: {Femur: [150, 420], ACL: [0.6, 2.5]}
        max_components: {ACL: 3}    # parts of at least component_min_voxels voxels
        component_min_voxels: 20
        min_confidence: {ACL: 0.80} # mean max-softmax inside the predicted structure
        max_structures_not_assessable: 2  # more: the whole result is not assessable
      send_seg_when_not_assessable: false
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from aiworker.infer.manifest import Manifest

Bound = float | None


def _ordered(bounds: list[Bound]) -> list[Bound]:
    low, high = bounds
    if low is not None and high is not None and low > high:
        raise ValueError(f"min {low:g} is above max {high:g}")
    return bounds


Bounds = Annotated[list[Bound], Field(min_length=2, max_length=2, description="[min, max]"),
                   AfterValidator(_ordered)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpacingRanges(_Spec):
    """Allowed voxel spacing (mm) of the series as loaded: ``x`` between columns, ``y``
    between rows, ``z`` between slices."""

    x: Bounds | None = None
    y: Bounds | None = None
    z: Bounds | None = None


class InputGate(_Spec):
    """What the input series must look like (see the module docstring)."""

    slices: Bounds | None = None
    coverage_mm: Bounds | None = None
    spacing_mm: SpacingRanges | None = None
    intensity_percentiles: dict[Annotated[float, Field(ge=0, le=100)], Bounds] = {}


class OutputGate(_Spec):
    """What the label map and the model's confidence must look like; keys are label names
    of ``outputs.segmentation``."""

    required: list[str] = []
    volume_ml: dict[str, Bounds] = {}
    max_components: dict[str, Annotated[int, Field(ge=1)]] = {}
    component_min_voxels: int = Field(20, ge=1)
    min_confidence: dict[str, Annotated[float, Field(ge=0, le=1)]] = {}
    max_structures_not_assessable: int | None = Field(None, ge=0)

    def names(self) -> dict[str, list[str]]:
        """Key path -> the label names it uses, for the manifest's cross-checks."""
        return {"required": self.required, "volume_ml": list(self.volume_ml),
                "max_components": list(self.max_components),
                "min_confidence": list(self.min_confidence)}


class GateSpec(_Spec):
    """The manifest's ``gate:`` section; ``derived_from`` says where its ranges come from."""

    input: InputGate = InputGate()
    output: OutputGate = OutputGate()
    send_seg_when_not_assessable: bool = False
    derived_from: str | None = None


def label_problems(spec: GateSpec, manifest: Manifest) -> list[tuple[str, str]]:
    """(key, problem) for every label name of the gate that the manifest does not segment."""
    segmentation = manifest.outputs.segmentation
    known = {label.name for label in segmentation.labels} if segmentation else set()
    return [(f"gate.output.{key}", f"{name!r} is not a name of outputs.segmentation.labels")
            for key, names in spec.output.names().items() for name in names if name not in known]
