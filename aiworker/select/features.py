"""Derived series features: what a series is, worked out from its headers alone.

Scanners differ in what they write, and descriptions are often empty or generic ("Series
3", "t2_tse"), so every feature is derived first from acquisition attributes, and a
description keyword is used only where those are silent or ambiguous. Each feature comes
with its basis (``SeriesFeatures.basis``): the evidence, in words, that rule verdicts quote.

- **plane**: from the normal of ImageOrientationPatient (:mod:`aiworker.select.geometry`);
  ``obliquity_deg`` is its angle to the nearest axis; beyond ``oblique_above_deg`` the plane
  is ``oblique``; slices in several planes (a tri-planar localizer) make it ``mixed``.
- **weighting** (PD, T1, T2, T2*, STIR, FLAIR or unknown): inversion recovery by its TI
  (short TI: STIR; long: FLAIR; else T1); gradient echo by TE (T2* from 10 ms); spin echo by
  TR and TE (short TR and TE up to 30 ms: T1; long TR and TE up to 50 ms: PD; from 60 ms:
  T2). Only when the timing is missing or falls between two classes does the Enhanced MR
  AcquisitionContrast, then a description keyword, decide.
- **fat_suppressed**: ScanOptions ``FS`` (Siemens, GE and Philips write the defined term
  for spectral fat saturation); Enhanced MR SpectrallySelectedSuppression ``FAT``;
  inversion recovery with a short TI (STIR); a Dixon water image; or a keyword (FS, FATSAT,
  SPAIR, SPIR, STIR, TIRM, Dixon water) in the description. Look-alikes are not fat
  suppression: GE ``SAT_GEMS`` and Siemens ``SAT1``/``SAT2`` are spatial saturation bands,
  GE ``FSA_GEMS``/``FSP_GEMS``/``FSS_GEMS``... name the readout direction, and ``FSE`` is
  fast spin echo.
- **localizer**: ImageType ``LOCALIZER``, a localizer name (localizer, scout, survey, 3-plane,
  ...), or slices in several planes.
- **original** / **derivation**: ImageType DERIVED or SECONDARY, MPR, MIP, MinIP,
  projection or reformat in ImageType or description, or a Secondary Capture SOP class.
- **slice geometry**: ``slice_count``, ``stacks``, ``rows``, ``columns``, ``pixel_spacing``,
  ``slice_thickness``, ``slice_spacing`` and ``geometry_consistent`` (parallel slices, one
  size, uniform spacing, no duplicate positions).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from aiworker.select import geometry
from aiworker.select.headers import SeriesHeaders, as_float, as_list, frames, lookup

SHORT_TR_MS = 1000.0  # up to here, TR is short (T1)
LONG_TR_MS = 1500.0  # from here, TR is long (PD, T2)
T1_MAX_TE_MS = 30.0
PD_MAX_TE_MS = 50.0
T2_MIN_TE_MS = 60.0
T2STAR_MIN_TE_MS = 10.0  # gradient echo
STIR_MAX_TI_MS = 250.0  # inversion that nulls fat: ~150 ms at 1.5 T, ~230 ms at 3 T
FLAIR_MIN_TI_MS = 1500.0

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and the multi-frame ones below it

WEIGHTING_WORDS = {
    "PD": {"PD", "PDW", "DP", "PDFS", "PDWFS", "PROTON", "INTERMEDIATE", "IW"},
    "T1": {"T1", "T1W", "T1FS", "T1WFS"},
    "T2": {"T2", "T2W", "T2FS", "T2WFS"},
    "T2*": {"T2*", "T2STAR"},
    "STIR": {"STIR", "TIRM"},
    "FLAIR": {"FLAIR"},
}
CONTRAST_WEIGHTING = {"PROTON_DENSITY": "PD", "T1": "T1", "T2": "T2", "T2_STAR": "T2*",
                      "FLUID_ATTENUATED": "FLAIR"}
FAT_SUPPRESSION_WORDS = {"FS", "FATSAT", "FSAT", "SPAIR", "SPIR", "STIR", "TIRM", "PDFS",
                         "PDWFS", "T1FS", "T2FS", "T1WFS", "T2WFS"}
FAT_SUPPRESSION_PAIRS = {("FAT", "SAT"), ("FAT", "SUP"), ("FAT", "SUPP"),
                         ("FAT", "SUPPRESSED"), ("FAT", "SUPPRESSION")}
NEGATIONS = {"NO", "NON", "WITHOUT", "W/O"}
DIXON_WORDS = {"DIXON", "MDIXON", "IDEAL", "FLEX"}
LOCALIZER_WORDS = {"LOCALIZER", "LOCALISER", "LOC", "SCOUT", "SURVEY", "PILOT", "3PLANE",
                   "TRIPLANE", "3PL", "SMARTPLAN"}
LOCALIZER_PAIRS = {("3", "PLANE"), ("TRI", "PLANE"), ("3", "PL"), ("THREE", "PLANE")}
DERIVATION_WORDS = {"MPR": "MPR", "MIP": "MIP", "MINIP": "MinIP", "MNIP": "MinIP",
                    "REFORMAT": "reformat", "REFORMATTED": "reformat"}


@dataclass(frozen=True)
class FeatureSettings:
    """The tunable limits of feature derivation (``selection`` in the node's config)."""

    oblique_above_deg: float = 30.0
    spacing_tolerance: float = 0.1  # fraction of the usual slice step


DEFAULT_SETTINGS = FeatureSettings()


@dataclass(frozen=True)
class SeriesFeatures:
    """Everything a rule can ask of a series besides its DICOM attributes."""

    modality: str | None
    manufacturer: str | None
    series_number: int | None
    acquired_at: str | None  # ISO 8601 date and time of the acquisition, as written
    multiframe: bool
    image_type: str | None  # the values of ImageType joined by backslashes
    plane: str  # sagittal | coronal | axial | oblique | mixed | unknown
    obliquity_deg: float | None
    weighting: str  # PD | T1 | T2 | T2* | STIR | FLAIR | unknown
    echo_time: float | None
    repetition_time: float | None
    inversion_time: float | None
    flip_angle: float | None
    fat_suppressed: bool
    fat_suppression: str | None  # how: "ScanOptions FS", "STIR (TI 160 ms)", ...
    localizer: bool
    original: bool
    derivation: str | None  # MPR, MIP, MinIP, reformat, secondary capture, derived...
    slice_count: int
    stacks: int
    rows: int | None
    columns: int | None
    pixel_spacing: list[float] | None
    slice_thickness: float | None
    slice_spacing: float | None
    geometry_consistent: bool
    basis: dict[str, str] = field(default_factory=dict)  # feature name -> evidence

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every feature, then ``basis``."""
        return asdict(self)

    def why(self, name: str) -> str | None:
        """The evidence behind feature ``name``, if it has any worth quoting."""
        return self.basis.get(name)


FEATURE_NAMES = tuple(f.name for f in fields(SeriesFeatures) if f.name != "basis")


@dataclass(frozen=True)
class _Acquisition:
    """The MR acquisition parameters weighting and fat suppression are read from."""

    te: float | None
    tr: float | None
    ti: float | None
    flip: float | None
    scanning: set[str]
    options: set[str]
    gradient: bool
    inversion: bool
    contrast: str | None
    suppression: str | None

    @classmethod
    def of(cls, series: SeriesHeaders) -> _Acquisition:
        ds = series.first
        scanning = {str(v).upper() for v in as_list(lookup(ds, "ScanningSequence"))}
        options = {str(v).upper() for v in as_list(lookup(ds, "ScanOptions"))}
        pulse = str(lookup(ds, "EchoPulseSequence") or "").upper()
        te = as_float(lookup(ds, "EchoTime"))
        return cls(
            te=te if te is not None else as_float(lookup(ds, "EffectiveEchoTime")),
            tr=as_float(lookup(ds, "RepetitionTime")),
            ti=as_float(lookup(ds, "InversionTime")) or as_float(lookup(ds, "InversionTimes")),
            flip=as_float(lookup(ds, "FlipAngle")),
            scanning=scanning,
            options=options,
            gradient=pulse == "GRADIENT" or ("GR" in scanning and "SE" not in scanning),
            inversion=("IR" in scanning or "IR" in options or "IR_GEMS" in options
                       or str(lookup(ds, "InversionRecovery") or "").upper() == "YES"),
            contrast=str(lookup(ds, "AcquisitionContrast") or "").upper() or None,
            suppression=str(lookup(ds, "SpectrallySelectedSuppression") or "").upper() or None,
        )

    def timing(self) -> str:
        parts = [f"{name} {value:g} ms" for name, value in
                 (("TE", self.te), ("TR", self.tr), ("TI", self.ti)) if value is not None]
        return ", ".join(parts)


def compute_features(series: SeriesHeaders, settings: FeatureSettings = DEFAULT_SETTINGS
                     ) -> SeriesFeatures:
    """Derive every feature of ``series`` from its headers (see the module docstring)."""
    ds = series.first
    image_planes = frames(series.instances)
    plane = geometry.series_plane(image_planes, settings.oblique_above_deg)
    stack = geometry.check_stacks(image_planes, settings.spacing_tolerance)
    if series.unreadable:
        total = series.unreadable + len(series.instances)
        stack = replace(stack, consistent=False,
                        basis=f"{series.unreadable} of {total} files are not readable DICOM")
    acquisition = _Acquisition.of(series)
    image_type = [str(v).upper() for v in as_list(lookup(ds, "ImageType"))]
    words = description_words(ds)
    weighting, weighting_basis = _weighting(acquisition, words)
    fat_method = _fat_suppression(acquisition, image_type, words)
    localizer, localizer_basis = _localizer(image_type, words, plane.plane)
    derivation, derivation_basis = _derivation(image_type, str(ds.get("SOPClassUID", "")), words)
    first_plane = image_planes[0] if image_planes else None
    basis = {
        "plane": plane.basis,
        "weighting": weighting_basis,
        "fat_suppressed": fat_method or "no fat suppression in ScanOptions, inversion time, "
                                        "ImageType or description",
        "localizer": localizer_basis,
        "original": f"{derivation}: {derivation_basis}" if derivation else derivation_basis,
        "geometry_consistent": stack.basis,
    }
    return SeriesFeatures(
        modality=_text(lookup(ds, "Modality")),
        manufacturer=_text(lookup(ds, "Manufacturer")),
        series_number=series.series_number,
        acquired_at=_acquired_at(ds),
        multiframe=any(h.get("PerFrameFunctionalGroupsSequence") for h in series.instances),
        image_type="\\".join(image_type) or None,
        plane=plane.plane,
        obliquity_deg=None if plane.obliquity_deg is None else round(plane.obliquity_deg, 1),
        weighting=weighting,
        echo_time=acquisition.te,
        repetition_time=acquisition.tr,
        inversion_time=acquisition.ti,
        flip_angle=acquisition.flip,
        fat_suppressed=fat_method is not None,
        fat_suppression=fat_method,
        localizer=localizer,
        original=derivation is None,
        derivation=derivation,
        slice_count=stack.slice_count,
        stacks=stack.stacks,
        rows=first_plane.rows if first_plane else None,
        columns=first_plane.columns if first_plane else None,
        pixel_spacing=(list(first_plane.pixel_spacing)
                       if first_plane and first_plane.pixel_spacing else None),
        slice_thickness=(first_plane.slice_thickness if first_plane else None),
        slice_spacing=None if stack.spacing is None else round(stack.spacing, 3),
        geometry_consistent=stack.consistent,
        basis=basis,
    )


def description_words(ds: Any) -> list[str]:
    """The upper-case words of SeriesDescription ("sag_PD-fs" gives SAG, PD, FS; ``*`` stays
    part of a word, as in T2*), or of ProtocolName when the description is empty. GE writes
    one exam-wide ProtocolName on every series, so it is only a fallback."""
    for keyword in ("SeriesDescription", "ProtocolName"):
        words = [w for w in re.split(r"[^A-Z0-9*]+", str(ds.get(keyword, "") or "").upper()) if w]
        if words:
            return words
    return []


def _pairs(words: list[str]) -> set[tuple[str, str]]:
    return set(zip(words, words[1:], strict=False))


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


# --- weighting ----------------------------------------------------------------------------


def _weighting(acq: _Acquisition, words: list[str]) -> tuple[str, str]:
    """The weighting and its basis; timing decides, hints only settle what timing leaves open."""
    timing = acq.timing()
    if acq.inversion and acq.ti:
        if acq.ti <= STIR_MAX_TI_MS:
            return "STIR", f"inversion recovery with short TI ({timing})"
        if acq.ti >= FLAIR_MIN_TI_MS:
            return "FLAIR", f"inversion recovery with long TI ({timing})"
        return "T1", f"inversion recovery ({timing})"
    if acq.gradient and acq.te is not None:
        weighting = "T2*" if acq.te >= T2STAR_MIN_TE_MS else "T1"
        return weighting, f"gradient echo ({timing})"
    candidates = _by_timing(acq.te, acq.tr)
    if len(candidates) == 1:
        return candidates[0], timing
    hint, source = _weighting_hint(acq.contrast, words)
    if candidates:
        gap = f"{timing}: between {' and '.join(candidates)}"
    elif acq.te is None or acq.tr is None:
        missing = " or ".join(n for n, v in (("TE", acq.te), ("TR", acq.tr)) if v is None)
        gap = f"{timing + '; ' if timing else ''}no {missing} in the header"
    else:
        gap = f"{timing}: no clear weighting"
    if hint and (not candidates or hint in candidates):
        return hint, f"{gap}; {source}"
    return "unknown", gap + ", and no hint in AcquisitionContrast or the description"


def _by_timing(te: float | None, tr: float | None) -> tuple[str, ...]:
    """The spin-echo weightings that TE and TR allow (one when they are clear)."""
    if te is None or tr is None:
        return ()
    if tr <= SHORT_TR_MS:
        return ("T1",) if te <= T1_MAX_TE_MS else ()
    if tr < LONG_TR_MS and te <= T1_MAX_TE_MS:
        return ("T1", "PD")
    if te <= PD_MAX_TE_MS:
        return ("PD",)
    if te >= T2_MIN_TE_MS:
        return ("T2",)
    return ("PD", "T2")


def _weighting_hint(contrast: str | None, words: list[str]) -> tuple[str | None, str]:
    if contrast in CONTRAST_WEIGHTING:
        return CONTRAST_WEIGHTING[contrast], f"AcquisitionContrast {contrast}"
    for weighting, keywords in WEIGHTING_WORDS.items():
        found = next((w for w in words if w in keywords), None)
        if found:
            return weighting, f"description says {found}"
    return None, ""


# --- fat suppression ----------------------------------------------------------------------


def _fat_suppression(acq: _Acquisition, image_type: list[str], words: list[str]) -> str | None:
    """How the series is fat-suppressed, in words, or None when nothing says it is."""
    if "FS" in acq.options:
        return "ScanOptions FS"
    if acq.suppression in ("FAT", "FAT_AND_WATER"):
        return f"SpectrallySelectedSuppression {acq.suppression}"
    if acq.inversion and acq.ti and acq.ti <= STIR_MAX_TI_MS:
        return f"STIR (inversion recovery, TI {acq.ti:g} ms)"
    if "WATER" in image_type or "W" in image_type:
        return "Dixon water image (ImageType " + "\\".join(image_type) + ")"
    return _fat_suppression_words(words)


def _fat_suppression_words(words: list[str]) -> str | None:
    for i, word in enumerate(words):
        negated = i > 0 and words[i - 1] in NEGATIONS
        if word in FAT_SUPPRESSION_WORDS and not negated:
            return f"description says {word}"
    for first, second in _pairs(words) & FAT_SUPPRESSION_PAIRS:
        return f"description says {first} {second}"
    if DIXON_WORDS & set(words) and {"W", "WATER"} & set(words):
        return "description says Dixon water"
    if "WATER" in words:
        return "description says WATER"
    return None


# --- localizer and derivation -------------------------------------------------------------


def _localizer(image_type: list[str], words: list[str], plane: str) -> tuple[bool, str]:
    if "LOCALIZER" in image_type:
        return True, "ImageType LOCALIZER"
    found = next((w for w in words if w in LOCALIZER_WORDS), None)
    if found is None:
        found = next((" ".join(p) for p in _pairs(words) & LOCALIZER_PAIRS), None)
    if found:
        return True, f"description says {found}"
    if plane == "mixed":
        return True, "slices in several planes, as in a tri-planar localizer"
    return False, "no LOCALIZER in ImageType, no localizer name, slices in one plane"


def _derivation(image_type: list[str], sop_class: str, words: list[str]
                ) -> tuple[str | None, str]:
    """What kind of derived image the series is (None for an original), and why."""
    shown = "\\".join(image_type) or "absent"
    for value in image_type:
        for marker, kind in (("MPR", "MPR"), ("MNIP", "MinIP"), ("MINIP", "MinIP"),
                             ("MIP", "MIP"), ("PROJECTION", "projection"),
                             ("REFORMAT", "reformat")):
            if marker in value:
                return kind, f"ImageType {shown}"
    if sop_class.startswith(SECONDARY_CAPTURE):
        return "secondary capture", "Secondary Capture SOP class"
    if image_type[:1] == ["DERIVED"]:
        return "derived", f"ImageType {shown}"
    if image_type[1:2] == ["SECONDARY"]:
        return "secondary", f"ImageType {shown}"
    found = next((w for w in words if w in DERIVATION_WORDS), None)
    if found:
        return DERIVATION_WORDS[found], f"description says {found}"
    return None, f"ImageType {shown}"


def _acquired_at(ds: Any) -> str | None:
    """The acquisition's date and time as ISO 8601 text (sorts in time order), or None."""
    stamp = str(lookup(ds, "AcquisitionDateTime") or lookup(ds, "FrameAcquisitionDateTime") or "")
    if len(stamp) >= 8:
        date, time = stamp[:8], stamp[8:]
    else:
        date = str(ds.get("AcquisitionDate") or ds.get("SeriesDate") or ds.get("StudyDate") or "")
        time = str(ds.get("AcquisitionTime") or ds.get("SeriesTime") or "")
    date = re.sub(r"\D", "", date)
    time = re.split(r"[+-]", time)[0]  # a UTC offset after a DT's time is not part of it
    if len(date) != 8:
        return None
    whole, _, fraction = time.replace(":", "").partition(".")
    whole = re.sub(r"\D", "", whole)[:6].ljust(6, "0")
    fraction = re.sub(r"\D", "", fraction)
    clock = f"{whole[:2]}:{whole[2:4]}:{whole[4:6]}" + (f".{fraction}" if fraction else "")
    return f"{date[:4]}-{date[4:6]}-{date[6:8]}T{clock}"
