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

Here is what a study is (its options, its drawn plan and identity, what was written) and
the drawing and rendering of it; :mod:`aiworker.phantom.dicom_files` writes each rendered
series' files and :mod:`aiworker.phantom.truth` the ground truth.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from aiworker.phantom import anatomy, render
from aiworker.phantom.dicom_files import TRANSFER_SYNTAXES, write_series_files
from aiworker.phantom.geometry import SliceGeometry
from aiworker.phantom.protocol import Overrides, SeriesPlan, StudyPlan, plan_study
from aiworker.phantom.truth import TruthFiles, write_truth
from aiworker.phantom.vendors import LOCALIZER, VENDORS, describe

DESCRIPTION_MODES = ("vendor", "generic", "empty")
ACL_STATES = ("random", "intact", "torn")
MAX_OBLIQUE = 20.0

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
class Identity:
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


def _identity(options: StudyOptions, rng: np.random.Generator) -> Identity:
    age = int(rng.integers(18, 75))
    start = _EPOCH + timedelta(days=options.seed % 730, minutes=int(rng.integers(0, 600)))
    name = options.patient_name or str(rng.choice(PATIENT_NAMES))
    variant = repr(replace(options, transfer_syntax="explicit", truth=True, workers=None))
    return Identity(
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


def _write_series(study: WrittenStudy, identity: Identity, series: SeriesPlan,
                  stacks: list[SliceGeometry], pixels: np.ndarray) -> WrittenSeries:
    """Name the series as its vendor would, then write its files."""
    plan = study.plan
    number = plan.series_number(series)
    header = plan.vendor.header(series.kind, series.plane)
    description, protocol_name = describe(header, plan.descriptions, plan.generic_description)
    if series.derived and plan.descriptions == "vendor":
        description = f"{description} MPR"
    written = WrittenSeries(series, number, identity.uid("series", number), description,
                            protocol_name, stacks, [])
    written.files.extend(write_series_files(study, identity, written, header, pixels))
    return written
