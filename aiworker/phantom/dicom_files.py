"""The DICOM files of one phantom series: what its instances carry, and how they are saved.

:mod:`aiworker.phantom.study` draws a study and renders its series; this module turns one
rendered series into Part 10 files: the attributes every instance shares (patient, study,
series, equipment, pixel description), the MR technique of a classic series, each slice's
own geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceLocation,
all from the :class:`~aiworker.phantom.geometry.SliceGeometry` the renderer sampled), one
Enhanced MR instance in place of the slices when asked, and the pixels encoded in the
chosen transfer syntax.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

from aiworker.phantom.enhanced import enhanced_instance
from aiworker.phantom.geometry import SliceGeometry
from aiworker.phantom.protocol import SeriesPlan
from aiworker.phantom.vendors import SequenceHeader

if TYPE_CHECKING:
    from aiworker.phantom.study import Identity, StudyOptions, WrittenSeries, WrittenStudy

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
}
DERIVED_IMAGE_TYPE = ["DERIVED", "SECONDARY", "MPR"]


def write_series_files(study: WrittenStudy, identity: Identity, written: WrittenSeries,
                       header: SequenceHeader, pixels: np.ndarray) -> list[Path]:
    """Write the instances of ``written`` (its ``pixels``: images, rows, columns) into the
    study's folder for its series number; the paths, in instance order."""
    options, series, stacks, number = study.options, written.plan, written.stacks, written.number
    shared = _shared(study, identity, written, header, pixels)
    folder = study.dicom_dir / f"{number:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    if options.enhanced:
        sop_uid = identity.uid("sop", number, 1)
        ds = enhanced_instance(shared, header, series, stacks, sop_uid, study.plan.scanner,
                               _acquired(identity, series), study.case.side)
        return [_save(ds, pixels, folder / "0001.dcm", options)]
    template = _dataset({**shared, **_classic_technique(header, series, study, len(pixels))})
    files = []
    for index, (geometry, k) in enumerate(_slices(stacks)):
        ds = _classic_instance(template, geometry, k, index,
                               identity.uid("sop", number, index + 1))
        files.append(_save(ds, pixels[index], folder / f"{index + 1:04d}.dcm", options))
    return files


def _slices(stacks: list[SliceGeometry]) -> list[tuple[SliceGeometry, int]]:
    """(stack, slice index) of every image, in instance order."""
    return [(g, k) for g in stacks for k in range(g.slices)]


def _acquired(identity: Identity, series: SeriesPlan) -> datetime:
    return identity.start + timedelta(seconds=series.start_s)


def _da(when: datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: datetime) -> str:
    return when.strftime("%H%M%S.") + f"{when.microsecond // 1000:03d}"


def _shared(study: WrittenStudy, identity: Identity, written: WrittenSeries,
            header: SequenceHeader, pixels: np.ndarray) -> dict[str, Any]:
    """Attributes every instance of the series carries, classic or enhanced."""
    plan, series, case = study.plan, written.plan, study.case
    scanner = plan.scanner
    acquired = _acquired(identity, series)
    created = acquired + timedelta(seconds=series.duration_s + 2)
    low, high = np.percentile(pixels, [1, 99.5])
    return {
        "SpecificCharacterSet": "ISO_IR 192",
        "InstanceCreationDate": _da(created), "InstanceCreationTime": _tm(created),
        "StudyDate": _da(identity.start), "StudyTime": _tm(identity.start),
        "SeriesDate": _da(acquired), "SeriesTime": _tm(acquired),
        "AcquisitionDate": _da(acquired), "AcquisitionTime": _tm(acquired),
        "ContentDate": _da(created), "ContentTime": _tm(created),
        "AccessionNumber": f"ACC{study.options.seed:06d}",
        "Modality": "MR",
        "Manufacturer": scanner.manufacturer,
        "InstitutionName": "aiworker synthetic phantom",
        "ReferringPhysicianName": "",
        "StationName": f"{plan.vendor.key.upper()}MR{study.options.seed % 90 + 10}",
        "StudyDescription": f"MR KNEE {'RIGHT' if case.side == 'R' else 'LEFT'}",
        "SeriesDescription": written.description,
        "ManufacturerModelName": scanner.model,
        "PatientName": identity.patient_name,
        "PatientID": identity.patient_id,
        "PatientBirthDate": identity.birth_date,
        "PatientSex": identity.sex,
        "PatientAge": f"{identity.age:03d}Y",
        "BodyPartExamined": "KNEE",
        "ProtocolName": written.protocol_name,
        "DeviceSerialNumber": f"{study.options.seed % 9000 + 1000}{len(scanner.model)}",
        "SoftwareVersions": list(scanner.software),
        "PatientPosition": "FFS",
        "StudyInstanceUID": study.study_uid,
        "SeriesInstanceUID": written.uid,
        "StudyID": str(study.options.seed % 100000),
        "SeriesNumber": written.number,
        "FrameOfReferenceUID": identity.uid("frame"),
        "PositionReferenceIndicator": "",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": series.rows,
        "Columns": series.columns,
        "BitsAllocated": 16,
        "BitsStored": 12,
        "HighBit": 11,
        "PixelRepresentation": 0,
        "WindowCenter": round(float(low + high) / 2),
        "WindowWidth": max(round(float(high - low)), 1),
        "MagneticFieldStrength": scanner.field_strength,
        "ImageComments": "Synthetic knee phantom, not a patient",
    }


def _classic_technique(header: SequenceHeader, series: SeriesPlan, study: WrittenStudy,
                       images: int) -> dict[str, Any]:
    """MR Image module attributes of a classic (single-frame) series."""
    vendor, scanner = study.plan.vendor, study.plan.scanner
    technique: dict[str, Any] = {
        "SOPClassUID": MRImageStorage,
        "ImageType": DERIVED_IMAGE_TYPE if series.derived else list(header.image_type),
        "ScanningSequence": list(header.scanning_sequence),
        "SequenceVariant": list(header.sequence_variant),
        "ScanOptions": list(header.scan_options) or "",
        "MRAcquisitionType": "2D",
        "SequenceName": header.sequence_name,
        "AngioFlag": "N",
        "SliceThickness": series.thickness,
        "RepetitionTime": series.repetition_time,
        "EchoTime": series.echo_time,
        "NumberOfAverages": 1,
        "ImagingFrequency": round(42.577478 * scanner.field_strength, 6),
        "ImagedNucleus": "1H",
        "EchoNumbers": 1,
        "SpacingBetweenSlices": series.spacing,
        "EchoTrainLength": header.echo_train_length,
        "PercentSampling": 100,
        "PercentPhaseFieldOfView": round(100 * series.rows / series.columns, 4),
        "PixelBandwidth": 250,
        "ReceiveCoilName": scanner.receive_coil,
        "TransmitCoilName": "Body",
        "AcquisitionMatrix": [0, series.columns, series.rows, 0],
        "InPlanePhaseEncodingDirection": "COL",
        "FlipAngle": header.flip_angle,
        "AcquisitionNumber": vendor.acquisition_number(series.order),
        vendor.laterality_keyword: study.case.side,
    }
    if series.inversion_time is not None:
        technique["InversionTime"] = series.inversion_time
    writes_count = study.options.images_in_acquisition
    if writes_count if writes_count is not None else vendor.writes_images_in_acquisition:
        technique["ImagesInAcquisition"] = images
    return technique


def _dataset(attributes: dict[str, Any]) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _classic_instance(template: Dataset, geometry: SliceGeometry, k: int, index: int,
                      sop_uid: str) -> Dataset:
    """One MR Image Storage instance: slice ``k`` of ``geometry``, instance ``index + 1``.

    It shares the template's (never modified) elements and adds its own.
    """
    ds = Dataset(dict(template))
    position = geometry.position(k)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
    ds.PixelSpacing = [_ds(v) for v in geometry.pixel_spacing]
    ds.SliceLocation = _ds(float(np.dot(position, geometry.normal)))
    return ds


def _ds(value: float) -> float:
    """A float that fits a DS value (16 characters) without losing more than 1e-6 mm."""
    return round(float(value), 6)


def _save(ds: Dataset, pixels: np.ndarray, path: Path, options: StudyOptions) -> Path:
    """Encode ``pixels`` in the chosen transfer syntax and write ``ds`` as a Part 10 file."""
    syntax = TRANSFER_SYNTAXES[options.transfer_syntax]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax.is_compressed:
        ds.compress(syntax, np.ascontiguousarray(pixels), generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
