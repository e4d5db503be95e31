"""A selected series as a SimpleITK volume, and labels back onto that series' slices.

:func:`load_series` reads every instance of one series with pydicom (compressed transfer
syntaxes decode through the pylibjpeg, openjpeg and pyjpegls plugins), takes each image
plane (one per classic MR instance, one per frame of an Enhanced MR instance, whose
geometry and rescale live in the per-frame or shared functional groups), checks that the
planes form one clean stack, sorts them along the slice normal and applies the rescale
slope and intercept. The image's geometry comes from the headers, so that SimpleITK's
physical point of voxel (i, j, k) is the centre of column i, row j of slice k in DICOM
patient coordinates (LPS, mm):

* origin = ImagePositionPatient of the first slice along the normal;
* spacing = (column spacing, row spacing, step between slice positions along the normal),
  the step measured from ImagePositionPatient, never taken from SliceThickness;
* direction columns = row direction cosine, column direction cosine, slice normal
  (their cross product).

:class:`LoadedSeries` keeps, for each slice index k, the SOP Instance UID (and, for
Enhanced MR, the 1-based frame number) it came from, so a SEG frame can reference slice k
exactly. :func:`labels_to_series` resamples a label image of any geometry onto those
slices by nearest neighbour.

Whatever keeps the planes from being one volume (a missing position or orientation, slices
that are not parallel, a gap or uneven spacing, mixed image sizes, two slices at one
position, pixels that cannot be decoded) raises :class:`VolumeError` with a one-line
message naming the problem; messages carry UIDs and counts, never patient data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

PARALLEL_DEGREES = 0.25  # planes whose direction cosines differ by more are not one stack
SAME_POSITION_MM = 0.01  # planes closer than this along the normal share a position
STEP_TOLERANCE = 0.02  # a step may differ from the usual one by this fraction of it
SHEAR_PIXELS = 0.1  # a slice may sit off the stack's axis by this fraction of a pixel
ONE_SLICE_STEP_MM = 1.0  # the z spacing of a one-slice volume, which has no step to measure


class VolumeError(Exception):
    """The series cannot be read as one volume; the message says why, in one line.

    ``kind`` is ``"data"``: the input is at fault, so retrying the same files cannot help.
    """

    kind = "data"


@dataclass
class LoadedSeries:
    """One series as a volume, with the source of each slice.

    ``image`` holds float32 values after RescaleSlope/RescaleIntercept, indexed (column,
    row, slice) in SimpleITK terms, (slice, row, column) as a numpy array.
    ``sop_instance_uids[k]`` is the instance slice k came from and ``frame_numbers[k]`` its
    1-based frame in that instance (``None`` when every instance is single-frame).
    """

    image: sitk.Image
    sop_instance_uids: list[str]
    frame_numbers: list[int] | None
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str

    @property
    def slices(self) -> int:
        return self.image.GetSize()[2]

    def array(self) -> np.ndarray:
        """The voxels as (slices, rows, columns), a copy."""
        return sitk.GetArrayFromImage(self.image)


@dataclass(frozen=True)
class _Plane:
    """One image plane of the series: its source, geometry and rescale."""

    source: int  # index of its dataset
    frame: int  # 0-based frame within that dataset
    sop_uid: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing)
    shape: tuple[int, int]
    slope: float
    intercept: float

    def name(self, multiframe: bool) -> str:
        return f"{self.sop_uid} frame {self.frame + 1}" if multiframe else self.sop_uid


@dataclass(frozen=True)
class _Stack:
    """Checked planes in order along the normal, and the volume's geometry."""

    planes: list[_Plane]
    origin: np.ndarray
    direction: np.ndarray  # 3 x 3, columns = row dir, column dir, normal
    spacing: tuple[float, float, float]


def load_series(paths: Sequence[Path | str]) -> LoadedSeries:
    """Read the files of one series as a volume; raise :class:`VolumeError` if they are not
    one clean stack of parallel, evenly spaced slices."""
    datasets = [_read(Path(path)) for path in paths]
    if not datasets:
        raise VolumeError("no images to load")
    series_uid = _one_value(datasets, "SeriesInstanceUID")
    planes = [plane for index, ds in enumerate(datasets) for plane in _planes(index, ds)]
    multiframe = any(_is_multiframe(ds) for ds in datasets)
    stack = _stack(planes, multiframe)
    image = sitk.GetImageFromArray(_voxels(datasets, stack.planes, multiframe))
    image.SetOrigin([float(v) for v in stack.origin])
    image.SetSpacing(stack.spacing)
    image.SetDirection([float(v) for v in stack.direction.ravel()])
    return LoadedSeries(
        image=image,
        sop_instance_uids=[plane.sop_uid for plane in stack.planes],
        frame_numbers=[plane.frame + 1 for plane in stack.planes] if multiframe else None,
        series_uid=series_uid,
        study_uid=_one_value(datasets, "StudyInstanceUID"),
        frame_of_reference_uid=_one_value(datasets, "FrameOfReferenceUID"),
        sop_class_uid=str(datasets[0].get("SOPClassUID", "")),
    )


def labels_to_series(label_image: sitk.Image, reference: LoadedSeries) -> np.ndarray:
    """``label_image`` (any geometry) sampled by nearest neighbour at every voxel centre of
    ``reference``: (slices, rows, columns), slice k belonging to
    ``reference.sop_instance_uids[k]``; points outside ``label_image`` get 0."""
    resampled = sitk.Resample(label_image, reference.image, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, label_image.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


# --- reading ------------------------------------------------------------------------------


def _read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, KeyError) as exc:
        raise VolumeError(f"file {path.name} is not readable as DICOM "
                          f"({type(exc).__name__})") from exc
    if "PixelData" not in ds:
        raise VolumeError(f"instance {ds.get('SOPInstanceUID', path.name)} has no pixel data")
    return ds


def _one_value(datasets: Sequence[Dataset], keyword: str) -> str:
    """The value of ``keyword`` that every dataset shares ("" when none has it)."""
    values = sorted({str(ds.get(keyword, "")) for ds in datasets})
    if len(values) > 1:
        raise VolumeError(f"the images do not share one {keyword}: {len(values)} values")
    return values[0]


def _is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1


def _planes(index: int, ds: Dataset) -> list[_Plane]:
    """The image planes of one instance: one per frame."""
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    shape = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"instance {sop_uid} is not grayscale "
                          f"(SamplesPerPixel {ds.SamplesPerPixel})")
    if not _is_multiframe(ds):
        return [_Plane(index, 0, sop_uid, _floats(ds, "ImagePositionPatient", 3),
                       _floats(ds, "ImageOrientationPatient", 6), _pixel_spacing(ds), shape,
                       *_rescale(ds))]
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, frames):
        raise VolumeError(f"instance {sop_uid} has {frames} frames but {len(per_frame)} "
                          "per-frame functional groups")
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    planes = []
    for frame in range(frames):
        groups = (per_frame[frame] if per_frame else Dataset(), shared)
        position = _group_item(groups, "PlanePositionSequence")
        orientation = _group_item(groups, "PlaneOrientationSequence")
        measures = _group_item(groups, "PixelMeasuresSequence")
        transform = _group_item(groups, "PixelValueTransformationSequence") or ds
        planes.append(_Plane(index, frame, sop_uid,
                             _floats(position, "ImagePositionPatient", 3),
                             _floats(orientation, "ImageOrientationPatient", 6),
                             _pixel_spacing(measures), shape, *_rescale(transform)))
    return planes


def _group_item(groups: tuple[Dataset, Dataset], keyword: str) -> Dataset:
    """The item of functional group ``keyword``: per frame if there, else shared, else an
    empty data set."""
    for group in groups:
        sequence = group.get(keyword)
        if sequence:
            return sequence[0]
    return Dataset()


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray | None:
    value = ds.get(keyword)
    try:
        floats = np.array([float(v) for v in value], dtype=np.float64) if value else None
    except (TypeError, ValueError):
        return None
    return floats if floats is not None and len(floats) == count else None


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    spacing = _floats(ds, "PixelSpacing", 2)
    if spacing is None or np.any(spacing <= 0):
        return None
    return float(spacing[0]), float(spacing[1])


def _rescale(ds: Dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), 1 and 0 when absent."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (1.0 if slope in (None, "") else float(slope),
            0.0 if intercept in (None, "") else float(intercept))


# --- geometry -----------------------------------------------------------------------------


def _stack(planes: list[_Plane], multiframe: bool) -> _Stack:
    """Check that ``planes`` form one clean stack and return it, sorted along the normal."""
    first = planes[0]
    for plane in planes:
        missing = [keyword for keyword, value in (
            ("ImagePositionPatient", plane.position),
            ("ImageOrientationPatient", plane.orientation),
            ("PixelSpacing", plane.pixel_spacing)) if value is None]
        if missing:
            raise VolumeError(f"image {plane.name(multiframe)} lacks a valid "
                              f"{' and '.join(missing)}")
    _check_same_images(planes)
    direction = _direction(first)
    _check_parallel(planes, direction, multiframe)
    normal = direction[:, 2]
    distances = np.array([float(np.dot(plane.position, normal)) for plane in planes])
    order = np.argsort(distances, kind="stable")
    ordered = [planes[i] for i in order]
    distances = distances[order]
    step = _uniform_step(distances, ordered, multiframe)
    _check_on_axis(ordered, normal)
    row_spacing, column_spacing = first.pixel_spacing
    return _Stack(ordered, ordered[0].position, direction,
                  (column_spacing, row_spacing, ONE_SLICE_STEP_MM if step is None else step))


def _check_same_images(planes: list[_Plane]) -> None:
    sizes = sorted({plane.shape for plane in planes})
    if len(sizes) > 1 or 0 in sizes[0]:
        raise VolumeError("image size varies: " + ", ".join(f"{r}x{c}" for r, c in sizes))
    spacings = sorted({tuple(round(v, 4) for v in plane.pixel_spacing) for plane in planes})
    if len(spacings) > 1:
        raise VolumeError("pixel spacing varies: "
                          + ", ".join("\\".join(f"{v:g}" for v in s) for s in spacings))


def _direction(plane: _Plane) -> np.ndarray:
    """Orthonormal 3 x 3 matrix whose columns are the row direction, the column direction
    and the slice normal of ``plane``."""
    row, column = plane.orientation[:3], plane.orientation[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(column) < 1e-6:
        raise VolumeError(f"image {plane.sop_uid} has a degenerate ImageOrientationPatient")
    row = row / np.linalg.norm(row)
    column = column - np.dot(column, row) * row
    if np.linalg.norm(column) < 1e-3:
        raise VolumeError(f"image {plane.sop_uid} has a degenerate ImageOrientationPatient")
    column = column / np.linalg.norm(column)
    return np.column_stack([row, column, np.cross(row, column)])


def _check_parallel(planes: list[_Plane], direction: np.ndarray, multiframe: bool) -> None:
    """Every plane's row and column directions match the first's."""
    worst, which = 0.0, planes[0]
    for plane in planes:
        angle = max(_angle(plane.orientation[:3], direction[:, 0]),
                    _angle(plane.orientation[3:], direction[:, 1]))
        if angle > worst:
            worst, which = angle, plane
    if worst > PARALLEL_DEGREES:
        raise VolumeError(f"slices not parallel: image {which.name(multiframe)} is turned "
                          f"{worst:.1f}° from the first")


def _angle(vector: np.ndarray, unit: np.ndarray) -> float:
    cosine = float(np.dot(vector, unit)) / max(float(np.linalg.norm(vector)), 1e-12)
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def _uniform_step(distances: np.ndarray, ordered: list[_Plane], multiframe: bool
                  ) -> float | None:
    """The step between neighbouring slices along the normal (None for one slice), after
    checking there are no duplicates, gaps or uneven steps."""
    steps = np.diff(distances)
    if len(steps) == 0:
        return None
    count = len(distances)
    duplicates = np.flatnonzero(steps < SAME_POSITION_MM)
    if len(duplicates):
        k = int(duplicates[0])
        raise VolumeError(f"duplicate positions: images {ordered[k].name(multiframe)} and "
                          f"{ordered[k + 1].name(multiframe)} lie at the same position")
    usual = float(np.median(steps))
    allowed = max(SAME_POSITION_MM, STEP_TOLERANCE * usual)
    for k, step in enumerate(steps):
        if abs(step - usual) <= allowed:
            continue
        missing = round(step / usual) - 1
        if missing >= 1 and abs(step - (missing + 1) * usual) <= allowed * (missing + 1):
            what = "missing slice" if missing == 1 else f"{missing} missing slices"
            raise VolumeError(f"{what}: gap of {step:.2f} mm after slice {k + 1} of {count} "
                              f"(spacing {usual:.2f} mm)")
        raise VolumeError(f"non-uniform spacing: step of {step:.2f} mm after slice {k + 1} "
                          f"of {count} (spacing {usual:.2f} mm)")
    return float((distances[-1] - distances[0]) / (count - 1))


def _check_on_axis(ordered: list[_Plane], normal: np.ndarray) -> None:
    """Every slice lies on the line through the first along the normal (no shear)."""
    origin = ordered[0].position
    offsets = [np.linalg.norm((p.position - origin) - np.dot(p.position - origin, normal)
                              * normal) for p in ordered]
    worst = float(max(offsets))
    if worst > SHEAR_PIXELS * min(ordered[0].pixel_spacing):
        raise VolumeError(f"slices not stacked along their normal: one is shifted {worst:.2f} "
                          "mm sideways (sheared or tilted-gantry stack)")


# --- pixels -------------------------------------------------------------------------------


def _voxels(datasets: list[Dataset], ordered: list[_Plane], multiframe: bool) -> np.ndarray:
    """(slices, rows, columns) float32 values after rescale, in ``ordered`` order."""
    frames = [_decoded(ds) for ds in datasets]
    rows, columns = ordered[0].shape
    volume = np.empty((len(ordered), rows, columns), dtype=np.float32)
    for k, plane in enumerate(ordered):
        frame = frames[plane.source]
        if plane.frame >= len(frame) or frame.shape[1:] != (rows, columns):
            raise VolumeError(f"pixel data of image {plane.name(multiframe)} does not match "
                              f"its {rows}x{columns} header")
        volume[k] = frame[plane.frame]
        if plane.slope != 1.0 or plane.intercept != 0.0:
            volume[k] = volume[k] * np.float32(plane.slope) + np.float32(plane.intercept)
    return volume


def _decoded(ds: Dataset) -> np.ndarray:
    """The stored values of every frame of ``ds``: (frames, rows, columns)."""
    try:
        pixels: Any = ds.pixel_array
    except Exception as exc:  # decoder plugins raise many types; all mean the same here
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise VolumeError(f"pixel data of instance {ds.get('SOPInstanceUID', '?')} cannot be "
                          f"decoded ({name}): {detail}") from exc
    return pixels.reshape(-1, *pixels.shape[-2:])
