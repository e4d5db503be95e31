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

A ``gate:`` section sets the quality gate's limits (:class:`aiworker.infer.gate.GateSpec`;
without it a model's results pass ungated).

Format ``nnunet_v2`` takes an ``nnunet:`` section and ``monai_bundle`` an optional
``bundle:`` section (:class:`NnunetV2`, :class:`Bundle`; docs/byo-model.md has examples).

:func:`load_manifest` reads and checks one file; a bad manifest raises
:class:`ManifestError` with one line per problem: the file, the key path, what is wrong
and the bad value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aiworker.infer.gate import GateSpec, label_problems

MANIFEST_NAME = "model.yaml"

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
Version = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", max_length=32)]
Positive = Annotated[float, Field(gt=0)]
Size = Annotated[int, Field(ge=1)]
Channel = Annotated[int, Field(ge=0, le=255)]
Color = Annotated[list[Channel], Field(min_length=3, max_length=3, description="R, G, B")]
Xyz = Annotated[list[Positive], Field(min_length=3, max_length=3, description="x, y, z")]
XyzSize = Annotated[list[Size], Field(min_length=3, max_length=3, description="x, y, z")]

AXIS_LETTERS = ("LR", "AP", "SI")


class ModelError(Exception):
    """A model that cannot be found, read or loaded; ``kind`` names the failure class
    a job records ("model": the fault is the model's, not the study's)."""

    kind = "model"


class ManifestError(ModelError):
    """A manifest that cannot be used; ``str()`` has one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Network(_Section):
    """A MONAI network class (short name in ``monai.networks.nets`` or a dotted path) and
    the keyword arguments that build it."""

    class_name: str = Field(alias="class", min_length=1)
    args: dict[str, Any] = {}


class Normalization(_Section):
    """Intensity normalization: ``zscore`` (mean 0, sd 1), ``percentile`` (the ``lower``
    and ``upper`` percentiles map to 0 and 1, clipped) or ``none``."""

    method: Literal["zscore", "percentile", "none"] = "zscore"
    lower: float = Field(1.0, ge=0, le=100)
    upper: float = Field(99.0, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> Normalization:
        if self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        return self


class Input(_Section):
    """What the model is fed: one series role per channel, and how the volume is
    resampled, normalized and cropped/padded first (axes in x, y, z order)."""

    channels: list[Name] = Field(min_length=1)
    orientation: str = "as-acquired"
    spacing_mm: Xyz | None = None
    normalization: Normalization = Normalization()
    size: XyzSize | None = None

    @field_validator("channels")
    @classmethod
    def _distinct_roles(cls, roles: list[str]) -> list[str]:
        repeated = sorted({role for role in roles if roles.count(role) > 1})
        if repeated:
            raise ValueError(f"each role feeds one channel; repeated: {', '.join(repeated)}")
        return roles

    @field_validator("orientation")
    @classmethod
    def _known_orientation(cls, value: str) -> str:
        if value == "as-acquired" or _is_axis_code(value):
            return value
        raise ValueError("must be as-acquired or three letters, one each of L/R, A/P and S/I "
                         "(e.g. LPS, RAS)")


def _is_axis_code(value: str) -> bool:
    """True for a three-letter orientation code such as LPS or RAS."""
    if len(value) != 3:
        return False
    axes = [next((i for i, pair in enumerate(AXIS_LETTERS) if ch in pair), None) for ch in value]
    return None not in axes and sorted(axes) == [0, 1, 2]


class Inference(_Section):
    """How the network runs: sliding-window ROI (None = whole volume), overlap, windows per
    batch, the autocast dtype on GPU, and the wall-clock limit of one series."""

    roi_size: XyzSize | None = None
    overlap: float = Field(0.25, ge=0, lt=1)
    sw_batch_size: int = Field(1, ge=1)
    amp_dtype: Literal["float16", "bfloat16", "none"] = "none"
    time_limit_s: float = Field(300.0, gt=0)


class Code(_Section):
    """A coded concept (DICOM code sequence item): code value, scheme designator, meaning;
    ``checked`` records where the code and its meaning were checked (not written to DICOM)."""

    value: str = Field(min_length=1, max_length=64)
    scheme_designator: str = Field("SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)
    checked: str | None = None

    @model_validator(mode="after")
    def _sct_is_numeric(self) -> Code:
        if self.scheme_designator == "SCT" and not re.fullmatch(r"[0-9]{6,18}", self.value):
            raise ValueError(f"an SCT code value is 6 to 18 digits (got {self.value!r})")
        return self


class Label(_Section):
    """One segment: its value in the label volume, name, display colour (RGB 0-255), the
    SNOMED CT codes for segmented property category and type, and optionally the anatomic
    region the type lies in (cartilage: of the femur, tibia or patella)."""

    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1, max_length=64)
    color: Color
    category: Code
    type: Code
    anatomic_region: Code | None = None


class Segmentation(_Section):
    """The label map the model writes (0 is background and is not listed);
    ``largest_component`` keeps only the largest connected part of each label."""

    labels: list[Label] = Field(min_length=1)
    largest_component: bool = False

    @model_validator(mode="after")
    def _unique(self) -> Segmentation:
        problems = [_repeated("value", [label.value for label in self.labels]),
                    _repeated("name", [label.name for label in self.labels])]
        problems = [problem for problem in problems if problem]
        if problems:
            raise ValueError("; ".join(problems))
        return self


REGION_FEATURES = ("volume_ml", "volume_ratio", "components", "largest_fraction",
                   "extent_mm", "gap_mm", "mean_intensity")


class RegionClassifier(_Section):
    """A logistic model over measurements of one segmented region (see
    :mod:`aiworker.infer.findings`): features are standardized with ``mean`` and ``scale``,
    then P(positive) = sigmoid(intercept + coefficients . features)."""

    label: int = Field(ge=1, le=255, description="the label value whose region is measured")
    reference_label: int | None = Field(None, ge=1, le=255,
                                        description="volume_ratio divides by its volume")
    features: list[Literal[REGION_FEATURES]] = Field(min_length=1)  # type: ignore[valid-type]
    mean: list[float]
    scale: list[Positive]
    coefficients: list[float]
    intercept: float

    @model_validator(mode="after")
    def _same_lengths(self) -> RegionClassifier:
        lengths = {len(self.features), len(self.mean), len(self.scale), len(self.coefficients)}
        if len(lengths) > 1:
            raise ValueError("features, mean, scale and coefficients must have one entry "
                             "per feature")
        if "volume_ratio" in self.features and self.reference_label is None:
            raise ValueError("feature volume_ratio needs reference_label")
        return self


class ClassificationHead(_Section):
    """One classification output: its classes, which one is the finding, the probability at
    or above which the finding is reported, and the model that gives that probability
    (``region``: a logistic model over the segmented region; the only kind so far)."""

    name: Name
    classes: list[str] = Field(min_length=2, max_length=2)
    positive: str
    threshold: float = Field(0.5, ge=0, le=1)
    region: RegionClassifier

    @model_validator(mode="after")
    def _positive_is_a_class(self) -> ClassificationHead:
        repeated = _repeated("class", self.classes)
        if repeated:
            raise ValueError(repeated)
        if self.positive not in self.classes:
            raise ValueError(f"positive class {self.positive!r} is not one of the classes "
                             f"({', '.join(self.classes)})")
        return self


class Outputs(_Section):
    """What the model produces: a segmentation, classification heads, or both."""

    segmentation: Segmentation | None = None
    classification: list[ClassificationHead] = []

    @model_validator(mode="after")
    def _something(self) -> Outputs:
        if self.segmentation is None and not self.classification:
            raise ValueError("a model must output a segmentation or a classification")
        repeated = _repeated("head name", [head.name for head in self.classification])
        if repeated:
            raise ValueError(repeated)
        return self


class NnunetV2(_Section):
    """Format ``nnunet_v2``: the nnU-Net v2 results folder (the trainer folder holding
    ``dataset.json``, ``plans.json`` and ``fold_N/``; absolute, or relative to the model
    folder), its configuration, the folds ensembled, the checkpoint file, test-time
    mirroring, the sliding-window step (a fraction of the patch) and the series role of
    each ``dataset.json`` channel name."""

    results: str = "."
    configuration: str = Field(min_length=1)
    folds: list[Annotated[int, Field(ge=0)] | Literal["all"]] = Field(min_length=1)
    checkpoint: str = Field("checkpoint_final.pth", pattern=r"^[^/\\]+$")
    mirroring: bool = True
    step_size: float = Field(0.5, gt=0, le=1)
    channels: dict[str, Name] = {}


class Bundle(_Section):
    """Format ``monai_bundle``: the config in ``configs/`` (default: inference.json, .yaml
    or .yml), its key of the network (default network_def, else network) and the key of
    the model's state in a checkpoint dict (default: the config's CheckpointLoader's)."""

    config: str | None = Field(None, pattern=r"^[^/\\]+$")
    network_key: str | None = None
    checkpoint_key: str | None = None


class Manifest(_Section):
    """A whole ``model.yaml``."""

    name: Name
    version: Version
    format: Literal["torchscript", "monai_bundle", "state_dict", "nnunet_v2"]
    weights: str | None = Field(None, description="file (or bundle folder) relative to the "
                                                  "model folder; default per format")
    network: Network | None = None
    nnunet: NnunetV2 | None = None
    bundle: Bundle | None = None
    input: Input
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

    def to_yaml(self) -> str:
        """The manifest as YAML that :func:`parse_manifest` reads back to an equal one."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def _repeated(what: str, values: list[Any]) -> str | None:
    """``"<what> repeated: a, b"`` naming the values listed more than once, else None."""
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    return f"{what} must be unique; repeated: {', '.join(repeated)}" if repeated else None


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
    in_channels = network.args.get("in_channels") if network else None
    if in_channels is not None and in_channels != len(manifest.input.channels):
        problems.append(("network.args.in_channels",
                         f"is {in_channels} but input.channels names "
                         f"{len(manifest.input.channels)} role(s) (got {in_channels!r})"))
    labels = {label.value for label in manifest.outputs.segmentation.labels} \
        if manifest.outputs.segmentation else set()
    for index, head in enumerate(manifest.outputs.classification):
        for key in ("label", "reference_label"):
            value = getattr(head.region, key)
            if value is not None and value not in labels:
                problems.append((f"outputs.classification.{index}.region.{key}",
                                 f"is not a value of outputs.segmentation.labels "
                                 f"(got {value!r})"))
    if manifest.gate is not None:
        problems += label_problems(manifest.gate, manifest)
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
    if fmt == "nnunet_v2":
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
