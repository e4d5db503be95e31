"""Header-only MR series in the conventions of three vendors, for the selection tests.

A series is built as pydicom Datasets (no pixels) the way Siemens, GE and Philips scanners
write them: Siemens puts ``FS`` in ScanOptions and a ``*tse2d1_..`` SequenceName; GE writes
``FAST_GEMS``, the spatial saturation ``SAT_GEMS`` and readout-direction ``FS?_GEMS`` terms
beside ``FS``; Philips writes Enhanced MR multi-frame objects whose fat suppression is
SpectrallySelectedSuppression, or classic images with ``SPAIR``/``SPIR`` in the names.
Descriptions are empty unless a test sets one: features must not need them.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from aiworker.select.headers import SeriesHeaders, StudyHeaders

PLANES = {  # row direction, column direction (LPS)
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}
VENDORS = ("siemens", "ge", "philips")
_numbers = itertools.count(1)


@dataclass(frozen=True)
class Spec:
    """One series to build; the defaults make a sagittal PD fat-suppressed knee series."""

    vendor: str = "siemens"
    plane: str = "sagittal"
    rotation: tuple[tuple[float, ...], ...] | None = None  # 3x3, applied to the plane
    slices: int = 20
    rows: int = 256
    columns: int = 256
    pixel_spacing: float = 0.5
    thickness: float = 3.0
    spacing: float = 3.5
    te: float | None = 33.0
    tr: float | None = 3000.0
    ti: float | None = None
    inversion: bool = False
    gradient: bool = False
    flip: float = 150.0
    fat_sat: bool = True
    description: str = ""
    protocol: str = ""
    image_type: tuple[str, ...] | None = None
    enhanced: bool = False
    series_number: int | None = None
    acquisition_time: str = "101500"
    skip: tuple[int, ...] = ()  # slice indices left out (a missing slice)
    shift: dict[int, float] = field(default_factory=dict)  # slice index -> extra mm
    echoes: int = 1
    repeat_positions: bool = False  # every position twice, with nothing to tell them apart
    orientations: tuple[str, ...] = ()  # per-slice planes, cycled (a tri-planar localizer)
    extra: dict[str, Any] = field(default_factory=dict)


def sag_pd_fs(**changes: Any) -> Spec:
    return replace(Spec(), **changes)


def series(spec: Spec, study_uid: str = "1.2.3.4", frame_uid: str = "1.2.3.5") -> SeriesHeaders:
    """The headers of ``spec``, as :func:`aiworker.select.headers.read_series` gives them."""
    datasets = datasets_of(spec, study_uid, frame_uid)
    return SeriesHeaders(study_uid, str(datasets[0].SeriesInstanceUID), datasets[0], datasets)


def study(*specs: Spec, study_uid: str | None = None) -> StudyHeaders:
    study_uid = study_uid or generate_uid()
    return StudyHeaders(study_uid, [series(s, study_uid) for s in specs])


def datasets_of(spec: Spec, study_uid: str, frame_uid: str) -> list[Dataset]:
    number = spec.series_number if spec.series_number is not None else next(_numbers)
    series_uid = generate_uid()
    common = _series_attributes(spec, number, study_uid, series_uid, frame_uid)
    if spec.enhanced:
        return [_apply_extra(spec, _enhanced(spec, common))]
    found = []
    for k, (position, orientation, echo) in enumerate(_slices(spec)):
        ds = _copy(common)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(v, 4) for v in position]
        ds.ImageOrientationPatient = [round(v, 6) for v in orientation]
        ds.EchoNumbers = echo
        ds.EchoTime = spec.te if echo == 1 else spec.te * echo if spec.te else None
        ds.SliceThickness = spec.thickness
        ds.PixelSpacing = [spec.pixel_spacing, spec.pixel_spacing]
        ds.ImagesInAcquisition = spec.slices * spec.echoes
        _vendor_acquisition(spec, ds)
        found.append(_apply_extra(spec, ds))
    return found


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Save header-only Part 10 files (no Pixel Data) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        ds = _copy(ds)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def rotation(axis: tuple[float, float, float], degrees: float) -> tuple[tuple[float, ...], ...]:
    """The rotation by ``degrees`` about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(degrees)
    r = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    return tuple(tuple(float(v) for v in row) for row in r)


# --- internals ----------------------------------------------------------------------------


def _series_attributes(spec: Spec, number: int, study_uid: str, series_uid: str,
                       frame_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = "MR"
    ds.SeriesNumber = number
    ds.SeriesDescription = spec.description
    ds.ProtocolName = spec.protocol
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20260115"
    ds.SeriesTime = ds.AcquisitionTime = spec.acquisition_time
    ds.AcquisitionNumber = 1
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.BodyPartExamined = "KNEE"
    ds.MagneticFieldStrength = 3.0
    ds.ImageType = list(spec.image_type or _image_type(spec))
    return ds


def _apply_extra(spec: Spec, ds: Dataset) -> Dataset:
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    return ds


def _image_type(spec: Spec) -> tuple[str, ...]:
    return {"siemens": ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"),
            "ge": ("ORIGINAL", "PRIMARY", "OTHER"),
            "philips": ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")}[spec.vendor]


def _vendor_acquisition(spec: Spec, ds: Dataset) -> None:
    """ScanningSequence, ScanOptions and friends as each vendor writes them."""
    scanning = ["GR"] if spec.gradient else ["SE"]
    if spec.inversion:
        scanning.append("IR")
    ds.ScanningSequence = scanning
    ds.SequenceVariant = ["SK", "SP"] if spec.gradient else ["SK", "OSP"]
    ds.MRAcquisitionType = "2D"
    if spec.tr is not None:
        ds.RepetitionTime = spec.tr
    if spec.ti is not None:
        ds.InversionTime = spec.ti
    ds.FlipAngle = spec.flip
    ds.EchoTrainLength = 1 if spec.gradient else 9
    if spec.vendor == "siemens":
        ds.Manufacturer = "SIEMENS"
        ds.ScanOptions = ["PFP", "FS"] if spec.fat_sat else ["PFP"]
        ds.SequenceName = ("*fl2d1" if spec.gradient else "*tir2d1_9" if spec.inversion
                           else "*tse2d1_9")
    elif spec.vendor == "ge":
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        options = ["FAST_GEMS", "SAT_GEMS", "NPW", "TRF_GEMS", "FILTERED_GEMS", "FSA_GEMS"]
        ds.ScanOptions = options + (["FS"] if spec.fat_sat else [])
        ds.SequenceName = "fse-xl"
    else:
        ds.Manufacturer = "Philips Medical Systems"
        ds.ScanOptions = ["FS"] if spec.fat_sat else ["OTHER"]
    if spec.te is None:
        del ds.EchoTime


def _slices(spec: Spec) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(position, orientation, echo number) of every image, in acquisition order."""
    planes = spec.orientations or (spec.plane,)
    r = np.asarray(spec.rotation) if spec.rotation is not None else np.eye(3)
    images = []
    for k in range(spec.slices):
        if k in spec.skip:
            continue
        row, col = (r @ np.asarray(v) for v in PLANES[planes[k % len(planes)]])
        normal = np.cross(row, col)
        offset = (k - spec.slices / 2) * spec.spacing + spec.shift.get(k, 0.0)
        corner = np.array([-60.0, -80.0, 70.0])
        position = corner + offset * normal
        for echo in range(1, spec.echoes + 1):
            images.append((position, np.concatenate([row, col]), echo))
        if spec.repeat_positions:
            images.append((position, np.concatenate([row, col]), 1))
    return images


def _enhanced(spec: Spec, common: Dataset) -> Dataset:
    """One Enhanced MR Image object holding every slice as a frame (Philips style)."""
    ds = _copy(common)
    ds.Manufacturer = "Philips Medical Systems"
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    images = _slices(spec)
    ds.NumberOfFrames = len(images)
    ds.AcquisitionContrast = "PROTON_DENSITY"
    ds.SpectrallySelectedSuppression = "FAT" if spec.fat_sat else "NONE"
    ds.EchoPulseSequence = "GRADIENT" if spec.gradient else "SPIN"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([_item(
        PixelSpacing=[spec.pixel_spacing, spec.pixel_spacing], SliceThickness=spec.thickness)])
    shared.PlaneOrientationSequence = Sequence([_item(
        ImageOrientationPatient=[round(v, 6) for v in images[0][1]])])
    timing = _item(FlipAngle=spec.flip)
    if spec.tr is not None:
        timing.RepetitionTime = spec.tr
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.MRModifierSequence = Sequence([_item(
        InversionRecovery="YES" if spec.inversion else "NO")])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k, (position, _orientation, echo) in enumerate(images):
        item = Dataset()
        item.PlanePositionSequence = Sequence([_item(
            ImagePositionPatient=[round(v, 4) for v in position])])
        item.FrameContentSequence = Sequence([_item(StackID="1", InStackPositionNumber=k + 1)])
        if spec.te is not None:
            item.MREchoSequence = Sequence([_item(EffectiveEchoTime=spec.te * echo)])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    return ds


def _item(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _copy(ds: Dataset) -> Dataset:
    return copy.deepcopy(ds)
