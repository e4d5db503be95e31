"""What the state DB keeps about one received instance, read from its DICOM header."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the status CLI reads records without loading pydicom
    from pydicom.dataset import Dataset


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance and the study/series facts its header carries.

    ``expected_frames`` is ImagesInAcquisition (0020,1002) when the header has it, else the
    NumberOfFrames of a multi-frame object, else ``None``: it lets a series complete as soon
    as that many frames have arrived instead of waiting for the idle timer. It counts the
    images of one acquisition, so it is only trusted while a series has one
    AcquisitionNumber (``acquisition_number``).
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int
    frames: int
    expected_frames: int | None
    acquisition_number: int | None
    modality: str
    series_number: int | None
    series_description: str
    study_description: str
    study_date: str
    accession_number: str
    patient_id: str
    patient_name: str
    calling_ae: str
    received_at: float

    @classmethod
    def from_dataset(
        cls,
        ds: Dataset,
        *,
        path: Path,
        size: int,
        transfer_syntax: str,
        calling_ae: str,
        received_at: float,
    ) -> InstanceRecord:
        """Build the record from a parsed header (pixel data is never touched).

        UIDs, codes, dates and numbers are ASCII by definition and are read from the raw
        element bytes; only the text that may use the Specific Character Set goes through
        pydicom's conversion.
        """
        frames = _int(_ascii(ds, 0x0028_0008)) or 1  # Number of Frames
        images_in_acquisition = _int(_ascii(ds, 0x0020_1002))
        expected = images_in_acquisition or (frames if frames > 1 else None)
        return cls(
            study_uid=_ascii(ds, 0x0020_000D),
            series_uid=_ascii(ds, 0x0020_000E),
            sop_uid=_ascii(ds, 0x0008_0018),
            sop_class_uid=_ascii(ds, 0x0008_0016),
            transfer_syntax=transfer_syntax,
            path=path,
            size=size,
            frames=frames,
            expected_frames=expected,
            acquisition_number=_int(_ascii(ds, 0x0020_0012)),
            modality=_ascii(ds, 0x0008_0060),
            series_number=_int(_ascii(ds, 0x0020_0011)),
            series_description=_text(ds, "SeriesDescription"),
            study_description=_text(ds, "StudyDescription"),
            study_date=_ascii(ds, 0x0008_0020),
            accession_number=_text(ds, "AccessionNumber"),
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
            calling_ae=calling_ae,
            received_at=received_at,
        )


class MissingUID(ValueError):
    """A header without one of the UIDs that name an instance's place in the spool."""


def instance_uids(ds: Dataset) -> tuple[str, str, str]:
    """Study, Series and SOP Instance UID; raises :class:`MissingUID` naming one absent."""
    uids = []
    for tag, name in ((0x0020_000D, "StudyInstanceUID"), (0x0020_000E, "SeriesInstanceUID"),
                      (0x0008_0018, "SOPInstanceUID")):
        uid = _ascii(ds, tag)
        if not uid:
            raise MissingUID(f"missing {name}")
        uids.append(uid)
    return uids[0], uids[1], uids[2]


def _ascii(ds: Dataset, tag: int) -> str:
    """An element of an ASCII-only VR (UI, CS, DA, IS) as text, without converting it."""
    element = ds.get_item(tag)
    if element is None or element.value is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value)


def _text(ds: Dataset, keyword: str) -> str:
    """A text element decoded with the data set's Specific Character Set ("" if absent)."""
    value = ds.get(keyword)
    return "" if value is None else str(value)


def _int(text: str) -> int | None:
    """An IS value as int, or None when absent or not a number."""
    try:
        return int(text)
    except ValueError:
        return None
