"""A model's manifest: the ``model.yaml`` that sits in a model's folder.

The manifest says what the model is (name, version, weights format), what it expects as
input (which series roles feed which channels, orientation, spacing, intensity
normalization, crop/pad size), how to run it (sliding-window ROI, overlap, batch size,
AMP dtype, time limit), what it produces (segmentation labels with colours and SNOMED CT
codes; classification heads with classes, positive class and threshold) and what it is
for (intended-use text). An example::

    name: knee-demo
    version: 0.1.0
    format: state_dict            # torchscript | monai_bundle | state_dict | nnunet_v2
    weights: model.pt             # relative to the folder; default per format
    network:                      # state_dict only: a MONAI network and its arguments
      class: UNet                 # short name in monai.networks.nets, or a dotted path
      args: {spatial_dims: 3, in_channels: 1, out_channels: 3,
             channels: [16, 32, 64], strides: [2, 2]}
    input:
      channels: [sag_pd_fs]       # series role per input channel, in channel order
      orientation: LPS            # three letters (one of L/R, A/P, S/I) or as-acquired
      spacing_mm: [0.5, 0.5, 3.0] # target spacing (x, y, z); null keeps the series'
      normalization: {method: percentile, lower: 1, upper: 99}  # zscore | percentile | none
      size: [256, 256, 32]        # crop/pad to this (x, y, z); null = no crop/pad
    inference:
      roi_size: [128, 128, 32]    # sliding-window ROI; null = the whole volume at once
      overlap: 0.25
      sw_batch_size: 4
      amp_dtype: float16          # on GPU: float16 | bfloat16 | none
      time_limit_s: 120
    outputs:
      segmentation:
        labels:
          - value: 1
            name: Femur
            color: [230, 216, 170]
            category: {value: "91723000", scheme_designator: SCT,
                       meaning: Anatomical structure}
            type: {value: "71341001", scheme_designator: SCT, meaning: Femur}
      classification:
        - name: acl
          classes: [intact, torn]
          positive: torn
          threshold: 0.5
          region:                 # logistic model over measurements of one label's region
            label: 10
            reference_label: 11   # volume_ratio = volume of label / volume of this one
            features: [volume_ratio, gap_mm]
            mean: [0.8, 2.0]      # features are standardized: (value - mean) / scale
            scale: [0.2, 3.0]
            coefficients: [-1.5, 2.5]
            intercept: -0.2
    intended_use: Research demonstration on synthetic phantoms; not a medical device.

A model that reads several series, each on its own grid, gives ``inputs:`` (a list of
``input`` sections, one per tensor the network takes, in argument order) instead of
``input:``; it runs on whole inputs (no sliding window) and its network is called with one
tensor per input. A classification head may read a network output (``network: {output: 0,
activation: softmax}``) instead of a segmented region, and a model may have no
``segmentation`` at all (a classification-only model: an SR and the report, no SEG)::

    inputs:
      - {channels: [sag], orientation: LPS, spacing_mm: [1, 1, 3], size: [96, 96, 24]}
      - {channels: [cor], orientation: LPS, spacing_mm: [1, 3, 1], size: [96, 24, 96]}
    outputs:
      classification:
        - {name: acl, classes: [intact, torn], positive: torn,
           network: {output: 0, activation: softmax}}

The sections' models are in :mod:`aiworker.infer.manifest_sections`. A ``gate:`` section
sets the quality gate's limits (:class:`aiworker.infer.gate_spec.GateSpec`; without it a model's
results pass ungated).

Format ``nnunet_v2`` takes an ``nnunet:`` section and ``monai_bundle`` an optional
``bundle:`` section (:class:`~aiworker.infer.manifest_sections.NnunetV2`,
:class:`~aiworker.infer.manifest_sections.Bundle`; docs/byo-model.md has examples).

:func:`load_manifest` reads and checks one file; a bad manifest raises
:class:`ManifestError` with one line per problem: the file, the key path, what is wrong
and the bad value.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from aiworker.infer.gate_spec import GateSpec, label_problems
from aiworker.infer.manifest_sections import (
    Bundle,
    Inference,
    Input,
    Name,
    Network,
    NnunetV2,
    Outputs,
    Section,
)

MANIFEST_NAME = "model.yaml"

Version = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", max_length=32)]


class ModelError(Exception):
    """A model that cannot be found, read or loaded; ``kind`` names the failure class
    a job records ("model": the fault is the model's, not the study's)."""

    kind = "model"


class ManifestError(ModelError):
    """A manifest that cannot be used; ``str()`` has one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Manifest(Section):
    """A whole ``model.yaml``."""

    name: Name
    version: Version
    format: Literal["torchscript", "monai_bundle", "state_dict", "nnunet_v2"]
    weights: str | None = Field(None, description="file (or bundle folder) relative to the "
                                                  "model folder; default per format")
    network: Network | None = None
    nnunet: NnunetV2 | None = None
    bundle: Bundle | None = None
    input: Input | None = None
    inputs: list[Input] | None = Field(None, min_length=1)
    inference: Inference = Inference()
    outputs: Outputs
    gate: GateSpec | None = None  # the quality gate (aiworker.infer.gate); None: no gate
    intended_use: str = Field(min_length=1)

    @field_validator("weights")
    @classmethod
    def _inside_the_folder(cls, value: str | None) -> str | None:
        if value is not None and (Path(value).is_absolute() or ".." in Path(value).parts):
            raise ValueError("must be a path inside the model folder")
        return value

    @property
    def weights_path(self) -> str:
        """The weights file (or bundle folder) relative to the model folder."""
        if self.format == "nnunet_v2" and self.nnunet is not None:
            return self.nnunet.results
        defaults = {"torchscript": "model.ts", "state_dict": "model.pt", "monai_bundle": "."}
        return self.weights or defaults.get(self.format, ".")

    @property
    def tensor_inputs(self) -> list[Input]:
        """The ``input`` section of each tensor the network takes, in argument order."""
        return self.inputs or ([self.input] if self.input is not None else [])

    @property
    def first_input(self) -> Input:
        """The first tensor's input: the series the labels and the gate's input checks are
        on."""
        return self.tensor_inputs[0]

    @property
    def roles(self) -> list[str]:
        """The series role of every input channel, over all inputs, in order."""
        return [role for spec in self.tensor_inputs for role in spec.channels]

    @property
    def whole_inputs(self) -> bool:
        """True when the network runs on whole inputs, called with one tensor per input
        and read output by output (several inputs, or a head reading the network), not by
        a sliding window over one tensor."""
        return bool(self.inputs) or any(head.network is not None
                                        for head in self.outputs.classification)

    def to_yaml(self) -> str:
        """The manifest as YAML that :func:`parse_manifest` reads back to an equal one."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


Complete = Callable[[dict[str, Any]], dict[str, Any]]


def load_manifest(path: Path, complete: Complete | None = None) -> Manifest:
    """Read and check the manifest file at ``path`` (see :func:`parse_manifest`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read the manifest: {exc.strerror}"]) from exc
    return parse_manifest(text, path, complete)


def parse_manifest(text: str, path: Path, complete: Complete | None = None) -> Manifest:
    """Check manifest YAML ``text``; ``path`` names it in error lines. ``complete``, when
    given, fills what the manifest leaves to the model's own files (labels, channels)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError([f"{path}: not valid YAML: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise ManifestError([f"{path}: the top level must be a mapping of keys"])
    try:
        manifest = Manifest.model_validate(complete(raw) if complete else raw)
    except ValidationError as exc:
        raise ManifestError(_describe(exc, path)) from exc
    problems = _across_sections(manifest)
    if problems:
        raise ManifestError([f"{path}: {key}: {message}" for key, message in problems])
    return manifest


def _across_sections(manifest: Manifest) -> list[tuple[str, str]]:
    """(key, problem) for rules that tie sections together: the network goes with
    format state_dict, and its in_channels matches the input roles."""
    network, problems = manifest.network, []
    if manifest.format == "state_dict" and network is None:
        problems.append(("network", "format state_dict needs network (a MONAI class and its "
                                    "args)"))
    if manifest.format != "state_dict" and network is not None:
        problems.append(("network", f"only for format state_dict, not {manifest.format}"))
    problems += _format_sections(manifest)
    problems += _input_sections(manifest)
    in_channels = network.args.get("in_channels") if network else None
    if manifest.input is not None and in_channels is not None \
            and in_channels != len(manifest.input.channels):
        problems.append(("network.args.in_channels",
                         f"is {in_channels} but input.channels names "
                         f"{len(manifest.input.channels)} role(s) (got {in_channels!r})"))
    labels = {label.value for label in manifest.outputs.segmentation.labels} \
        if manifest.outputs.segmentation else set()
    for index, head in enumerate(manifest.outputs.classification):
        if head.region is None:
            continue
        for key in ("label", "reference_label"):
            value = getattr(head.region, key)
            if value is not None and value not in labels:
                problems.append((f"outputs.classification.{index}.region.{key}",
                                 f"is not a value of outputs.segmentation.labels "
                                 f"(got {value!r})"))
    if manifest.gate is not None:
        problems += label_problems(manifest.gate, manifest)
    return problems


def _input_sections(manifest: Manifest) -> list[tuple[str, str]]:
    """(key, problem) for the inputs: ``input`` or ``inputs``, each role feeding one channel,
    and a model run on whole inputs has no sliding window and no nnU-Net predictor."""
    if (manifest.input is None) == (manifest.inputs is None):
        return [("input", "give input (one tensor) or inputs (one per tensor), not both"
                          if manifest.input else "missing: give input or inputs")]
    problems = []
    roles = manifest.roles
    repeated = sorted({role for role in roles if roles.count(role) > 1})
    if repeated:
        problems.append(("inputs", f"each role feeds one channel; repeated: "
                                   f"{', '.join(repeated)}"))
    if manifest.whole_inputs and manifest.inference.roi_size is not None:
        problems.append(("inference.roi_size", "a model run on whole inputs (inputs, or a "
                                               "network classification head) has no sliding "
                                               "window; leave it out"))
    if manifest.whole_inputs and manifest.format == "nnunet_v2":
        problems.append(("inputs" if manifest.inputs else "outputs.classification",
                         "format nnunet_v2 reads one input and segments; its heads use "
                         "region"))
    return problems


def _format_sections(manifest: Manifest) -> list[tuple[str, str]]:
    """(key, problem) for the sections of one format: ``nnunet`` goes with nnunet_v2 (which
    preprocesses by its plans, not by ``input``'s grid), ``bundle`` with monai_bundle."""
    fmt, problems = manifest.format, []
    if fmt == "nnunet_v2" and manifest.nnunet is None:
        problems.append(("nnunet", "format nnunet_v2 needs nnunet (results folder, "
                                   "configuration, folds)"))
    if fmt == "nnunet_v2" and manifest.weights is not None:
        problems.append(("weights", "not for format nnunet_v2: nnunet.results names the folder"))
    if fmt == "nnunet_v2" and manifest.input is not None:
        given = manifest.input.model_fields_set - {"channels"}
        problems += [(f"input.{key}", "nnU-Net preprocesses as its plans say; not for format "
                                      "nnunet_v2") for key in sorted(given)]
    for key, owner in (("nnunet", "nnunet_v2"), ("bundle", "monai_bundle")):
        if getattr(manifest, key) is not None and fmt != owner:
            problems.append((key, f"only for format {owner}, not {fmt}"))
    return problems


def _describe(exc: ValidationError, path: Path) -> list[str]:
    """One line per pydantic problem: ``file: dotted.key: message (got value)``."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        value = error.get("input")
        shown = "" if isinstance(value, dict) or error["type"] == "missing" else f" (got {value!r})"
        lines.append(f"{path}: {key}: {message}{shown}")
    return lines
