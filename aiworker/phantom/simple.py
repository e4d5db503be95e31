"""A small generator of multi-series MR studies with correct geometry, for tests and benchmarks.

Each series is a stack of single-frame MR Image Storage instances in one plane (sagittal,
coronal or axial) sharing one Frame of Reference; ImagePositionPatient steps along the
slice normal by SpacingBetweenSlices. The pixels are a smooth pattern that differs per
slice, so a test can tell slices apart. The full synthetic knee generator replaces this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

PLANES = {
    "sagittal": ([0.0, 1.0, 0.0, 0.0, 0.0, -1.0], [1.0, 0.0, 0.0]),
    "coronal": ([1.0, 0.0, 0.0, 0.0, 0.0, -1.0], [0.0, 1.0, 0.0]),
    "axial": ([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0]),
}


@dataclass(frozen=True)
class SeriesSpec:
    plane: str = "sagittal"
    slices: int = 20
    rows: int = 128
    columns: int = 128
    description: str = "PD FS SAG"


DEFAULT_SERIES = (
    SeriesSpec("sagittal", description="PD FS SAG"),
    SeriesSpec("coronal", description="PD FS COR"),
    SeriesSpec("axial", description="T2 FS AX"),
)


def write_study(
    out_dir: Path,
    series: tuple[SeriesSpec, ...] = DEFAULT_SERIES,
    seed: int = 0,
    patient_name: str = "PHANTOM^KNEE",
    images_in_acquisition: bool = True,
) -> list[Path]:
    """Write one study under ``out_dir/<series number>/``; return the file paths in order."""
    rng = np.random.default_rng(seed)
    study_uid = generate_uid(entropy_srcs=[f"study-{seed}"])
    frame_uid = generate_uid(entropy_srcs=[f"frame-{seed}"])
    paths = []
    for number, spec in enumerate(series, start=1):
        series_uid = generate_uid(entropy_srcs=[f"series-{seed}-{number}"])
        folder = Path(out_dir) / f"{number:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(spec.slices):
            ds = _instance(spec, index, number, study_uid, series_uid, frame_uid, seed,
                           patient_name, images_in_acquisition)
            ds.PixelData = slice_pixels(spec, index, rng).tobytes()
            path = folder / f"{index + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def slice_pixels(spec: SeriesSpec, index: int, rng: np.random.Generator) -> np.ndarray:
    """A 16-bit slice: a smooth ramp that depends on the slice index, plus a little noise."""
    y, x = np.mgrid[0 : spec.rows, 0 : spec.columns]
    ramp = (x * 7 + y * 3 + index * 211) % 2048
    noise = rng.integers(0, 64, size=(spec.rows, spec.columns))
    return (ramp + noise).astype(np.uint16)


def _instance(spec: SeriesSpec, index: int, number: int, study_uid: str, series_uid: str,
              frame_uid: str, seed: int, patient_name: str, images_in_acquisition: bool) -> Dataset:
    orientation, normal = PLANES[spec.plane]
    spacing = 3.0
    start = -spacing * (spec.slices - 1) / 2
    offset = start + index * spacing
    corner = [-spec.columns * 0.25, -spec.rows * 0.25, spec.rows * 0.25]
    position = [c + offset * n for c, n in zip(corner, normal, strict=True)]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    sop_uid = generate_uid(entropy_srcs=[f"sop-{seed}-{number}-{index}"])
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientName = patient_name
    ds.PatientID = f"PH{seed:06d}"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = f"ACC{seed:06d}"
    ds.StudyID = "1"
    ds.StudyDescription = "MR KNEE"
    ds.Modality = "MR"
    ds.Manufacturer = "aiworker phantom"
    ds.SeriesNumber = number
    ds.SeriesDescription = spec.description
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    if images_in_acquisition:
        ds.ImagesInAcquisition = spec.slices
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.ImageOrientationPatient = orientation
    ds.ImagePositionPatient = [round(v, 4) for v in position]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = spacing
    ds.SpacingBetweenSlices = spacing
    ds.SliceLocation = round(offset, 4)
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds

