"""Slice geometry from headers: the plane a series lies in, and whether its slices form a clean
stack a model can read as a volume.

DICOM patient coordinates are LPS: x grows to the patient's left, y to the posterior, z to
the head. A slice's normal is the cross product of the two direction cosines of
ImageOrientationPatient; it points along x for a sagittal slice, y for a coronal one and z
for an axial one. The obliquity is the angle between the normal and that nearest axis.

A clean stack has parallel slices of one size and pixel spacing, one slice per position
along the normal (repeats at a position are allowed when they are separate echoes, time
points, acquisitions or stacks, each a clean stack itself), and a uniform step between
neighbours. A missing slice shows as a gap of twice (or three times...) the usual step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aiworker.select.headers import Frame

PLANE_OF_AXIS = ("sagittal", "coronal", "axial")  # normal along x, y, z (LPS)
PARALLEL_DEGREES = 1.0  # slices whose normals differ by more are not parallel
SAME_POSITION_MM = 0.01  # two slices closer than this along the normal share a position
REPEAT_KEYS = (("echo", "echoes"), ("temporal", "time points"),
               ("acquisition", "acquisitions"), ("stack", "stacks"))


@dataclass(frozen=True)
class PlaneFinding:
    """The plane of a series: sagittal, coronal, axial, oblique, mixed or unknown."""

    plane: str
    obliquity_deg: float | None
    basis: str


@dataclass(frozen=True)
class StackFinding:
    """Whether a series' slices form clean stacks, and what they measure."""

    consistent: bool
    basis: str  # the shape of the stack when consistent, else the first problem found
    slice_count: int  # slices per stack (positions), or images when positions are unknown
    stacks: int  # separate stacks at the same positions: echoes, time points...
    spacing: float | None  # the usual step between neighbouring slices, mm


def normal_of(orientation: Sequence[float]) -> np.ndarray | None:
    """The unit slice normal of an ImageOrientationPatient, or None if it is degenerate."""
    if orientation is None or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    length = float(np.linalg.norm(normal))
    return normal / length if length > 1e-6 else None


def plane_of(orientation: Sequence[float], oblique_above_deg: float) -> PlaneFinding:
    """Classify one ImageOrientationPatient by the axis its normal lies nearest."""
    normal = normal_of(orientation)
    if normal is None:
        return PlaneFinding("unknown", None, "ImageOrientationPatient is not two directions")
    axis = int(np.argmax(np.abs(normal)))
    obliquity = math.degrees(math.acos(min(1.0, abs(float(normal[axis])))))
    nearest = PLANE_OF_AXIS[axis]
    tilt = f"tilted {obliquity:.0f}° from true {nearest}" if obliquity >= 0.5 else ""
    if obliquity > oblique_above_deg:
        return PlaneFinding("oblique", obliquity, f"{tilt}, beyond {oblique_above_deg:g}°")
    return PlaneFinding(nearest, obliquity, tilt)


def series_plane(frames: Sequence[Frame], oblique_above_deg: float) -> PlaneFinding:
    """The plane of a whole series; ``mixed`` when its slices lie in different planes (a
    tri-planar localizer), ``unknown`` when no slice has an orientation."""
    orientations = {f.orientation for f in frames if f.orientation and len(f.orientation) == 6}
    if not orientations:
        return PlaneFinding("unknown", None, "no ImageOrientationPatient")
    findings = [plane_of(o, oblique_above_deg) for o in sorted(orientations)]
    planes = sorted({f.plane for f in findings}, key=_plane_rank)
    if len(planes) > 1:
        return PlaneFinding("mixed", None, f"slices in {len(planes)} planes: {', '.join(planes)}")
    return max(findings, key=lambda f: f.obliquity_deg or 0.0)


def _plane_rank(plane: str) -> int:
    order = (*PLANE_OF_AXIS, "oblique", "unknown")
    return order.index(plane) if plane in order else len(order)


def check_stacks(frames: Sequence[Frame], tolerance: float) -> StackFinding:
    """Check that ``frames`` form clean stacks; ``tolerance`` is the fraction of the usual
    step by which a step may differ before the spacing counts as non-uniform."""
    if not frames:
        return StackFinding(False, "no images", 0, 0, None)
    unplaced = sum(1 for f in frames if not _placed(f))
    if unplaced:
        return StackFinding(False, f"{unplaced} of {len(frames)} images lack "
                            "ImagePositionPatient or ImageOrientationPatient",
                            len(frames), 1, None)
    problem = _varying_images(frames) or _not_parallel(frames)
    if problem:
        return StackFinding(False, problem, _positions(frames), 1, None)
    normal = normal_of(frames[0].orientation)
    stacks, repeats = _split_repeats(frames, normal)
    if stacks is None:
        return StackFinding(False, _duplicate(frames, normal), _positions(frames), 1, None)
    counts = sorted({len(stack) for stack in stacks})
    if len(counts) > 1:
        return StackFinding(False, f"{repeats} differ in slice count: "
                            f"{', '.join(map(str, counts))}", counts[-1], len(stacks), None)
    spacing = None
    for stack in stacks:
        problem, spacing = _spacing_problem(_distances(stack, normal), tolerance)
        if problem:
            return StackFinding(False, problem, counts[0], len(stacks), spacing)
    shape = f"{counts[0]} parallel slices"
    if spacing is not None:
        shape += f", {spacing:.2f} mm apart"
    if len(stacks) > 1:
        shape += f", {len(stacks)} {repeats}"
    return StackFinding(True, shape, counts[0], len(stacks), spacing)


def _placed(frame: Frame) -> bool:
    return (frame.position is not None and len(frame.position) == 3
            and normal_of(frame.orientation) is not None)


def _positions(frames: Sequence[Frame]) -> int:
    return len({tuple(round(v, 2) for v in f.position or ()) for f in frames})


def _varying_images(frames: Sequence[Frame]) -> str | None:
    sizes = sorted({(f.rows, f.columns) for f in frames}, key=str)
    if len(sizes) > 1:
        return "image size varies: " + ", ".join(f"{r}x{c}" for r, c in sizes)
    spacings = sorted({tuple(round(v, 4) for v in f.pixel_spacing or ()) for f in frames})
    if len(spacings) > 1:
        return "pixel spacing varies: " + ", ".join("\\".join(f"{v:g}" for v in s) or "none"
                                                    for s in spacings)
    return None


def _not_parallel(frames: Sequence[Frame]) -> str | None:
    reference = normal_of(frames[0].orientation)
    worst = max(_angle(reference, normal_of(f.orientation)) for f in frames)
    if worst > PARALLEL_DEGREES:
        return f"slices not parallel: one is tilted {worst:.1f}° from the first"
    return None


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(min(1.0, abs(float(np.dot(a, b))))))


def _distances(frames: Sequence[Frame], normal: np.ndarray) -> np.ndarray:
    """Each slice's position along the normal, sorted."""
    return np.sort(np.array([float(np.dot(f.position, normal)) for f in frames]))


def _has_duplicates(distances: np.ndarray) -> bool:
    return bool(np.any(np.diff(distances) < SAME_POSITION_MM))


def _split_repeats(frames: Sequence[Frame], normal: np.ndarray
                   ) -> tuple[list[list[Frame]] | None, str]:
    """One stack when every position is unique; else stacks split by the first attribute
    (echo, time point, acquisition, stack) that makes each stack's positions unique; None
    when none does."""
    if not _has_duplicates(_distances(frames, normal)):
        return [list(frames)], ""
    for attribute, plural in REPEAT_KEYS:
        groups: dict[object, list[Frame]] = {}
        for frame in frames:
            groups.setdefault(getattr(frame, attribute), []).append(frame)
        if len(groups) > 1 and not any(_has_duplicates(_distances(g, normal))
                                       for g in groups.values()):
            return list(groups.values()), plural
    return None, ""


def _duplicate(frames: Sequence[Frame], normal: np.ndarray) -> str:
    distances = _distances(frames, normal)
    first = int(np.argmax(np.diff(distances) < SAME_POSITION_MM))
    at = distances[first]
    count = int(np.sum(np.abs(distances - at) < SAME_POSITION_MM))
    positions = _positions(frames)
    slice_number = len(np.unique(np.round(distances[: first + 1], 2)))
    return (f"duplicate slices: {count} images at the same position (slice {slice_number} "
            f"of {positions}), not told apart by echo, time point or acquisition")


def _spacing_problem(distances: np.ndarray, tolerance: float) -> tuple[str | None, float | None]:
    """The first step that breaks a uniform spacing (a missing slice shows as a multiple of
    the usual step), and the usual step (the median)."""
    steps = np.diff(distances)
    if len(steps) == 0:
        return None, None
    spacing = float(np.median(steps))
    allowed = max(SAME_POSITION_MM, tolerance * spacing)
    count = len(distances)
    for k, step in enumerate(steps):
        if abs(step - spacing) <= allowed:
            continue
        missing = round(step / spacing) - 1 if spacing > 0 else 0
        if missing >= 1 and abs(step - (missing + 1) * spacing) <= allowed * (missing + 1):
            what = "missing slice" if missing == 1 else f"{missing} missing slices"
            return (f"{what}: gap of {step:.2f} mm after slice {k + 1} of {count} "
                    f"(spacing {spacing:.2f} mm)"), spacing
        return (f"non-uniform spacing: gap {step:.2f} mm at slice {k + 1} of {count} "
                f"(spacing {spacing:.2f} mm)"), spacing
    return None, spacing
