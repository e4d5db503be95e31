"""Write one synthetic knee MR study as DICOM files, with its ground truth beside it.

Layout of a written case::

    CASE_DIR/dicom/<SeriesNumber:03d>/<InstanceNumber:04d>.dcm   one folder per series
    CASE_DIR/truth/labels.nii.gz   labels of the sagittal PD FS series, in its geometry
    CASE_DIR/truth/labels.json     label value -> name
    CASE_DIR/truth/facts.json      the case (ACL torn or not, side, ...) and every series' role

Every series shares the study's Frame of Reference; its geometry comes from
:class:`~aiworker.phantom.geometry.SliceGeometry`, the same object the renderer samples, so
ImagePositionPatient, ImageOrientationPatient and PixelSpacing describe exactly the points
whose anatomy the pixels show. The same options and seed give byte-identical files: UIDs are
derived from the seed and the options, dates and times from the seed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from aiworker.phantom import anatomy, render
from aiworker.phantom.enhanced import enhanced_instance
from aiworker.phantom.geometry import SliceGeometry
from aiworker.phantom.protocol import Overrides, SeriesPlan, StudyPlan, plan_study
from aiworker.phantom.truth import TruthFiles, write_truth
from aiworker.phantom.vendors import LOCALIZER, VENDORS, SequenceHeader, describe

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
}
DESCRIPTION_MODES = ("vendor", "generic", "empty")
ACL_STATES = ("random", "intact", "torn")
MAX_OBLIQUE = 20.0
DERIVED_IMAGE_TYPE = ["DERIVED", "SECONDARY", "MPR"]

PATIENT_NAMES = (
    "MÜLLER^JÖRG", "GARCÍA LÓPEZ^MARÍA JOSÉ", "ØSTERGÅRD^SØREN", "ÇELIK^AYŞE",
    "NGUYỄN^VĂN AN", "DUBOIS^FRANÇOIS", "KOWALSKI^ŁUKASZ", "YAMADA^TARO=山田^太郎",
    "SMITH^JOHN", "O'BRIEN^SIOBHÁN",
)
_EPOCH = datetime(2024, 1, 2, 7, 30)


@dataclass(frozen=True)
class StudyOptions:
    """How to draw and write one study; every field has a realistic default.

    ``rescan``, ``derived`` (a reformat of the sagittal PD FS) and ``descriptions`` left as
    ``None`` are drawn per case with ``rescan_probability``, ``derived_probability`` and
    ``plain_descriptions_probability`` (plain = generic or empty, half each).
    ``images_in_acquisition`` left as ``None`` follows the vendor.
    ``volume_spacing`` (mm) is the label volume's voxel size (``None``: the anatomy
    module's default); ``truth=False`` skips the ground-truth files; ``workers`` is how
    many series are rendered at once (``None``: one per CPU). Neither ``truth`` nor
    ``workers`` changes a byte of the DICOM files.
    """

    seed: int = 0
    vendor: str | None = None  # siemens, ge, philips; None: drawn
    acl: str = "random"  # random, intact, torn
    side: str | None = None  # R, L; None: drawn
    transfer_syntax: str = "explicit"
    enhanced: bool = False
    rescan: bool | None = None
    rescan_probability: float = 0.2
    derived: bool | None = None
    derived_probability: float = 0.2
    descriptions: str | None = None
    plain_descriptions_probability: float = 0.25
    max_oblique: float = 15.0
    patient_name: str | None = None
    images_in_acquisition: bool | None = None
    overrides: Overrides = Overrides()
    volume_spacing: float | None = None
    truth: bool = True
    workers: int | None = None  # render threads; None: one per CPU

    def check(self) -> None:
        """Raise ValueError naming the first option that is out of range."""
        if self.vendor is not None and self.vendor not in VENDORS:
            raise ValueError(f"vendor must be one of {', '.join(VENDORS)}")
        if self.acl not in ACL_STATES:
            raise ValueError(f"acl must be one of {', '.join(ACL_STATES)}")
        if self.side not in (None, "R", "L"):
            raise ValueError("side must be R or L")
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"transfer_syntax must be one of {', '.join(TRANSFER_SYNTAXES)}")
        matrix = self.overrides.matrix
        if self.transfer_syntax == "jpeg2000" and matrix and min(
                (matrix, matrix) if isinstance(matrix, int) else matrix) < 32:
            raise ValueError("jpeg2000 needs a matrix of at least 32 (OpenJPEG encodes six "
                             "resolution levels)")
        if self.descriptions is not None and self.descriptions not in DESCRIPTION_MODES:
            raise ValueError(f"descriptions must be one of {', '.join(DESCRIPTION_MODES)}")
        if not 0.0 <= self.max_oblique <= MAX_OBLIQUE:
            raise ValueError(f"max_oblique must be within 0..{MAX_OBLIQUE:g} degrees")
        for name in ("rescan_probability", "derived_probability",
                     "plain_descriptions_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1")


@dataclass
class WrittenSeries:
    """One series on disk and what it is."""

    plan: SeriesPlan
    number: int
    uid: str
    description: str
    protocol_name: str
    stacks: list[SliceGeometry]
    files: list[Path]


@dataclass
class WrittenStudy:
    """What :func:`write_study` wrote."""

    root: Path
    dicom_dir: Path
    study_uid: str
    case: Any  # anatomy.KneeCase
    plan: StudyPlan
    options: StudyOptions
    series: list[WrittenSeries] = field(default_factory=list)
    truth: TruthFiles | None = None

    @property
    def files(self) -> list[Path]:
        return [path for s in self.series for path in s.files]


@dataclass(frozen=True)
class _Identity:
    """The patient, the study's UIDs and its start time, all drawn from the seed."""

    variant: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: int
    start: datetime

    def uid(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=["aiworker-phantom", self.variant, *map(str, parts)])


def write_study(case_dir: Path, options: StudyOptions = StudyOptions()) -> WrittenStudy:
    """Draw, render and write one study (and its ground truth) under ``case_dir``."""
    options.check()
    rng = np.random.default_rng(options.seed)
    plan = _draw_plan(options, rng)
    identity = _identity(options, rng)
    case = anatomy.make_case(options.seed, acl=options.acl, side=options.side)
    volume = (anatomy.build_volume(case) if options.volume_spacing is None
              else anatomy.build_volume(case, spacing_mm=options.volume_spacing))
    case_dir = Path(case_dir)
    study = WrittenStudy(case_dir, case_dir / "dicom", identity.uid("study"), case, plan,
                         options)
    # the renderer's numpy/scipy work releases the GIL: render on worker threads while this
    # one encodes and writes the series already rendered, in order
    with ThreadPoolExecutor(options.workers or os.cpu_count() or 1) as pool:
        rendered = [pool.submit(_render, series, volume, options.seed)
                    for series in plan.series]
        for series, future in zip(plan.series, rendered, strict=True):
            stacks, pixels = future.result()
            study.series.append(_write_series(study, identity, series, stacks, pixels))
    if options.truth:
        study.truth = write_truth(case_dir / "truth", study, volume)
    return study


def study_plan(options: StudyOptions) -> StudyPlan:
    """The plan :func:`write_study` follows for ``options``, without rendering anything."""
    options.check()
    return _draw_plan(options, np.random.default_rng(options.seed))


def _draw_plan(options: StudyOptions, rng: np.random.Generator) -> StudyPlan:
    return plan_study(rng, vendor=options.vendor, descriptions=_description_mode(options, rng),
                      rescan=_rescan(options, rng), derived=_derived(options),
                      max_oblique=options.max_oblique, overrides=options.overrides)


def _description_mode(options: StudyOptions, rng: np.random.Generator) -> str:
    draw = rng.random()
    if options.descriptions:
        return options.descriptions
    if draw >= options.plain_descriptions_probability:
        return "vendor"
    return "generic" if draw < options.plain_descriptions_probability / 2 else "empty"


def _rescan(options: StudyOptions, rng: np.random.Generator) -> bool:
    draw = rng.random()
    return options.rescan if options.rescan is not None else draw < options.rescan_probability


def _derived(options: StudyOptions) -> bool:
    """Whether the study has a reformat; drawn apart from the plan's generator, so that
    adding this option changed no earlier study."""
    if options.derived is not None:
        return options.derived
    return bool(np.random.default_rng([options.seed, 7919]).random()
                < options.derived_probability)


def _identity(options: StudyOptions, rng: np.random.Generator) -> _Identity:
    age = int(rng.integers(18, 75))
    start = _EPOCH + timedelta(days=options.seed % 730, minutes=int(rng.integers(0, 600)))
    name = options.patient_name or str(rng.choice(PATIENT_NAMES))
    variant = repr(replace(options, transfer_syntax="explicit", truth=True, workers=None))
    return _Identity(
        variant=variant, patient_name=name, patient_id=f"PH{options.seed:06d}",
        birth_date=f"{start.year - age}{int(rng.integers(1, 13)):02d}"
                   f"{int(rng.integers(1, 29)):02d}",
        sex=str(rng.choice(["F", "M"])), age=age, start=start,
    )


def _render(series: SeriesPlan, volume: Any, seed: int
            ) -> tuple[list[SliceGeometry], np.ndarray]:
    """The stacks of ``series`` and their pixels (images, rows, columns), with noise drawn
    from a generator of the series' own, so the result does not depend on thread order."""
    stacks = series.stacks(volume.centre)
    rng = np.random.default_rng([seed, series.order])
    sequence = "PD" if series.kind == LOCALIZER else series.kind
    pixels = np.concatenate([render.render_series(volume, g, sequence, series.snr, rng)
                             for g in stacks])
    return stacks, pixels


def _write_series(study: WrittenStudy, identity: _Identity, series: SeriesPlan,
                  stacks: list[SliceGeometry], pixels: np.ndarray) -> WrittenSeries:
    plan, options = study.plan, study.options
    number = plan.series_number(series)
    header = plan.vendor.header(series.kind, series.plane)
    description, protocol_name = describe(header, plan.descriptions, plan.generic_description)
    if series.derived and plan.descriptions == "vendor":
        description = f"{description} MPR"
    written = WrittenSeries(series, number, identity.uid("series", number), description,
                            protocol_name, stacks, [])
    shared = _shared(study, identity, written, header, pixels)
    folder = study.dicom_dir / f"{number:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    if options.enhanced:
        sop_uid = identity.uid("sop", number, 1)
        ds = enhanced_instance(shared, header, series, stacks, sop_uid, plan.scanner,
                               _acquired(identity, series), study.case.side)
        written.files.append(_save(ds, pixels, folder / "0001.dcm", options))
        return written
    template = _dataset({**shared, **_classic_technique(header, series, study, len(pixels))})
    for index, (geometry, k) in enumerate(_slices(stacks)):
        ds = _classic_instance(template, geometry, k, index,
                               identity.uid("sop", number, index + 1))
        written.files.append(_save(ds, pixels[index], folder / f"{index + 1:04d}.dcm", options))
    return written


def _slices(stacks: list[SliceGeometry]) -> list[tuple[SliceGeometry, int]]:
    """(stack, slice index) of every image, in instance order."""
    return [(g, k) for g in stacks for k in range(g.slices)]


def _acquired(identity: _Identity, series: SeriesPlan) -> datetime:
    return identity.start + timedelta(seconds=series.start_s)


def _da(when: datetime) -> str:
    return when.strftime("%Y%m%d")


def _tm(when: datetime) -> str:
    return when.strftime("%H%M%S.") + f"{when.microsecond // 1000:03d}"


def _shared(study: WrittenStudy, identity: _Identity, written: WrittenSeries,
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
