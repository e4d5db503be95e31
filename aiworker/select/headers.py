"""Reading series headers for selection: pixel-free, grouped, and neutral to the SOP class.

Selection looks at headers only. Every instance is read with ``stop_before_pixels`` and only
the attributes geometry needs (:data:`INSTANCE_TAGS`); the first instance of each series
(lowest InstanceNumber) is read whole, because rules may name any DICOM keyword and are
checked against that instance's value.

Classic MR Image Storage has one frame per instance; Enhanced MR Image Storage has many
frames per instance whose position, orientation, pixel measures and MR parameters live in
functional groups (per frame, or shared by all frames). :func:`frames` turns both into one
list of :class:`Frame`, and :func:`lookup` finds a keyword at the top level or inside the
functional groups, so the rest of the select stage never cares which kind it reads.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

log = logging.getLogger("aiworker.select")

INSTANCE_TAGS = [
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
    "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns",
    "PixelSpacing", "SliceThickness", "EchoNumbers", "EchoTime", "AcquisitionNumber",
    "TemporalPositionIdentifier", "NumberOfFrames", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]
FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


@dataclass
class SeriesHeaders:
    """One series as selection sees it.

    ``first`` is the full header (no pixels) of the instance with the lowest InstanceNumber;
    ``instances`` holds the geometry headers of every readable instance, in instance order;
    ``unreadable`` counts files that could not be read as DICOM.
    """

    study_uid: str
    series_uid: str
    first: Dataset
    instances: list[Dataset]
    unreadable: int = 0

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")

    @property
    def series_number(self) -> int | None:
        return _as_int(self.first.get("SeriesNumber"))


@dataclass
class StudyHeaders:
    """The series of one study, in series-number order."""

    study_uid: str
    series: list[SeriesHeaders] = field(default_factory=list)


@dataclass(frozen=True)
class Frame:
    """One image plane: where it lies and what tells repeats of one position apart."""

    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, ...] | None
    slice_thickness: float | None
    echo: float | None  # echo number, or effective echo time for Enhanced MR
    temporal: float | None
    acquisition: float | None
    stack: str | None


# --- reading ------------------------------------------------------------------------------


def read_header(path: Path, full: bool = False) -> Dataset | None:
    """The header of ``path`` without pixels (all of it with ``full``); None if not DICOM."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True,
                                   specific_tags=None if full else INSTANCE_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, AttributeError,
            KeyError) as exc:
        log.debug("not readable as DICOM: %s (%s)", path, exc)
        return None


def read_series(paths: Iterable[Path | str]) -> SeriesHeaders | None:
    """The headers of one series' files (as the state DB lists them); None if none is readable."""
    read, unreadable = [], 0
    for path in paths:
        header = read_header(Path(path))
        if header is None:
            unreadable += 1
        else:
            read.append((Path(path), header))
    return _assemble(read, unreadable)


def scan_folder(root: Path) -> tuple[list[StudyHeaders], int]:
    """Every DICOM file under ``root`` (any nesting), grouped by study and series.

    Returns the studies (in UID order) and the number of files skipped as not DICOM.
    """
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    groups: dict[tuple[str, str], list[tuple[Path, Dataset]]] = {}
    skipped = 0
    for path in files:
        header = read_header(path)
        if header is None or "SeriesInstanceUID" not in header:
            skipped += 1
            continue
        key = (str(header.get("StudyInstanceUID", "")), str(header.SeriesInstanceUID))
        groups.setdefault(key, []).append((path, header))
    studies: dict[str, StudyHeaders] = {}
    for (study_uid, _series_uid), read in sorted(groups.items()):
        series = _assemble(read, 0)
        if series is not None:
            studies.setdefault(study_uid, StudyHeaders(study_uid)).series.append(series)
    for study in studies.values():
        study.series.sort(key=series_order)
    return list(studies.values()), skipped


def series_order(series: SeriesHeaders) -> tuple[float, str]:
    """Sort key: series number (missing last), then UID."""
    number = series.series_number
    return (math.inf if number is None else number, series.series_uid)


def _assemble(read: list[tuple[Path, Dataset]], unreadable: int) -> SeriesHeaders | None:
    """Order a series' headers by InstanceNumber and read the first one whole."""
    if not read:
        return None
    read.sort(key=lambda item: (_instance_order(item[1]), str(item[0])))
    first_path, first_geometry = read[0]
    first = read_header(first_path, full=True) or first_geometry
    return SeriesHeaders(
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        first=first,
        instances=[header for _path, header in read],
        unreadable=unreadable,
    )


def _instance_order(header: Dataset) -> float:
    number = _as_int(header.get("InstanceNumber"))
    return math.inf if number is None else number


# --- values -------------------------------------------------------------------------------


def lookup(ds: Dataset, keyword: str) -> Any:
    """The plain value of ``keyword``: at the top level, else in the shared functional groups,
    else in the first frame's functional groups (Enhanced MR); None when absent."""
    if keyword in ds:
        return plain(ds[keyword].value)
    for groups in FUNCTIONAL_GROUPS:
        sequence = ds.get(groups)
        if sequence:
            value = _in_groups(sequence[0], keyword)
            if value is not None:
                return value
    return None


def _in_groups(groups: Dataset, keyword: str) -> Any:
    """``keyword`` inside one item of a functional groups sequence (one macro level down)."""
    for element in groups:
        if element.VR == "SQ" and element.value and keyword in element.value[0]:
            return plain(element.value[0][keyword].value)
    return None


def plain(value: Any) -> Any:
    """A pydicom value as plain Python: str, int, float, a list of those, or None (a
    sequence item stays a Dataset)."""
    if value is None or isinstance(value, bytes):
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float | Decimal):
        return float(value)
    if isinstance(value, str):
        return value.strip()
    return value if isinstance(value, Dataset) else str(value)


def as_list(value: Any) -> list[Any]:
    """A value as a list (a single value becomes a one-item list, None an empty one)."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list) else [value]


def as_float(value: Any) -> float | None:
    """The first number in ``value``, or None."""
    values = as_list(value)
    try:
        return float(values[0]) if values else None
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> int | None:
    number = as_float(plain(value))
    return None if number is None or math.isnan(number) else int(number)


def _floats(value: Any) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in as_list(plain(value)))
    except (TypeError, ValueError):
        return None
    return numbers or None


# --- frames -------------------------------------------------------------------------------


def frames(instances: Iterable[Dataset]) -> list[Frame]:
    """Every image plane of a series: one per classic instance, one per Enhanced MR frame."""
    found: list[Frame] = []
    for header in instances:
        if header.get("PerFrameFunctionalGroupsSequence"):
            found.extend(_enhanced_frames(header))
        else:
            found.append(_classic_frame(header))
    return found


def _classic_frame(ds: Dataset) -> Frame:
    return Frame(
        position=_floats(ds.get("ImagePositionPatient")),
        orientation=_floats(ds.get("ImageOrientationPatient")),
        rows=_as_int(ds.get("Rows")),
        columns=_as_int(ds.get("Columns")),
        pixel_spacing=_floats(ds.get("PixelSpacing")),
        slice_thickness=as_float(plain(ds.get("SliceThickness"))),
        echo=as_float(plain(ds.get("EchoNumbers"))),
        temporal=as_float(plain(ds.get("TemporalPositionIdentifier"))),
        acquisition=as_float(plain(ds.get("AcquisitionNumber"))),
        stack=None,
    )


def _enhanced_frames(ds: Dataset) -> list[Frame]:
    shared_sequence = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_sequence[0] if shared_sequence else Dataset()
    rows, columns = _as_int(ds.get("Rows")), _as_int(ds.get("Columns"))
    found = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        def value(keyword: str, groups: Dataset = item) -> Any:
            found_here = _in_groups(groups, keyword)
            return found_here if found_here is not None else _in_groups(shared, keyword)

        stack = value("StackID")
        found.append(Frame(
            position=_floats(value("ImagePositionPatient")),
            orientation=_floats(value("ImageOrientationPatient")),
            rows=rows,
            columns=columns,
            pixel_spacing=_floats(value("PixelSpacing")),
            slice_thickness=as_float(value("SliceThickness")),
            echo=as_float(value("EffectiveEchoTime")),
            temporal=as_float(value("TemporalPositionIndex")),
            acquisition=None,
            stack=None if stack is None else str(stack),
        ))
    return found
