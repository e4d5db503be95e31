"""The anatomy of a synthetic knee: the random facts of a case, and the case drawn as a grid
of tissue values in patient space, ready for the MR renderer (:mod:`aiworker.phantom.render`).

Frames, kept here so no one has to re-derive them:

* *Patient* coordinates are DICOM LPS millimetres (+x patient left, +y posterior,
  +z superior), as in :mod:`aiworker.phantom.geometry`.
* The anatomy is modelled once, as a RIGHT knee in its own *knee frame*: origin at the joint
  centre (middle of the tibial plateau, on the tibial cartilage surface), axes along patient
  x, y, z when the leg lies straight in the scanner; lateral is -x, medial +x.
* Shapes are written in the *nominal* millimetres of an average knee; a case's ``scale`` and
  ``width`` stretch them into knee-frame millimetres.
* The femur and the structures fixed to it are written in the *femur frame*, which equals
  the knee frame when the knee is straight and turns with the femur by ``flexion_deg``
  about the condyles, the tibia staying put. The patella, tethered to the tibia by its
  tendon, stays in the knee frame over this small range.
* A case's pose places the knee frame in patient space: mirrored in x for a LEFT knee, then
  turned by ``yaw_deg`` about z and ``varus_deg`` about y, then moved to ``centre``.

Shapes are approximate signed distances (mm, negative inside) evaluated with numpy over the
part of the grid they can touch, and painted back to front: a later tissue covers an earlier
one. A bone is one shape painted three times (fluid film, cartilage and cortex outside,
marrow inside), so its layers follow its surface.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np

LABELS: dict[int, str] = {
    0: "background",
    1: "femur",
    2: "tibia",
    3: "patella",
    4: "fibula",
    5: "femoral_cartilage",
    6: "tibial_cartilage",
    7: "patellar_cartilage",
    8: "medial_meniscus",
    9: "lateral_meniscus",
    10: "acl",
    11: "pcl",
    12: "joint_fluid",
    13: "hoffa_fat_pad",
    14: "subcutaneous_fat",
    15: "muscle",
    16: "skin",
    17: "bone_marrow_edema",
    18: "patellar_tendon",
    19: "quadriceps_tendon",
    20: "mcl",
    21: "lcl",
    22: "deep_fat",  # popliteal fossa, intercondylar notch, suprapatellar and prefemoral fat
    23: "popliteal_vessels",
}
LABEL_VALUES: dict[str, int] = {name: value for value, name in LABELS.items()}

# Tissue values refine labels for the renderer. A value that is a key of LABELS is that
# label (a bone's label value holds its marrow); the values below are parts of a label that
# look different on MR. TISSUE_LABEL maps every tissue value to its label value.
CORTEX: dict[str, int] = {"femur": 64, "tibia": 65, "patella": 66, "fibula": 67}
ACL_STUMP = 68  # oedematous stump of a torn ACL (label "acl")


def _tissue_label_table() -> np.ndarray:
    table = np.zeros(256, np.uint8)
    for value in LABELS:
        table[value] = value
    for bone, value in CORTEX.items():
        table[value] = LABEL_VALUES[bone]
    table[ACL_STUMP] = LABEL_VALUES["acl"]
    return table


TISSUE_LABEL = _tissue_label_table()
_T = LABEL_VALUES

DEFAULT_SPACING_MM = 0.6
GRID_HALF_HEIGHT_MM = 105.0  # the grid spans this far above and below the joint line

# Layer thicknesses, nominal mm.
FEMORAL_CARTILAGE_MM = 2.2
TIBIAL_CARTILAGE_MM = 2.2
PATELLAR_CARTILAGE_MM = 3.0
CORTEX_MM = 1.3
FLUID_FILM_MM = 0.8
SKIN_MM = 1.8


# ----------------------------------------------------------------------------- case facts


@dataclass(frozen=True)
class KneeCase:
    """The random facts of one synthetic knee; the anatomy follows from them alone.

    Lengths other than ``centre`` are nominal millimetres, which scale with the knee."""

    seed: int
    side: str  # "R" or "L"
    acl_torn: bool
    bone_bruise: bool  # marrow oedema, lateral femoral condyle and posterolateral tibia
    scale: float  # overall size factor
    width: float  # extra mediolateral size factor
    flexion_deg: float
    yaw_deg: float  # rotation of the knee about the long axis (patient z)
    varus_deg: float  # tilt of the knee in the coronal plane (about patient y)
    fat_mm: float  # subcutaneous fat thickness
    effusion_mm: float  # joint fluid beyond a thin film
    tear_at: float  # where a torn ACL's gap lies: 0 tibial end, 1 femoral end
    gap_mm: float  # length of a torn ACL's gap
    centre: tuple[float, float, float]  # joint centre, patient mm

    def facts(self) -> dict:
        """The case as JSON-ready values; tear details only for a torn ACL."""
        facts = {key: round(value, 3) if isinstance(value, float) else value
                 for key, value in asdict(self).items()}
        facts["centre"] = [round(v, 3) for v in self.centre]
        if not self.acl_torn:
            del facts["tear_at"], facts["gap_mm"]
        return facts


@dataclass(frozen=True)
class CaseRanges:
    """The uniform ranges :func:`make_case` draws a case's variable facts from.

    The defaults are the generator's realistic ranges; :data:`WIDE_RANGES` widens the ones
    the anatomy stays valid over (flexion to 45 degrees, a large effusion, smaller and
    larger knees) for domain-randomised training. Any ranges consume the random stream the
    same way, so a seed draws the same side, tear and position whatever the ranges."""

    scale: tuple[float, float] = (0.88, 1.1)
    width: tuple[float, float] = (0.94, 1.06)
    flexion_deg: tuple[float, float] = (0.0, 12.0)
    yaw_deg: tuple[float, float] = (-10.0, 10.0)
    varus_deg: tuple[float, float] = (-4.0, 4.0)
    fat_mm: tuple[float, float] = (3.0, 12.0)
    effusion_mm: tuple[float, float] = (0.0, 5.0)


MAX_FLEXION_DEG = 45.0  # beyond it the patella, kept in the knee frame, leaves the trochlea
WIDE_RANGES = CaseRanges(scale=(0.8, 1.2), width=(0.9, 1.1), flexion_deg=(0.0, MAX_FLEXION_DEG),
                         yaw_deg=(-15.0, 15.0), varus_deg=(-6.0, 6.0), fat_mm=(2.0, 20.0),
                         effusion_mm=(0.0, 12.0))


def make_case(seed: int, acl: str = "random", side: str | None = None,
              ranges: CaseRanges = CaseRanges()) -> KneeCase:
    """Draw the facts of case ``seed`` (a non-negative integer).

    ``acl`` is "random", "intact" or "torn"; "random" tears exactly one ACL in each pair of
    seeds (2m, 2m + 1), chosen at random, so any run of consecutive seeds is balanced.
    ``side`` None draws the side. Forcing ``acl`` or ``side`` leaves every other fact as the
    seed draws it, so a torn and an intact case can share one anatomy. ``ranges`` bounds
    the variable facts (:class:`CaseRanges`; flexion at most :data:`MAX_FLEXION_DEG`).
    """
    if not 0.0 <= ranges.flexion_deg[0] <= ranges.flexion_deg[1] <= MAX_FLEXION_DEG:
        raise ValueError(f"flexion must lie within 0..{MAX_FLEXION_DEG:g} degrees")
    if acl not in ("random", "intact", "torn"):
        raise ValueError(f"acl must be 'random', 'intact' or 'torn', not {acl!r}")
    if side not in (None, "R", "L"):
        raise ValueError(f"side must be 'R', 'L' or None, not {side!r}")
    rng = np.random.default_rng([seed, 0x6B6E6565])
    drawn_side = "R" if rng.random() < 0.5 else "L"
    side = side or drawn_side
    acl_torn = _paired_tear(seed) if acl == "random" else acl == "torn"
    r = ranges
    facts = dict(
        scale=rng.uniform(*r.scale), width=rng.uniform(*r.width),
        flexion_deg=rng.uniform(*r.flexion_deg), yaw_deg=rng.uniform(*r.yaw_deg),
        varus_deg=rng.uniform(*r.varus_deg), fat_mm=rng.uniform(*r.fat_mm),
        effusion_mm=rng.uniform(*r.effusion_mm), tear_at=rng.uniform(0.35, 0.65),
        gap_mm=rng.uniform(4.0, 9.0))
    bruise = bool(rng.random() < 0.6) and acl_torn
    lateral_offset = rng.uniform(60.0, 110.0) * (-1.0 if side == "R" else 1.0)
    centre = (lateral_offset, rng.uniform(-15.0, 15.0), rng.uniform(-20.0, 20.0))
    return KneeCase(seed=seed, side=side, acl_torn=acl_torn, bone_bruise=bruise,
                    centre=tuple(float(v) for v in centre),
                    **{key: float(value) for key, value in facts.items()})


def _paired_tear(seed: int) -> bool:
    """Exactly one of the seeds 2m and 2m + 1 is torn; a coin drawn from m says which."""
    coin = int(np.random.default_rng([seed // 2, 0xAC1]).integers(2))
    return seed % 2 == coin


# ------------------------------------------------------------------------ shape primitives


@dataclass(frozen=True)
class _Coords:
    """Nominal coordinates of a box of voxels; broadcastable arrays, (z, y, x) axis order."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray


def _ellipsoid(p: _Coords, centre, semi) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (exact near its surface)."""
    u, v, w = ((c - m) / s for c, m, s in zip((p.x, p.y, p.z), centre, semi, strict=True))
    # y and z terms first: in either frame they span fewer axes than the full box
    k0 = np.sqrt((v * v + w * w) + u * u)
    k1 = np.sqrt(((v / semi[1]) ** 2 + (w / semi[2]) ** 2) + (u / semi[0]) ** 2)
    return k0 * (k0 - 1.0) / (k1 + 1e-6)


@dataclass(frozen=True)
class _Loft:
    """A column of ellipses stacked along z, each knot's centre and semi-axes interpolated
    linearly between knots; closed flat at the first and last knot."""

    z: tuple[float, ...]
    cx: tuple[float, ...]
    cy: tuple[float, ...]
    ax: tuple[float, ...]
    ay: tuple[float, ...]

    def distance(self, p: _Coords) -> np.ndarray:
        """Approximate signed distance."""
        ax, ay, cx, cy = (np.interp(p.z, self.z, knots).astype(np.float32)
                          for knots in (self.ax, self.ay, self.cx, self.cy))
        u = (p.x - cx) / ax
        v = (p.y - cy) / ay
        k0 = np.sqrt(u * u + v * v)
        k1 = np.sqrt((u / ax) ** 2 + (v / ay) ** 2)
        side = k0 * (k0 - 1.0) / (k1 + 1e-6)
        return np.maximum(side, np.maximum(self.z[0] - p.z, p.z - self.z[-1]))

    def inside(self, p: _Coords, grow: float, shift_y: np.ndarray | float = 0.0) -> np.ndarray:
        """Whether each point lies inside the loft with its semi-axes grown by ``grow`` mm;
        fast for knee-frame coordinates, as it compares x with a half width per (z, y)."""
        ax, ay, cx, cy = (np.interp(p.z, self.z, knots).astype(np.float32)
                          for knots in (self.ax, self.ay, self.cx, self.cy))
        v = (p.y - cy - shift_y) / (ay + grow)
        half_width = (ax + grow) * np.sqrt(np.clip(1.0 - v * v, 0.0, None))
        half_width[np.abs(v) > 1.0] = -1.0
        return np.abs(p.x - cx) <= half_width


def _capsule(p: _Coords, a, b, radius_a: float, radius_b: float) -> np.ndarray:
    """Signed distance to a segment a-b thickened by a radius that varies linearly."""
    a = [float(v) for v in a]
    ab = [float(v) - u for v, u in zip(b, a, strict=True)]
    pa = (p.x - a[0], p.y - a[1], p.z - a[2])
    length2 = ab[0] ** 2 + ab[1] ** 2 + ab[2] ** 2
    t = np.clip((pa[0] * ab[0] + pa[1] * ab[1] + pa[2] * ab[2]) / length2, 0.0, 1.0)
    d2 = (pa[0] - t * ab[0]) ** 2 + (pa[1] - t * ab[1]) ** 2 + (pa[2] - t * ab[2]) ** 2
    return np.sqrt(d2) - (float(radius_a) + t * float(radius_b - radius_a))


def _ellipse_bounds(centre, semi, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    return (np.subtract(centre, semi) - margin, np.add(centre, semi) + margin)


def _bezier(a, control, b, count: int) -> np.ndarray:
    """``count`` points along the quadratic Bezier curve a-control-b."""
    t = np.linspace(0.0, 1.0, count)[:, None]
    return ((1 - t) ** 2 * np.asarray(a) + 2 * t * (1 - t) * np.asarray(control)
            + t ** 2 * np.asarray(b))


def _turn_yz(points: np.ndarray, about, angle_deg: float) -> np.ndarray:
    """Rotate points in the sagittal (y, z) plane about ``about``; positive turns +z to +y."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rel = np.asarray(points, float) - about
    turned = rel.copy()
    turned[..., 1] = rel[..., 1] * c + rel[..., 2] * s
    turned[..., 2] = -rel[..., 1] * s + rel[..., 2] * c
    return turned + about


# ------------------------------------------------------------------------------- anatomy
# Nominal millimetres; (centre, semi-axes) for ellipsoids. Femur-frame shapes are marked.

_FC, _TC, _PC = FEMORAL_CARTILAGE_MM, TIBIAL_CARTILAGE_MM, PATELLAR_CARTILAGE_MM

# Femur (femur frame). Each condyle is a distal-anterior lobe and a rounder posterior one.
_CONDYLE_LOBES = (
    ((20.0, -4.0, _FC + 25.0), (13.5, 24.0, 25.0)),  # medial
    ((21.0, 12.0, _FC + 21.0), (13.0, 22.0, 21.0)),
    ((-20.0, -4.0, _FC + 24.0), (13.0, 24.0, 24.0)),  # lateral
    ((-21.0, 13.0, _FC + 20.0), (12.5, 20.0, 20.0)),
)
_FEMUR_SHAFT = _Loft(z=(26.0, 40.0, 55.0, 75.0, 100.0, 250.0),
                     cx=(0.0, 0.0, 0.0, 1.0, 2.0, 2.0), cy=(4.0, 1.0, 0.0, 0.0, 1.0, 2.0),
                     ax=(31.0, 33.0, 27.0, 18.0, 14.5, 14.0),
                     ay=(22.0, 21.0, 18.0, 15.5, 14.5, 14.0))
_TROCHLEA = ((0.0, -6.0, 32.0), (34.0, 22.0, 24.0))
_TROCHLEAR_GROOVE = ((-2.0, -36.0, 38.0), (11.0, 12.0, 26.0))
# The intercondylar notch: an elliptic tunnel under Blumensaat's line, which passes through
# (y, z) at the given slope (deg); its half width and its height below the roof line.
_NOTCH_ROOF = ((17.0, 27.0), 40.0)
_NOTCH_SEMI = (11.0, 22.0)
_FLEXION_PIVOT = (6.0, _FC + 24.0)  # (y, z) of the condyles' flexion axis

# Patella and its tendons
_PATELLA = ((-2.0, -40.0, 37.0), (21.0, 11.0, 20.0))
_PATELLAR_TENDON = ((-2.0, -43.0, 20.0), (-4.0, -21.0, -27.0))  # lower pole to tuberosity
_QUADRICEPS_TENDON = ((-2.0, -46.0, 52.0), (0.0, -38.0, 250.0))  # upper end: femur frame

# Tibia and fibula (knee frame)
_TIBIA_SHAFT = _Loft(z=(-250.0, -100.0, -70.0, -45.0, -30.0, -15.0, -_TC),
                     cx=(2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0),
                     cy=(3.0, 3.0, 3.0, 4.0, 5.0, 4.0, 4.0),
                     ax=(14.0, 14.5, 16.0, 21.0, 29.0, 37.0, 38.0),
                     ay=(14.0, 14.5, 15.5, 18.0, 21.0, 24.5, 25.0))
_MEDIAL_SPINE = ((4.5, 3.0, -_TC), (3.8, 7.0, 9.0))
_LATERAL_SPINE = ((-4.5, 5.0, -_TC), (3.8, 7.0, 7.5))
_TUBEROSITY = ((-4.0, -15.0, -32.0), (11.0, 7.0, 18.0))
_FIBULAR_HEAD = ((-36.0, 24.0, -26.0), (10.0, 10.0, 12.0))
_FIBULA_SHAFT = _Loft(z=(-250.0, -60.0, -32.0), cx=(-33.0, -35.0, -36.0),
                      cy=(22.0, 24.0, 24.0), ax=(6.5, 7.0, 8.5), ay=(6.5, 7.0, 8.5))

# Cartilage-covered tibial plateaus: (centre x, y), semi-axes (x, y)
_MEDIAL_PLATEAU = ((19.0, 4.0), (15.5, 21.5))
_LATERAL_PLATEAU = ((-20.0, 5.0), (14.5, 18.0))

# Soft tissue (knee frame): the muscle envelope (deep fascia) of the leg
_LEG = _Loft(z=(-250.0, -110.0, -60.0, -20.0, 20.0, 60.0, 110.0, 250.0),
             cx=(0.0,) * 8, cy=(10.0, 10.0, 6.0, 1.0, -2.0, -2.0, 2.0, 3.0),
             ax=(42.0, 44.0, 44.0, 43.0, 44.0, 48.0, 54.0, 58.0),
             ay=(46.0, 49.0, 49.0, 50.0, 52.0, 52.0, 53.0, 56.0))
_NO_MUSCLE = ((0.0, -30.0, 12.0), (70.0, 36.0, 48.0))  # front and sides of the joint
_POPLITEAL_FAT = ((0.0, 38.0, 10.0), (17.0, 13.0, 60.0))
_HOFFA = ((0.0, -25.0, 3.0), (24.0, 13.0, 15.0))  # behind the patellar tendon
_SUPRAPATELLAR_FAT = ((0.0, -37.0, 64.0), (17.0, 5.0, 13.0))  # femur frame
_PREFEMORAL_FAT = ((0.0, -20.0, 66.0), (20.0, 4.0, 22.0))  # femur frame
_POPLITEAL_ARTERY = ((1.0, 34.0, -250.0), (2.0, 34.0, 250.0), 3.0)
_POPLITEAL_VEIN = ((6.0, 38.0, -250.0), (7.0, 38.0, 250.0), 4.0)

# Cruciate ligaments: footprints and radii along the ligament (tibial end first)
_ACL_TIBIAL = (-1.5, -8.0, -_TC)
_ACL_FEMORAL = (-7.5, 16.0, 19.0)  # femur frame: inner wall of the lateral condyle
_ACL_RADII = ((0.0, 0.15, 0.5, 0.85, 1.0), (4.8, 3.9, 3.3, 3.6, 4.0))
_PCL_FEMORAL = (6.5, -4.0, 14.0)  # femur frame: outer wall of the medial condyle
_PCL_CONTROL = (4.0, 20.0, 10.0)
_PCL_TIBIAL = (1.5, 27.0, -12.0)
_PCL_RADII = ((0.0, 0.5, 1.0), (5.0, 4.6, 4.2))
_MCL = ((37.0, 3.0, 28.0), (39.5, 3.0, 0.0), (35.0, 1.0, -25.0), (25.0, -2.0, -55.0))
_LCL = ((-37.0, 6.0, 26.0), (-40.5, 12.0, 2.0), (-40.0, 22.0, -18.0))

# Bone bruises (pivot-shift pattern of an ACL tear)
_BRUISE_FEMUR = ((-21.0, -2.0, _FC + 7.0), (11.0, 13.0, 9.0))  # femur frame
_BRUISE_TIBIA = ((-22.0, 18.0, -9.0), (12.0, 10.0, 9.0))


@dataclass(frozen=True)
class _Meniscus:
    """A C-shaped wedge on a tibial plateau: thin inner edge, thick rim, open to the middle.

    ``semi`` is the rim ellipse; widths are mm at the anterior horn, the body and the
    posterior horn; ``opening`` is the direction (deg, 0 = +x) and half angle of the gap.
    """

    tissue: int
    centre: tuple[float, float]
    semi: tuple[float, float]
    widths: tuple[float, float, float]
    opening: tuple[float, float]
    height: float
    plateau_semi: tuple[float, float]

    def mask(self, p: _Coords) -> np.ndarray:
        u = (p.x - self.centre[0]) / self.semi[0]
        v = (p.y - self.centre[1]) / self.semi[1]
        rho = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u)
        anterior, body, posterior = self.widths
        width = body + np.where(v > 0, posterior - body, body - anterior) * np.sin(phi)
        reach = np.hypot(self.semi[0] * np.cos(phi), self.semi[1] * np.sin(phi))
        inner = 1.0 - width / reach
        s = (rho - inner) / (1.0 - inner)
        off_gap = np.abs(np.angle(np.exp(1j * (phi - math.radians(self.opening[0])))))
        taper = np.clip((off_gap - math.radians(self.opening[1])) / 0.5, 0.0, 1.0)
        top = self.height * np.sqrt(np.clip(s, 0.0, 1.0)) * (0.45 + 0.55 * taper)
        on_plateau = (u * self.semi[0] / self.plateau_semi[0]) ** 2 + (
            v * self.semi[1] / self.plateau_semi[1]) ** 2 <= 1.0
        bottom = np.where(on_plateau, 0.0, -_TC)
        ring = (rho <= 1.0) & (s >= 0.0) & (taper > 0.0)
        return ring & (p.z >= bottom) & (p.z <= top)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = (self.centre[0] - self.semi[0], self.centre[1] - self.semi[1], -_TC)
        hi = (self.centre[0] + self.semi[0], self.centre[1] + self.semi[1], self.height)
        return np.array(lo), np.array(hi)


_MENISCI = (
    _Meniscus(_T["medial_meniscus"], centre=(19.0, 4.0), semi=(17.5, 24.0),
              widths=(7.0, 10.0, 13.0), opening=(180.0, 50.0), height=6.0,
              plateau_semi=_MEDIAL_PLATEAU[1]),
    _Meniscus(_T["lateral_meniscus"], centre=(-20.0, 5.0), semi=(16.5, 20.5),
              widths=(10.0, 10.0, 10.0), opening=(0.0, 22.0), height=6.0,
              plateau_semi=_LATERAL_PLATEAU[1]),
)


def _femur(p: _Coords) -> np.ndarray:
    """Distal femur (femur frame): condyles, metaphysis and shaft, trochlea with its groove,
    less the intercondylar notch."""
    condyles = functools.reduce(np.minimum, (_ellipsoid(p, *lobe) for lobe in _CONDYLE_LOBES))
    trochlea = np.maximum(_ellipsoid(p, *_TROCHLEA), -_ellipsoid(p, *_TROCHLEAR_GROOVE))
    bone = np.minimum(np.minimum(condyles, _FEMUR_SHAFT.distance(p)), trochlea)
    return np.maximum(bone, -_notch(p))


def _notch(p: _Coords) -> np.ndarray:
    """The intercondylar notch (femur frame): an arch between the condyles whose top runs
    along Blumensaat's line, open to the back and to the joint."""
    (y0, z0), slope = _NOTCH_ROOF
    c, s = math.cos(math.radians(slope)), math.sin(math.radians(slope))
    half_width, height = _NOTCH_SEMI
    above_roof = (p.z - z0) * c - (p.y - y0) * s
    u, v = p.x / half_width, (above_roof + height) / height
    k0 = np.sqrt(u * u + v * v)
    k1 = np.sqrt((u / half_width) ** 2 + (v / height) ** 2)
    return k0 * (k0 - 1.0) / (k1 + 1e-6)


def _femoral_articular(p: _Coords) -> np.ndarray:
    """Where the femur carries cartilage (femur frame): the condyles' weight-bearing and
    posterior surfaces and the trochlea."""
    low_or_back = (p.z < _FC + 26.0) | ((p.y > 14.0) & (p.z < _FC + 40.0))
    condyles = low_or_back & (np.abs(np.abs(p.x) - 20.5) < 12.5)
    trochlea = (p.y < -10.0) & (p.z > 6.0) & (p.z < 58.0) & (np.abs(p.x) < 28.0)
    return condyles | trochlea


def _tibia(p: _Coords) -> np.ndarray:
    spines = np.minimum(_ellipsoid(p, *_MEDIAL_SPINE), _ellipsoid(p, *_LATERAL_SPINE))
    return np.minimum(np.minimum(_TIBIA_SHAFT.distance(p), spines),
                      _ellipsoid(p, *_TUBEROSITY))


def _fibula(p: _Coords) -> np.ndarray:
    return np.minimum(_ellipsoid(p, *_FIBULAR_HEAD), _FIBULA_SHAFT.distance(p))


def _patella(p: _Coords) -> np.ndarray:
    return _ellipsoid(p, *_PATELLA)


# Each bone as parts whose union it is: (signed distance, nominal bounding box, frame). A
# shaft is its own part, so the detailed distal shapes are evaluated only near the joint.
_BONES = {
    "femur": ((_femur, ((-42.0, -36.0, _FC - 6.0), (42.0, 42.0, 55.0)), "femur"),
              (_FEMUR_SHAFT.distance, ((-36.0, -24.0, 50.0), (36.0, 26.0, 250.0)), "femur")),
    "tibia": ((_tibia, ((-42.0, -32.0, -55.0), (42.0, 36.0, 8.0)), "knee"),
              (_TIBIA_SHAFT.distance, ((-20.0, -18.0, -250.0), (24.0, 26.0, -50.0)), "knee")),
    "fibula": ((_fibula, ((-47.0, 13.0, -250.0), (-25.0, 35.0, -13.0)), "knee"),),
    "patella": ((_patella, _ellipse_bounds(*_PATELLA, _PC + 3.0), "knee"),),
}


def _on_plateau(p: _Coords, plateau) -> np.ndarray:
    (cx, cy), (ax, ay) = plateau
    return ((p.x - cx) / ax) ** 2 + ((p.y - cy) / ay) ** 2 <= 1.0


# ------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class _Flexion:
    """The femur frame relative to the knee frame: a turn in the sagittal plane about the
    condyles' axis, lifted so the turned condyles still rest on the plateau."""

    angle_deg: float

    @property
    def lift(self) -> float:
        """The rise that keeps the turned condyles' lowest point at the cartilage depth."""
        c, s = math.cos(math.radians(self.angle_deg)), math.sin(math.radians(self.angle_deg))
        lowest = min(self._turn(centre)[2] - math.hypot(semi[1] * s, semi[2] * c)
                     for centre, semi in _CONDYLE_LOBES)
        return _FC - lowest

    def to_knee(self, points) -> np.ndarray:
        return self._turn(points) + (0.0, 0.0, self.lift)

    def _turn(self, points) -> np.ndarray:
        return _turn_yz(points, np.array([0.0, *_FLEXION_PIVOT]), self.angle_deg)

    def to_femur(self, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(math.radians(self.angle_deg)), math.sin(math.radians(self.angle_deg))
        dy, dz = y - _FLEXION_PIVOT[0], z - _FLEXION_PIVOT[1] - self.lift
        return _FLEXION_PIVOT[0] + c * dy - s * dz, _FLEXION_PIVOT[1] + s * dy + c * dz


@dataclass(frozen=True)
class _Region:
    index: tuple[slice, slice, slice]
    p: _Coords


class _Canvas:
    """The tissue grid of one case in the knee frame (knee-frame mm, axis order z, y, x),
    into which shapes given in nominal mm are painted."""

    def __init__(self, case: KneeCase, spacing: float):
        self.spacing = spacing
        self.stretch = np.array([case.scale * case.width, case.scale, case.scale])
        self.flexion = _Flexion(case.flexion_deg)
        self.lo, hi = self._box(case)
        shape_xyz = np.floor((hi - self.lo) / spacing).astype(int) + 1
        self.tissue = np.zeros(tuple(shape_xyz[::-1]), np.uint8)
        self._distances: dict[str, list[tuple[_Region, np.ndarray]]] = {}

    def _box(self, case: KneeCase) -> tuple[np.ndarray, np.ndarray]:
        """Knee-frame box holding the whole leg between the grid's top and bottom."""
        half_height = GRID_HALF_HEIGHT_MM / self.stretch[2]
        z = np.linspace(-half_height, half_height, 64)
        tilt = self.thigh_tilt(z)
        grow = case.fat_mm + SKIN_MM + 2.0
        ax, ay = np.interp(z, _LEG.z, _LEG.ax) + grow, np.interp(z, _LEG.z, _LEG.ay) + grow
        cy = np.interp(z, _LEG.z, _LEG.cy) + tilt
        lo = np.array([-ax.max(), (cy - ay).min(), -half_height]) * self.stretch
        hi = np.array([ax.max(), (cy + ay).max(), half_height]) * self.stretch
        return lo, hi

    def thigh_tilt(self, z: np.ndarray) -> np.ndarray:
        """Posterior shift of the thigh's soft tissue that follows the flexed femur."""
        return np.maximum(z - _FLEXION_PIVOT[1], 0.0) * math.tan(
            math.radians(self.flexion.angle_deg))

    def region(self, lo, hi, frame: str = "knee") -> _Region | None:
        """The voxels a shape within the nominal box lo-hi (in ``frame``) can touch, with
        their nominal coordinates in that frame; None when the box misses the grid."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        if frame == "femur":
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                                for z in (lo[2], hi[2])])
            corners = self.flexion.to_knee(corners)
            lo, hi = corners.min(axis=0), corners.max(axis=0)
        shape_xyz = np.array(self.tissue.shape[::-1])
        first = np.clip(np.floor((lo * self.stretch - self.lo) / self.spacing), 0, shape_xyz)
        last = np.clip(np.ceil((hi * self.stretch - self.lo) / self.spacing) + 1, 0, shape_xyz)
        first, last = first.astype(int), last.astype(int)
        if np.any(last <= first):
            return None
        axes = [((self.lo[a] + self.spacing * np.arange(first[a], last[a])) / self.stretch[a])
                .astype(np.float32) for a in range(3)]
        x, y, z = axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]
        if frame == "femur":
            y, z = self.flexion.to_femur(y, z)
        index = tuple(slice(first[a], last[a]) for a in (2, 1, 0))
        return _Region(index, _Coords(x, y, z))

    def whole(self) -> _Region:
        """The whole grid as a region, knee frame."""
        size = np.array(self.tissue.shape[::-1]) * self.spacing
        return self.region(self.lo / self.stretch, (self.lo + size) / self.stretch)

    def fill(self, region: _Region | None, tissue: int, mask: np.ndarray,
             over: tuple[int, ...] | None = None) -> None:
        """Paint ``tissue`` where ``mask`` holds (only over the ``over`` tissues if given)."""
        if region is None:
            return
        target = self.tissue[region.index]
        mask = np.broadcast_to(mask, target.shape)
        if over is not None:
            mask = mask & np.isin(target, over)
        np.copyto(target, np.uint8(tissue), where=mask)

    def tube(self, path: np.ndarray, radii: np.ndarray, tissue: int, grow: float = 0.0,
             flat: float = 1.0) -> None:
        """Paint a tube along a knee-frame polyline, segment by segment; ``flat`` widens it
        in x by that factor (a flat band such as a tendon)."""
        squeeze = np.array([1.0 / flat, 1.0, 1.0])
        for a, b, ra, rb in zip(path[:-1], path[1:], radii[:-1], radii[1:], strict=True):
            reach = max(ra, rb) + grow
            region = self.region(np.minimum(a, b) - reach * flat, np.maximum(a, b) + reach * flat)
            if region is None:
                continue
            p = _Coords(region.p.x / flat, region.p.y, region.p.z)
            inside = _capsule(p, a * squeeze, b * squeeze, ra + grow, rb + grow) <= 0.0
            self.fill(region, tissue, inside)

    def layers(self, bone: str, layers) -> None:
        """Paint a bone as nested layers (outside distance mm, tissue, zone or None), the
        outermost first; a zone, a function of the coordinates, limits its layer. The
        bone's distances are kept for its later layers."""
        if bone not in self._distances:
            self._distances[bone] = [(region, distance(region.p))
                                     for distance, bounds, frame in _BONES[bone]
                                     if (region := self.region(*bounds, frame=frame))]
        for level, tissue, zone in layers:
            for region, d in self._distances[bone]:
                mask = d <= level
                self.fill(region, tissue, mask if zone is None else mask & zone(region.p))


# ------------------------------------------------------------------------------ painting


def _paint_soft_tissue(canvas: _Canvas, case: KneeCase) -> None:
    """Skin, subcutaneous fat and muscle of the leg; fat pads and popliteal vessels."""
    region = canvas.whole()
    tilt = canvas.thigh_tilt(region.p.z)
    for grow, tissue in ((case.fat_mm + SKIN_MM, "skin"), (case.fat_mm, "subcutaneous_fat"),
                         (0.0, "muscle")):
        canvas.fill(region, _T[tissue], _LEG.inside(region.p, grow, shift_y=tilt))
    front = canvas.region(*_ellipse_bounds(*_NO_MUSCLE))
    canvas.fill(front, _T["subcutaneous_fat"], _ellipsoid(front.p, *_NO_MUSCLE) <= 0.0,
                over=(_T["muscle"],))
    fossa = canvas.region(*_ellipse_bounds(*_POPLITEAL_FAT))
    canvas.fill(fossa, _T["deep_fat"], _ellipsoid(fossa.p, *_POPLITEAL_FAT) <= 0.0,
                over=(_T["muscle"],))
    for pad in (_SUPRAPATELLAR_FAT, _PREFEMORAL_FAT):
        region = canvas.region(*_ellipse_bounds(*pad), frame="femur")
        canvas.fill(region, _T["deep_fat"], _ellipsoid(region.p, *pad) <= 0.0)
    for start, end, radius in (_POPLITEAL_ARTERY, _POPLITEAL_VEIN):
        canvas.tube(np.array([start, end]), np.array([radius, radius]),
                    _T["popliteal_vessels"])
    region = canvas.region(*_ellipse_bounds(*_HOFFA))
    (_, y0, z0), (_, y1, z1) = _PATELLAR_TENDON
    behind_tendon = (region.p.y - y0) * (z0 - z1) - (region.p.z - z0) * (y0 - y1) > 0.0
    canvas.fill(region, _T["hoffa_fat_pad"], (_ellipsoid(region.p, *_HOFFA) <= 0.0)
                & behind_tendon)


def _paint_joint_fluid(canvas: _Canvas, case: KneeCase, acl: _Acl) -> None:
    """Notch fat, then the fluid of the joint: film over the cartilage, recesses, sheaths."""
    fluid = _T["joint_fluid"]
    region = canvas.region((-_NOTCH_SEMI[0], -12.0, _FC - 4.0), (_NOTCH_SEMI[0], 28.0, 45.0),
                           frame="femur")
    canvas.fill(region, _T["deep_fat"], _notch(region.p) <= 0.0)
    effusion = case.effusion_mm
    recess = ((0.0, -28.0, 58.0), (22.0, 1.2 + 0.8 * effusion, 16.0 + 2.0 * effusion))
    recesses = [recess] + [((x, 34.0, 24.0), (11.0, 3.0 + 0.5 * effusion, 14.0))
                           for x in (-21.0, 21.0)]
    for shape in recesses:
        region = canvas.region(*_ellipse_bounds(*shape), frame="femur")
        canvas.fill(region, fluid, _ellipsoid(region.p, *shape) <= 0.0)
    film = FLUID_FILM_MM + 0.25 * effusion
    canvas.layers("femur", [(_FC + film, fluid, _femoral_articular)])
    canvas.layers("patella", [(_PC + film, fluid, _patellar_articular)])
    acl.paint_sheath(canvas)
    pcl = _pcl_path(canvas.flexion)
    canvas.tube(pcl, _radii(_PCL_RADII, len(pcl)), fluid, grow=0.9)


def _patellar_articular(p: _Coords) -> np.ndarray:
    (_, cy, cz), (_, _, az) = _PATELLA
    return (p.y > cy + 3.0) & (np.abs(p.z - cz) < 0.8 * az)


def _paint_cartilage_and_menisci(canvas: _Canvas) -> None:
    for plateau in (_MEDIAL_PLATEAU, _LATERAL_PLATEAU):
        (cx, cy), (ax, ay) = plateau
        region = canvas.region((cx - ax, cy - ay, -_TC - 1.0), (cx + ax, cy + ay, 0.0))
        canvas.fill(region, _T["tibial_cartilage"],
                    _on_plateau(region.p, plateau) & (region.p.z <= 0.0))
    canvas.layers("patella", [(_PC, _T["patellar_cartilage"], _patellar_articular)])
    for meniscus in _MENISCI:
        region = canvas.region(*meniscus.bounds())
        canvas.fill(region, meniscus.tissue, meniscus.mask(region.p))
    canvas.layers("femur", [(_FC, _T["femoral_cartilage"], _femoral_articular)])


def _paint_ligaments(canvas: _Canvas, acl: _Acl) -> None:
    acl.paint(canvas)
    pcl = _pcl_path(canvas.flexion)
    canvas.tube(pcl, _radii(_PCL_RADII, len(pcl)), _T["pcl"])
    for points, radius, tissue in ((_MCL, 1.6, "mcl"), (_LCL, 2.3, "lcl")):
        path = np.array(points)
        canvas.tube(path, np.full(len(path), radius), _T[tissue])
    canvas.tube(np.array(_PATELLAR_TENDON), np.array([2.6, 2.8]), _T["patellar_tendon"],
                flat=5.0)
    lower, upper = _QUADRICEPS_TENDON
    quadriceps = np.array([lower, canvas.flexion.to_knee(np.array(upper))])
    canvas.tube(quadriceps, np.array([3.2, 3.6]), _T["quadriceps_tendon"], flat=5.0)


def _paint_bones(canvas: _Canvas, case: KneeCase) -> None:
    for bone in ("fibula", "tibia", "femur", "patella"):
        canvas.layers(bone, [(0.0, CORTEX[bone], None), (-CORTEX_MM, _T[bone], None)])
    if case.bone_bruise:
        _paint_bruises(canvas, np.random.default_rng([case.seed, 0xB2]))


def _paint_bruises(canvas: _Canvas, rng: np.random.Generator) -> None:
    """Ill-defined marrow oedema: a few overlapping blobs around each bruise site."""
    for (centre, semi), bone, frame in ((_BRUISE_FEMUR, "femur", "femur"),
                                        (_BRUISE_TIBIA, "tibia", "knee")):
        for _ in range(3):
            blob = (tuple(float(v) for v in np.add(centre, rng.normal(0.0, 3.0, 3))),
                    tuple(float(v) for v in np.multiply(semi, rng.uniform(0.5, 0.85, 3))))
            region = canvas.region(*_ellipse_bounds(*blob), frame=frame)
            canvas.fill(region, _T["bone_marrow_edema"], _ellipsoid(region.p, *blob) <= 0.0,
                        over=(_T[bone],))


def _radii(profile, count: int) -> np.ndarray:
    return np.interp(np.linspace(0.0, 1.0, count), *profile)


def _pcl_path(flexion: _Flexion) -> np.ndarray:
    femoral = flexion.to_knee(np.array(_PCL_FEMORAL))
    return _bezier(_PCL_TIBIAL, _PCL_CONTROL, femoral, 14)


@dataclass(frozen=True)
class _Acl:
    """The ACL of a case in the knee frame: a taut band from the anterior tibial eminence to
    the lateral condyle's inner wall; torn, a fluid-filled gap between two wavy stumps."""

    tibial: np.ndarray
    femoral: np.ndarray
    torn: bool
    tear_at: float
    gap_mm: float

    @classmethod
    def for_case(cls, case: KneeCase, flexion: _Flexion) -> _Acl:
        femoral = flexion.to_knee(np.array(_ACL_FEMORAL))
        return cls(np.array(_ACL_TIBIAL), femoral, case.acl_torn, case.tear_at, case.gap_mm)

    @property
    def length(self) -> float:
        return float(np.linalg.norm(self.femoral - self.tibial))

    def point(self, t: float) -> np.ndarray:
        return self.tibial + t * (self.femoral - self.tibial)

    def paint_sheath(self, canvas: _Canvas) -> None:
        """Synovial fluid around the ligament; around a torn one, a cuff that swells over
        the gap and fills it."""
        t = np.linspace(0.0, 1.0, 16)
        path = np.array([self.point(v) for v in t])
        cuff = 1.0 + (2.5 * np.exp(-(((t - self.tear_at) * self.length / 8.0) ** 2))
                      if self.torn else 0.0)
        canvas.tube(path, np.interp(t, *_ACL_RADII) + cuff, _T["joint_fluid"])

    def paint(self, canvas: _Canvas) -> None:
        if not self.torn:
            path = np.array([self.point(t) for t in np.linspace(0.0, 1.0, 12)])
            canvas.tube(path, _radii(_ACL_RADII, len(path)), _T["acl"])
            return
        # each stump's rounded end stops half the gap from the tear, so the gap is clear;
        # the tibial stump sags toward the plateau, the femoral one hangs back and down
        radius_at_tear = 1.15 * float(np.interp(self.tear_at, *_ACL_RADII))
        reach = (self.gap_mm / 2.0 + radius_at_tear) / self.length
        for start, end, anchor, turn in ((0.0, self.tear_at - reach, self.tibial, 22.0),
                                         (1.0, self.tear_at + reach, self.femoral, -14.0)):
            t = np.linspace(start, end, 12)
            path = _turn_yz(np.array([self.point(v) for v in t]), anchor, turn)
            along = np.abs(t - start) / abs(end - start)
            path[:, 2] += 1.2 * np.sin(3.0 * math.pi * along) * along
            radii = 1.15 * np.interp(t, *_ACL_RADII)
            canvas.tube(path, radii, ACL_STUMP)


# ------------------------------------------------------------------------------ the volume


@dataclass
class KneeVolume:
    """One case drawn as tissue values on an isotropic grid placed in patient space.

    ``tissue[k, j, i]`` is the voxel centred at ``origin + spacing * axes @ (i, j, k)``;
    ``axes`` (3 x 3, orthonormal, columns = patient directions of the i, j, k index axes)
    carries the case's pose, mirror included (determinant -1 for a left knee). The grid
    holds the whole girth of the leg with air around it, from GRID_HALF_HEIGHT_MM below to
    as far above the joint line; beyond its top and bottom the leg is taken to go on
    unchanged. ``labels`` gives the label value of every voxel (see LABELS).

    ``centre`` is the joint centre (patient mm) to centre fields of view on; ``extent_mm``
    the size along patient x, y, z of the axis-aligned box around the drawn body (its z
    size is the grid's cut of the leg, 2 x GRID_HALF_HEIGHT_MM tilted by the pose);
    ``landmarks`` are named patient points: "joint_centre", "acl_tibial", "acl_femoral"
    (the ACL's footprints) and, for a torn ACL, "acl_tear" (the middle of its gap).
    """

    case: KneeCase
    tissue: np.ndarray
    origin: np.ndarray
    spacing: float
    axes: np.ndarray
    centre: np.ndarray
    extent_mm: np.ndarray
    landmarks: dict[str, np.ndarray]

    @cached_property
    def labels(self) -> np.ndarray:
        """Label values (uint8, same axes as ``tissue``)."""
        return TISSUE_LABEL[self.tissue]

    def grid_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) grid index of patient points (..., 3)."""
        return (np.asarray(points, float) - self.origin) @ self.axes / self.spacing

    def label_at(self, points: np.ndarray) -> np.ndarray:
        """Label of the nearest voxel at each patient point (..., 3); beyond the grid, that
        of the nearest voxel on its edge (air around the leg; the leg above and below)."""
        index = np.rint(self.grid_index(points)).astype(np.intp)
        index = np.clip(index, 0, np.array(self.tissue.shape[::-1]) - 1)
        return TISSUE_LABEL[self.tissue[index[..., 2], index[..., 1], index[..., 0]]]


def pose_matrix(case: KneeCase) -> np.ndarray:
    """Patient directions (columns) of the knee frame's x, y, z axes for this case."""
    mirror = np.diag([-1.0 if case.side == "L" else 1.0, 1.0, 1.0])
    yaw, varus = math.radians(case.yaw_deg), math.radians(case.varus_deg)
    about_z = np.array([[math.cos(yaw), -math.sin(yaw), 0.0],
                        [math.sin(yaw), math.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
    about_y = np.array([[math.cos(varus), 0.0, math.sin(varus)], [0.0, 1.0, 0.0],
                        [-math.sin(varus), 0.0, math.cos(varus)]])
    return about_z @ about_y @ mirror


def build_volume(case: KneeCase, spacing_mm: float = DEFAULT_SPACING_MM) -> KneeVolume:
    """Draw ``case`` on an isotropic grid of ``spacing_mm`` (default 0.6 mm)."""
    if not 0.2 <= spacing_mm <= 3.0:
        raise ValueError(f"spacing_mm must lie in 0.2..3 mm, not {spacing_mm}")
    canvas = _Canvas(case, spacing_mm)
    acl = _Acl.for_case(case, canvas.flexion)
    _paint_soft_tissue(canvas, case)
    _paint_joint_fluid(canvas, case, acl)
    _paint_cartilage_and_menisci(canvas)
    _paint_ligaments(canvas, acl)
    _paint_bones(canvas, case)

    axes = pose_matrix(case)
    centre = np.asarray(case.centre, float)
    origin = centre + axes @ canvas.lo

    def to_patient(nominal: np.ndarray) -> np.ndarray:
        return centre + axes @ (np.asarray(nominal) * canvas.stretch)

    landmarks = {"joint_centre": centre.copy(), "acl_tibial": to_patient(acl.tibial),
                 "acl_femoral": to_patient(acl.femoral)}
    if acl.torn:
        landmarks["acl_tear"] = to_patient(acl.point(acl.tear_at))
    return KneeVolume(case=case, tissue=canvas.tissue, origin=origin, spacing=spacing_mm,
                      axes=axes, centre=centre, extent_mm=_body_extent(canvas.tissue, axes,
                                                                        spacing_mm),
                      landmarks=landmarks)


def _body_extent(tissue: np.ndarray, axes: np.ndarray, spacing: float) -> np.ndarray:
    """Size along patient x, y, z of the box around every non-air voxel."""
    spans = []
    for axis in (2, 1, 0):  # i, j, k
        others = tuple(a for a in range(3) if a != axis)
        occupied = np.flatnonzero(np.any(tissue, axis=others))
        spans.append((occupied[0], occupied[-1]) if occupied.size else (0, 0))
    corners = np.array([[i, j, k] for i in spans[0] for j in spans[1] for k in spans[2]],
                       float) * spacing
    patient = corners @ axes.T
    return patient.max(axis=0) - patient.min(axis=0)
