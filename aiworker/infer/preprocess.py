"""From source volumes to the tensor a model reads, and from its labels back to model space.

The manifest's ``input`` section says how: turn each volume to the model's orientation
(SimpleITK ``DICOMOrient``: a permutation and flip of axes, no interpolation), resample it
(linear) onto one grid of the target spacing, crop or pad that grid to the target size about
the volume's centre, and normalize the intensities. Training and inference both call
:func:`model_input`, so a model always sees what it was trained on.

The grid is a SimpleITK image (``reference``) that keeps origin, spacing and direction, so the
model's label map can be put back on the source slices by physical position
(:func:`aiworker.infer.volume.labels_to_series`). Arrays here are (channel, x, y, z): the
manifest's axis order, which is also the order of the sliding-window ROI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from aiworker.infer.manifest_sections import Input, Normalization


@dataclass
class ModelInput:
    """The model's input array (channels, x, y, z), float32, and the grid it lies on."""

    array: np.ndarray
    reference: sitk.Image


def model_input(images: list[sitk.Image], spec: Input) -> ModelInput:
    """Orient, resample, crop/pad and normalize ``images`` (one per input channel, in
    channel order); the first image defines the grid."""
    if len(images) != len(spec.channels):
        raise ValueError(f"the model reads {len(spec.channels)} channel(s), "
                         f"got {len(images)} volume(s)")
    reference = model_grid(images[0], spec)
    channels = [normalize(_as_xyz(resample(image, reference, sitk.sitkLinear)),
                          spec.normalization) for image in images]
    return ModelInput(np.stack(channels).astype(np.float32, copy=False), reference)


def model_grid(image: sitk.Image, spec: Input) -> sitk.Image:
    """An empty image holding the model's grid for ``image``: its orientation, target
    spacing (or its own) and target size (or the size that covers it), centred on it."""
    oriented = image if spec.orientation == "as-acquired" else _oriented_geometry(image, spec)
    spacing = np.array(spec.spacing_mm or oriented.GetSpacing(), dtype=float)
    extent = np.array(oriented.GetSize()) * np.array(oriented.GetSpacing())
    size = (np.array(spec.size) if spec.size
            else np.maximum(1, np.ceil(extent / spacing - 1e-6)).astype(int))
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    centre = np.array(oriented.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in oriented.GetSize()]))
    origin = centre - direction @ ((size - 1) / 2 * spacing)
    grid = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in spacing])
    grid.SetDirection([float(v) for v in direction.ravel()])
    grid.SetOrigin([float(v) for v in origin])
    return grid


def _oriented_geometry(image: sitk.Image, spec: Input) -> sitk.Image:
    """A one-voxel-deep stand-in with ``image``'s geometry turned to ``spec.orientation``
    (DICOMOrient permutes and flips axes; only the geometry is needed)."""
    shell = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    shell.CopyInformation(image)
    return sitk.DICOMOrient(shell, spec.orientation)


def resample(image: sitk.Image, reference: sitk.Image, interpolator: int,
             default: float = 0.0) -> sitk.Image:
    """``image`` sampled on ``reference``'s grid (float32 for linear, same type otherwise)."""
    pixel = sitk.sitkFloat32 if interpolator == sitk.sitkLinear else image.GetPixelID()
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, pixel)


def normalize(array: np.ndarray, spec: Normalization) -> np.ndarray:
    """Intensities as the model was trained on them (see :class:`Normalization`)."""
    array = array.astype(np.float32, copy=False)
    if spec.method == "zscore":
        return (array - array.mean()) / max(float(array.std()), 1e-6)
    if spec.method == "percentile":
        low, high = np.percentile(array, [spec.lower, spec.upper])
        return np.clip((array - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    return array


def labels_image(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A (x, y, z) label array as a uint8 image on ``reference``'s grid."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0),
                                                        dtype=np.uint8))
    image.CopyInformation(reference)
    return image


def _as_xyz(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def voxel_ml(image: sitk.Image) -> float:
    """The volume of one voxel of ``image`` in millilitres."""
    return math.prod(image.GetSpacing()) / 1000.0
