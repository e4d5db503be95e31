"""The knee MR protocol: which series a study holds, in what geometry, with what timing.

A routine knee exam, as most sites run it: a 3-plane localizer, sagittal PD FS, sagittal T1,
coronal PD FS or STIR, coronal T1, and axial PD FS or T2 FS. :func:`plan_study` draws one
study's version of it from a random generator: the vendor and scanner, the order of the
series after the localizer, matrix, slice count and thickness within the ranges seen in
practice (256-512 matrix, 16-40 slices, 2.5-4 mm), an oblique prescription per plane shared
by the series in that plane (up to ``max_oblique`` degrees about each of two axes), TR/TE/TI
consistent with the weighting, acquisition times, optionally a re-scanned series (the same
protocol acquired again at the end, with a higher SeriesNumber) and optionally a reformat
of the sagittal PD FS made at the console (a derived series: same geometry and contrast,
ImageType DERIVED), which a selector must tell from the acquisition by its header alone.

Tests and benchmarks narrow it with :class:`Overrides` (only some roles, a smaller matrix,
fewer or more slices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.spatial.transform import Rotation

from aiworker.phantom.geometry import SliceGeometry
from aiworker.phantom.vendors import GENERIC_DESCRIPTIONS, LOCALIZER, VENDORS, Scanner, Vendor


@dataclass(frozen=True)
class Role:
    """One series of the protocol: its kind of acquisition and its plane."""

    kind: str  # a vendors.KINDS entry (render sequence or localizer)
    plane: str  # sagittal, coronal, axial or three-plane


ROLES: dict[str, Role] = {
    "localizer": Role(LOCALIZER, "three-plane"),
    "sag_pd_fs": Role("PD_FS", "sagittal"),
    "sag_pd": Role("PD", "sagittal"),
    "sag_t1": Role("T1", "sagittal"),
    "cor_pd_fs": Role("PD_FS", "coronal"),
    "cor_stir": Role("STIR", "coronal"),
    "cor_t1": Role("T1", "coronal"),
    "ax_pd_fs": Role("PD_FS", "axial"),
    "ax_t2_fs": Role("T2_FS", "axial"),
}

# In-plane directions (ImageOrientationPatient row, column) of each plane, DICOM LPS.
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}
# The two patient axes an oblique prescription of each plane rotates about (the first one
# by up to the full angle, the second by up to half of it).
_TILT_AXES = {"sagittal": "zy", "coronal": "zx", "axial": "xy"}

# Per kind: (TR ms, TE ms, TI ms or None) ranges, SNR range, duration range in seconds.
_TIMING: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float] | None]] = {
    LOCALIZER: ((7.0, 10.0), (3.0, 4.5), None),
    "PD_FS": ((2000.0, 4000.0), (20.0, 45.0), None),
    "PD": ((2000.0, 4000.0), (20.0, 45.0), None),
    "T1": ((400.0, 800.0), (8.0, 20.0), None),
    "T2_FS": ((3000.0, 5000.0), (60.0, 100.0), None),
    "STIR": ((3500.0, 6000.0), (30.0, 50.0), (130.0, 170.0)),
}
_SNR = {LOCALIZER: (12.0, 18.0), "PD_FS": (18.0, 30.0), "PD": (30.0, 45.0),
        "T1": (30.0, 45.0), "T2_FS": (15.0, 25.0), "STIR": (12.0, 20.0)}
_DURATION_S = {LOCALIZER: (20.0, 30.0), "PD_FS": (180.0, 270.0), "PD": (150.0, 240.0),
               "T1": (150.0, 210.0), "T2_FS": (180.0, 240.0), "STIR": (200.0, 300.0)}

# Per plane: field of view (mm) choices and the extent to cover through the slices (mm).
_FOV = {"sagittal": (140.0, 150.0, 160.0), "coronal": (140.0, 150.0, 160.0),
        "axial": (130.0, 140.0, 150.0)}
_COVERAGE = {"sagittal": (85.0, 110.0), "coronal": (75.0, 100.0), "axial": (90.0, 120.0)}
_THICKNESS = {"sagittal": (2.5, 3.0, 3.0, 3.5), "coronal": (2.5, 3.0, 3.0, 3.5),
              "axial": (3.0, 3.5, 4.0)}
_MATRIX = (256, 320, 384, 448, 512)
SLICE_RANGE = (16, 40)
LOCALIZER_SLICES_PER_PLANE = 3


@dataclass(frozen=True)
class Overrides:
    """Narrowings of the protocol for tests and benchmarks.

    ``roles`` replaces the protocol's series list (kept in the given order); ``matrix`` is
    rows = columns, or (rows, columns); ``slices`` applies to every series but the
    localizer (which keeps three slices per plane), and may leave the realistic range.
    """

    roles: tuple[str, ...] | None = None
    matrix: int | tuple[int, int] | None = None
    slices: int | None = None


@dataclass(frozen=True)
class SeriesPlan:
    """One acquired series: what it is, where its slices lie, how and when it was acquired."""

    role: str
    kind: str
    plane: str
    order: int  # 1-based position in the acquisition order
    rows: int
    columns: int
    slices: int  # per stack (the localizer has one stack per plane)
    field_of_view: tuple[float, float]  # (height, width) mm
    thickness: float
    spacing: float  # SpacingBetweenSlices
    rotation: tuple[float, float]  # oblique angles, degrees, about the plane's tilt axes
    repetition_time: float
    echo_time: float
    inversion_time: float | None
    snr: float
    start_s: float  # seconds after the study started
    duration_s: float
    rescan_of: str | None = None  # the role's first acquisition, for a re-scan
    derived: bool = False  # a reformat of the role's acquisition, not an acquisition

    def stacks(self, centre) -> list[SliceGeometry]:
        """The slice stacks of this series, centred on ``centre`` (patient mm)."""
        planes = ("sagittal", "coronal", "axial") if self.kind == LOCALIZER else (self.plane,)
        return [self._stack(plane, centre) for plane in planes]

    def _stack(self, plane: str, centre) -> SliceGeometry:
        row_dir, col_dir = oblique(plane, self.rotation)
        return SliceGeometry.centred(centre, row_dir, col_dir, self.rows, self.columns,
                                     self.slices, self.field_of_view, self.thickness,
                                     self.spacing)

    @property
    def images(self) -> int:
        return self.slices * (3 if self.kind == LOCALIZER else 1)


@dataclass(frozen=True)
class StudyPlan:
    """Everything drawn for one study before any pixel is rendered."""

    vendor: Vendor
    scanner: Scanner
    descriptions: str  # vendor, generic or empty
    generic_description: str
    series: tuple[SeriesPlan, ...] = field(default_factory=tuple)

    def series_number(self, plan: SeriesPlan) -> int:
        return self.vendor.series_number(plan.order)


def oblique(plane: str, rotation: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column directions of ``plane`` rotated by ``rotation`` (degrees) about the
    plane's two tilt axes."""
    turn = Rotation.from_euler(_TILT_AXES[plane], rotation, degrees=True)
    row_dir, col_dir = PLANES[plane]
    return turn.apply(row_dir), turn.apply(col_dir)


def default_roles(rng: np.random.Generator) -> tuple[str, ...]:
    """The routine protocol: localizer first, then the other five in a random order."""
    coronal = "cor_pd_fs" if rng.random() < 0.5 else "cor_stir"
    axial = "ax_pd_fs" if rng.random() < 0.5 else "ax_t2_fs"
    rest = ["sag_pd_fs", "sag_t1", coronal, "cor_t1", axial]
    return ("localizer", *(rest[i] for i in rng.permutation(len(rest))))


def plan_study(rng: np.random.Generator, *, vendor: str | None = None,
               descriptions: str = "vendor", rescan: bool = False, derived: bool = False,
               max_oblique: float = 15.0, overrides: Overrides = Overrides()) -> StudyPlan:
    """Draw one study's protocol (see the module docstring)."""
    chosen = VENDORS[vendor] if vendor else VENDORS[rng.choice(sorted(VENDORS))]
    scanner = chosen.scanners[rng.integers(len(chosen.scanners))]
    generic = str(rng.choice(GENERIC_DESCRIPTIONS))
    roles = overrides.roles or default_roles(rng)
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown series role {role!r}; known: {', '.join(ROLES)}")
    prescriptions = {plane: _prescription(plane, rng, max_oblique, overrides.slices)
                     for plane in PLANES}
    series: list[SeriesPlan] = []
    clock = 0.0
    for order, role in enumerate(roles, start=1):
        plan = _series(role, order, clock, rng, prescriptions, overrides.matrix)
        series.append(plan)
        clock = plan.start_s + plan.duration_s + float(rng.uniform(15.0, 60.0))
    if rescan:
        series.append(_rescan(series, clock))
    if derived:
        series.append(_reformat(series, clock))
    return StudyPlan(chosen, scanner, descriptions, generic, tuple(series))


def _rescan(series: list[SeriesPlan], clock: float) -> SeriesPlan:
    """The same protocol as the sagittal PD FS (else the first non-localizer) acquired again
    at the end of the exam, as a technologist repeats a series spoiled by motion."""
    candidates = [s for s in series if s.kind != LOCALIZER]
    if not candidates:
        raise ValueError("a re-scan needs a series other than the localizer")
    first = next((s for s in candidates if s.role == "sag_pd_fs"), candidates[0])
    return replace(first, order=len(series) + 1, start_s=clock, rescan_of=first.role)


def _reformat(series: list[SeriesPlan], clock: float) -> SeriesPlan:
    """A reformat of the first sagittal PD FS (else of the first non-localizer), saved as a
    series of its own after the exam."""
    candidates = [s for s in series if s.kind != LOCALIZER and not s.rescan_of]
    if not candidates:
        raise ValueError("a reformat needs a series other than the localizer")
    source = next((s for s in candidates if s.role == "sag_pd_fs"), candidates[0])
    return replace(source, order=len(series) + 1, start_s=clock, derived=True)


@dataclass(frozen=True)
class _Prescription:
    """Where the slices of one plane go; every series in that plane shares it, as a
    technologist copies the slice group from one series to the next."""

    field_of_view: float
    thickness: float
    spacing: float
    slices: int
    rotation: tuple[float, float]


_LOCALIZER_PRESCRIPTION = _Prescription(220.0, 8.0, 10.0, LOCALIZER_SLICES_PER_PLANE, (0.0, 0.0))


def _prescription(plane: str, rng: np.random.Generator, max_oblique: float,
                  slices: int | None) -> _Prescription:
    thickness = float(rng.choice(_THICKNESS[plane]))
    spacing = round(thickness * float(rng.choice((1.0, 1.1, 1.2))), 1)
    coverage = rng.uniform(*_COVERAGE[plane])
    rotation = (float(rng.uniform(-max_oblique, max_oblique)),
                float(rng.uniform(-max_oblique / 2, max_oblique / 2)))
    return _Prescription(
        field_of_view=float(rng.choice(_FOV[plane])), thickness=thickness, spacing=spacing,
        slices=slices or int(np.clip(math.ceil(coverage / spacing), *SLICE_RANGE)),
        rotation=rotation)


def _series(role: str, order: int, clock: float, rng: np.random.Generator,
            prescriptions: dict[str, _Prescription],
            matrix: int | tuple[int, int] | None) -> SeriesPlan:
    kind, plane = ROLES[role].kind, ROLES[role].plane
    tr, te, ti = _TIMING[kind]
    rows, columns = _matrix(kind, plane, rng, matrix)
    where = _LOCALIZER_PRESCRIPTION if kind == LOCALIZER else prescriptions[plane]
    fov = where.field_of_view
    return SeriesPlan(
        role=role, kind=kind, plane=plane, order=order, rows=rows, columns=columns,
        slices=where.slices, field_of_view=(fov * rows / columns, fov),
        thickness=where.thickness, spacing=where.spacing, rotation=where.rotation,
        repetition_time=_draw(rng, tr, 0), echo_time=_draw(rng, te, 1),
        inversion_time=_draw(rng, ti, 0) if ti else None,
        snr=float(rng.uniform(*_SNR[kind])), start_s=clock,
        duration_s=round(float(rng.uniform(*_DURATION_S[kind])), 1),
    )


def _matrix(kind: str, plane: str, rng: np.random.Generator,
            override: int | tuple[int, int] | None) -> tuple[int, int]:
    """(rows, columns): square, but axial series use a 7/8 rectangular field of view."""
    if isinstance(override, int):
        return override, override
    if override:
        return override
    if kind == LOCALIZER:
        return 256, 256
    columns = int(rng.choice(_MATRIX))
    return (columns * 7 // 8 if plane == "axial" else columns), columns


def _draw(rng: np.random.Generator, bounds: tuple[float, float], decimals: int) -> float:
    return round(float(rng.uniform(*bounds)), decimals)
