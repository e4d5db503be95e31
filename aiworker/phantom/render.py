"""MR images of a drawn knee (:class:`aiworker.phantom.anatomy.KneeVolume`).

Each tissue has a relative signal per sequence (fluid bright and fat dark with fat
saturation or STIR, fatty marrow bright on T1 and PD, ligaments, tendons, menisci and cortex
dark on all, cartilage intermediate). A series is rendered by averaging that signal over
each slice's thickness (partial volume; nothing of the gap between slices is seen),
sampling it with trilinear interpolation, scaling it by a smooth receive-coil bias field,
and adding Rician noise: the magnitude of the signal plus complex Gaussian noise.

Beyond the top and bottom of the tissue grid the leg goes on unchanged (its end slices
repeat), so a large field of view such as a localizer's shows no cut; around the leg is air.

Pixels finer than the tissue grid add no detail, so a series is sampled at about the grid's
spacing on pixel centres (every f-th row and column) and interpolated linearly to the full
matrix; the noise is added per pixel of the full matrix.

``snr`` is ``SIGNAL_SCALE / sigma``: the signal of the sequence's brightest tissue (fluid on
PD_FS, T2_FS and STIR, fat on PD and T1) before bias, over the standard deviation of the
noise in each of the real and imaginary channels. Air therefore reads about
``1.25 * sigma`` with a standard deviation of about ``0.66 * sigma`` (Rayleigh).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from aiworker.phantom.anatomy import ACL_STUMP, CORTEX, LABELS, TISSUE_LABEL, KneeVolume
from aiworker.phantom.geometry import SliceGeometry

SEQUENCES = ("PD_FS", "PD", "T1", "T2_FS", "STIR")
SIGNAL_SCALE = 2000.0  # pixel value of relative signal 1, before bias and noise
MAX_PIXEL = 4095  # 12-bit pixel data

# Relative signal of each kind of tissue per sequence, in _KINDS order.
# The ACL is a little brighter than the other ligaments, as its looser fibres are on MR.
_KINDS = ("fluid", "fat", "marrow", "cortex", "cartilage", "meniscus", "ligament", "acl",
          "stump", "muscle", "skin", "edema", "vessel")
_SIGNAL: dict[str, tuple[float, ...]] = {
    "PD_FS": (1.00, 0.17, 0.15, 0.02, 0.50, 0.04, 0.05, 0.10, 0.60, 0.32, 0.38, 0.70, 0.05),
    "PD": (0.72, 1.00, 0.88, 0.03, 0.60, 0.05, 0.08, 0.14, 0.62, 0.42, 0.55, 0.72, 0.05),
    "T1": (0.25, 1.00, 0.92, 0.03, 0.45, 0.05, 0.08, 0.14, 0.35, 0.38, 0.50, 0.30, 0.05),
    "T2_FS": (1.00, 0.12, 0.11, 0.02, 0.32, 0.03, 0.04, 0.08, 0.55, 0.22, 0.27, 0.72, 0.05),
    "STIR": (1.00, 0.08, 0.08, 0.02, 0.40, 0.03, 0.04, 0.08, 0.60, 0.27, 0.32, 0.80, 0.04),
}

_KIND_OF_LABEL: dict[str, str] = {
    "background": "air", "femur": "marrow", "tibia": "marrow", "patella": "marrow",
    "fibula": "marrow", "femoral_cartilage": "cartilage", "tibial_cartilage": "cartilage",
    "patellar_cartilage": "cartilage", "medial_meniscus": "meniscus",
    "lateral_meniscus": "meniscus", "acl": "acl", "pcl": "ligament",
    "joint_fluid": "fluid", "hoffa_fat_pad": "fat", "subcutaneous_fat": "fat",
    "muscle": "muscle", "skin": "skin", "bone_marrow_edema": "edema",
    "patellar_tendon": "ligament", "quadriceps_tendon": "ligament", "mcl": "ligament",
    "lcl": "ligament", "deep_fat": "fat", "popliteal_vessels": "vessel",
}


def tissue_signal(sequence: str) -> np.ndarray:
    """Relative signal (float32, indexed by tissue value) of every tissue on ``sequence``."""
    if sequence not in _SIGNAL:
        raise ValueError(f"sequence must be one of {SEQUENCES}, not {sequence!r}")
    contrast = {"air": 0.0, **dict(zip(_KINDS, _SIGNAL[sequence], strict=True))}
    table = np.zeros(256, np.float32)
    for value, name in LABELS.items():
        table[value] = contrast[_KIND_OF_LABEL[name]]
    for value in CORTEX.values():
        table[value] = contrast["cortex"]
    table[ACL_STUMP] = contrast["stump"]
    return table


def render_series(volume: KneeVolume, geometry: SliceGeometry, sequence: str, snr: float,
                  rng: np.random.Generator, table: np.ndarray | None = None) -> np.ndarray:
    """Pixel data (slices, rows, columns), uint16 in 0..4095, of one stack of slices.

    ``table`` (256 relative signals indexed by tissue value, brightest about 1) replaces
    ``sequence``'s tissue table: a contrast no scanner makes, for domain-randomised
    training."""
    if snr <= 0:
        raise ValueError(f"snr must be positive, not {snr}")
    if table is None:
        table = tissue_signal(sequence)
    elif table.shape != (256,):
        raise ValueError(f"table must hold 256 signals, not {table.shape}")
    step = _sampling_steps(volume, geometry)
    coarse = _slab_average(np.asarray(table, np.float32)[volume.tissue], volume, geometry,
                           step)
    coarse *= _bias_field(volume, geometry, step, rng)
    image = _upsample(coarse, step, (geometry.rows, geometry.columns))
    image *= np.float32(SIGNAL_SCALE)
    return _rician(image, SIGNAL_SCALE / snr, rng)


def label_series(volume: KneeVolume, geometry: SliceGeometry) -> np.ndarray:
    """Label (uint8, see anatomy.LABELS) of the voxel nearest each pixel centre:
    (slices, rows, columns)."""
    matrix, offset = _grid_map(volume, geometry, (1, 1))
    tissue = ndimage.affine_transform(
        volume.tissue, matrix, offset, output_shape=(geometry.slices, geometry.rows,
                                                     geometry.columns),
        order=0, mode="nearest", prefilter=False)
    return TISSUE_LABEL[tissue]


def _sampling_steps(volume: KneeVolume, geometry: SliceGeometry) -> tuple[int, int]:
    """Sample every (f_rows, f_columns)-th pixel: about the grid's spacing, never coarser."""
    return (max(1, math.floor(volume.spacing / geometry.row_spacing + 0.25)),
            max(1, math.floor(volume.spacing / geometry.column_spacing + 0.25)))


def _coarse_shape(geometry: SliceGeometry, step: tuple[int, int]) -> tuple[int, int, int]:
    rows = -(-(geometry.rows - 1) // step[0]) + 1
    columns = -(-(geometry.columns - 1) // step[1]) + 1
    return geometry.slices, rows, columns


def _grid_map(volume: KneeVolume, geometry: SliceGeometry,
              step: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Affine map from (slice, coarse row, coarse column) to the tissue grid's (k, j, i)."""
    to_ijk = volume.axes.T / volume.spacing
    steps = np.column_stack([geometry.normal * geometry.spacing_between_slices,
                             np.asarray(geometry.col_dir) * geometry.row_spacing * step[0],
                             np.asarray(geometry.row_dir) * geometry.column_spacing * step[1]])
    first = geometry.position(0) - volume.origin
    return (to_ijk @ steps)[::-1], (to_ijk @ first)[::-1]


def _slab_average(signal: np.ndarray, volume: KneeVolume, geometry: SliceGeometry,
                  step: tuple[int, int]) -> np.ndarray:
    """Mean signal over each slice's thickness at the coarse pixel centres.

    The signal is first averaged along the grid axis nearest the slice normal over the
    slice thickness (a box filter: one pass, then one trilinear sample per pixel), so
    every pixel sees its slab and nothing of the gap; a normal tilted from that axis only
    shears the slab a little, by half the thickness times the tilt's tangent."""
    along = volume.axes.T @ geometry.normal  # the normal's components along i, j, k
    axis = int(np.argmax(np.abs(along)))
    voxels = geometry.slice_thickness / abs(along[axis]) / volume.spacing
    size = 2 * round((voxels - 1.0) / 2.0) + 1  # odd, so the box stays centred
    if size > 1:
        signal = ndimage.uniform_filter1d(signal, size, axis=2 - axis, mode="nearest")
    matrix, offset = _grid_map(volume, geometry, step)
    return ndimage.affine_transform(signal, matrix, offset,
                                    output_shape=_coarse_shape(geometry, step), order=1,
                                    mode="nearest", prefilter=False)


def _bias_field(volume: KneeVolume, geometry: SliceGeometry, step: tuple[int, int],
                rng: np.random.Generator) -> np.ndarray:
    """A smooth receive-coil sensitivity at the coarse pixel centres: a random gradient
    and a rise toward the edges, about 1 at the knee's centre."""
    gradient = rng.normal(0.0, 0.12, 3)
    rise = rng.uniform(0.0, 0.25)
    slices, rows, columns = _coarse_shape(geometry, step)
    s = np.arange(slices, dtype=np.float32)[:, None, None]
    r = np.arange(rows, dtype=np.float32)[None, :, None]
    c = np.arange(columns, dtype=np.float32)[None, None, :]
    first = geometry.position(0) - volume.centre
    along_slice = geometry.normal * geometry.spacing_between_slices
    along_row = np.asarray(geometry.col_dir) * geometry.row_spacing * step[0]
    along_column = np.asarray(geometry.row_dir) * geometry.column_spacing * step[1]
    exponent = np.zeros((slices, rows, columns), np.float32)
    for axis in range(3):
        offset = (np.float32(first[axis] / 100.0) + s * np.float32(along_slice[axis] / 100.0)
                  + r * np.float32(along_row[axis] / 100.0)
                  + c * np.float32(along_column[axis] / 100.0))
        exponent += np.float32(gradient[axis]) * offset + np.float32(rise) * offset * offset
    return np.exp(exponent)


def _upsample(coarse: np.ndarray, step: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Linear interpolation from every step-th pixel centre to all ``size`` of them."""
    image = coarse
    for axis, (factor, count) in zip((1, 2), zip(step, size, strict=True), strict=True):
        fine = np.arange(count)
        below = fine // factor
        above = np.minimum(below + 1, image.shape[axis] - 1)
        weight = ((fine % factor) / factor).astype(np.float32)
        weight = weight[:, None] if axis == 1 else weight
        low = np.take(image, below, axis=axis)
        image = low + (np.take(image, above, axis=axis) - low) * weight
    return image


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise, rounded and clipped to 12 bits."""
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += signal
    imaginary = rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary *= np.float32(sigma)
    magnitude = np.hypot(real, imaginary, out=real)
    np.rint(magnitude, out=magnitude)
    np.clip(magnitude, 0, MAX_PIXEL, out=magnitude)
    return magnitude.astype(np.uint16)
