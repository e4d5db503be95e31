"""The sections of a model's manifest (``model.yaml``; see :mod:`aiworker.infer.manifest`).

Each section is a pydantic model that checks itself: what the model is fed (:class:`Input`,
:class:`Normalization`), the network that builds it (:class:`Network`) and how it runs
(:class:`Inference`), what it outputs (:class:`Outputs`: segmentation labels with their codes,
classification heads), and the sections of one format (:class:`NnunetV2`, :class:`Bundle`).
Rules that tie sections together are checked by :func:`aiworker.infer.manifest.parse_manifest`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
Positive = Annotated[float, Field(gt=0)]
Size = Annotated[int, Field(ge=1)]
Channel = Annotated[int, Field(ge=0, le=255)]
Color = Annotated[list[Channel], Field(min_length=3, max_length=3, description="R, G, B")]
Xyz = Annotated[list[Positive], Field(min_length=3, max_length=3, description="x, y, z")]
XyzSize = Annotated[list[Size], Field(min_length=3, max_length=3, description="x, y, z")]

AXIS_LETTERS = ("LR", "AP", "SI")


class Section(BaseModel):
    """A manifest section: unknown keys are errors; keys may be given by alias."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Network(Section):
    """A MONAI network class (short name in ``monai.networks.nets`` or a dotted path) and
    the keyword arguments that build it."""

    class_name: str = Field(alias="class", min_length=1)
    args: dict[str, Any] = {}


class Normalization(Section):
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


class Input(Section):
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


class Inference(Section):
    """How the network runs: sliding-window ROI (None = whole volume), overlap, windows per
    batch, the autocast dtype on GPU, and the wall-clock limit of one series."""

    roi_size: XyzSize | None = None
    overlap: float = Field(0.25, ge=0, lt=1)
    sw_batch_size: int = Field(1, ge=1)
    amp_dtype: Literal["float16", "bfloat16", "none"] = "none"
    time_limit_s: float = Field(300.0, gt=0)


class Code(Section):
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


class Label(Section):
    """One segment: its value in the label volume, name, display colour (RGB 0-255), the
    SNOMED CT codes for segmented property category and type, and optionally the anatomic
    region the type lies in (cartilage: of the femur, tibia or patella)."""

    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1, max_length=64)
    color: Color
    category: Code
    type: Code
    anatomic_region: Code | None = None


# which of a network's outputs: its index in the tuple (or list) it returns, or its key in
# the dict it returns; a network returning one tensor has only output 0
OutputKey = Annotated[int, Field(ge=0)] | Name


class Segmentation(Section):
    """The label map the model writes (0 is background and is not listed);
    ``largest_component`` keeps only the largest connected part of each label; ``output``
    is the network output holding the logits (read by a model run on whole inputs, see
    :attr:`~aiworker.infer.manifest.Manifest.whole_inputs`)."""

    labels: list[Label] = Field(min_length=1)
    largest_component: bool = False
    output: OutputKey = 0

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


class RegionClassifier(Section):
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


class NetworkHead(Section):
    """A classification the network itself outputs: which output (see ``OutputKey``), and
    how its values become probabilities: ``softmax`` over one value per class (in the
    order of ``classes``), or ``sigmoid`` of one value, the positive class's logit."""

    output: OutputKey = 0
    activation: Literal["softmax", "sigmoid"] = "softmax"


class ClassificationHead(Section):
    """One classification output: its classes, which one is the finding, the probability at
    or above which the finding is reported, and the model that gives that probability:
    ``region`` (a logistic model over the segmented region) or ``network`` (an output of
    the network, e.g. an MRNet-style classifier with no segmentation). ``finding`` is the
    coded finding the SR states present or absent (default: the node's code for a head of
    that name, e.g. ``acl``: SCT 239725005 Rupture of anterior cruciate ligament)."""

    name: Name
    classes: list[str] = Field(min_length=2, max_length=2)
    positive: str
    threshold: float = Field(0.5, ge=0, le=1)
    region: RegionClassifier | None = None
    network: NetworkHead | None = None
    finding: Code | None = None

    @model_validator(mode="after")
    def _positive_is_a_class(self) -> ClassificationHead:
        repeated = _repeated("class", self.classes)
        if repeated:
            raise ValueError(repeated)
        if self.positive not in self.classes:
            raise ValueError(f"positive class {self.positive!r} is not one of the classes "
                             f"({', '.join(self.classes)})")
        if (self.region is None) == (self.network is None):
            raise ValueError("give exactly one of region (a model over a segmented region) "
                             "and network (an output of the network)")
        return self


class Outputs(Section):
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


class NnunetV2(Section):
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


class Bundle(Section):
    """Format ``monai_bundle``: the config in ``configs/`` (default: inference.json, .yaml
    or .yml), its key of the network (default network_def, else network) and the key of
    the model's state in a checkpoint dict (default: the config's CheckpointLoader's)."""

    config: str | None = Field(None, pattern=r"^[^/\\]+$")
    network_key: str | None = None
    checkpoint_key: str | None = None


def _repeated(what: str, values: list[Any]) -> str | None:
    """``"<what> repeated: a, b"`` naming the values listed more than once, else None."""
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    return f"{what} must be unique; repeated: {', '.join(repeated)}" if repeated else None
