"""Models run on whole inputs: several series, each on its own grid, and network outputs.

A manifest with ``inputs:`` (several tensors) or with a classification head that reads the
network (``network: {output, activation}``) runs here instead of through a sliding window
(:attr:`~aiworker.infer.manifest.Manifest.whole_inputs`):

1. :func:`prepare`: the job's series (one per role, in :attr:`Manifest.roles` order) are
   split among the inputs, and each input is oriented, resampled, cropped/padded and
   normalized on its own grid by :func:`aiworker.infer.preprocess.model_input`: an
   MRNet-style model gets a sagittal, a coronal and an axial volume, each at its own
   spacing and size, never resampled onto one another;
2. the network is called once with one tensor per input, ``network(t0, t1, ...)``, each of
   shape (1, channels, x, y, z);
3. :func:`outputs`: what it returns (one tensor, a tuple or list, or a dict of tensors) as
   numpy arrays without the batch axis; :func:`pick` finds the one a segmentation or a head
   names (index or key); :func:`network_finding` turns a head's values into its probability
   and decision (softmax over one value per class, or sigmoid of the positive class's
   logit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aiworker.infer.manifest import Manifest, ModelError
from aiworker.infer.manifest_sections import ClassificationHead, OutputKey
from aiworker.infer.preprocess import ModelInput, model_input

Outputs = list[np.ndarray] | dict[str, np.ndarray]


def prepare(images: Sequence[Any], manifest: Manifest) -> list[ModelInput]:
    """Each input's array and grid from ``images`` (SimpleITK images, one per role in
    :attr:`Manifest.roles` order)."""
    if len(images) != len(manifest.roles):
        raise ValueError(f"the model reads {len(manifest.roles)} series "
                         f"({', '.join(manifest.roles)}), got {len(images)}")
    prepared, start = [], 0
    for spec in manifest.tensor_inputs:
        prepared.append(model_input(list(images[start:start + len(spec.channels)]), spec))
        start += len(spec.channels)
    return prepared


def outputs(returned: Any, model_id: str) -> Outputs:
    """What the network returned as numpy float arrays without their batch axis."""
    import torch

    def plain(value: Any, where: str) -> np.ndarray:
        if not isinstance(value, torch.Tensor) or value.ndim < 1 or value.shape[0] != 1:
            raise ModelError(f"{model_id}: the network's output {where} is not a tensor "
                             f"with a batch of one (got {_shape(value)})")
        return value[0].float().cpu().numpy()

    if isinstance(returned, Mapping):
        return {str(key): plain(value, repr(key)) for key, value in returned.items()}
    if isinstance(returned, (tuple, list)):
        return [plain(value, str(index)) for index, value in enumerate(returned)]
    return [plain(returned, "0")]


def pick(found: Outputs, key: OutputKey, model_id: str) -> np.ndarray:
    """The network output ``key`` names (an index, or a dict key)."""
    if isinstance(found, dict):
        if str(key) not in found:
            raise ModelError(f"{model_id}: the network returns no output {key!r} "
                             f"(it returns {', '.join(map(repr, found))})")
        return found[str(key)]
    if not isinstance(key, int) or key >= len(found):
        raise ModelError(f"{model_id}: the network returns no output {key!r} "
                         f"(it returns {len(found)} output(s), by index)")
    return found[key]


def network_finding(head: ClassificationHead, values: np.ndarray, model_id: str
                    ) -> dict[str, Any]:
    """One head's finding from its network output: the probability of its positive class,
    the decision at its threshold and the class probabilities."""
    assert head.network is not None
    flat = np.asarray(values, dtype=np.float64).ravel()
    if head.network.activation == "sigmoid":
        if flat.size != 1:
            raise ModelError(f"{model_id}: head {head.name}: sigmoid reads one value (the "
                             f"positive class's logit), the output has {flat.size}")
        p = 1.0 / (1.0 + math.exp(-max(min(float(flat[0]), 50.0), -50.0)))
        others = [name for name in head.classes if name != head.positive]
        probabilities = {head.positive: p, others[0]: 1.0 - p}
    else:
        if flat.size != len(head.classes):
            raise ModelError(f"{model_id}: head {head.name}: softmax reads one value per class "
                             f"({len(head.classes)}), the output has {flat.size}")
        exp = np.exp(flat - flat.max())
        probabilities = dict(zip(head.classes, (float(v) for v in exp / exp.sum()),
                                 strict=True))
        p = probabilities[head.positive]
    negative = next(name for name in head.classes if name != head.positive)
    return {"probability": round(p, 4), "threshold": head.threshold,
            "decision": head.positive if p >= head.threshold else negative,
            "probabilities": {name: round(v, 4) for name, v in probabilities.items()}}


def _shape(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} of shape {tuple(shape)}" if shape is not None \
        else type(value).__name__
