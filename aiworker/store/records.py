"""What the state DB keeps about one received instance, read from its DICOM header."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance and the study/series facts its header carries.

    ``expected_frames`` is ImagesInAcquisition (0020,1002) when the header has it, else the
    NumberOfFrames of a multi-frame object, else ``None``: it lets a series complete as soon
    as that many frames have arrived instead of waiting for the idle timer.
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
        """Build the record from a decoded header (pixel data is never touched)."""
        frames = _int(ds.get("NumberOfFrames")) or 1
        images_in_acquisition = _int(ds.get("ImagesInAcquisition"))
        expected = images_in_acquisition or (frames if frames > 1 else None)
        return cls(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax=transfer_syntax,
            path=path,
            size=size,
            frames=frames,
            expected_frames=expected,
            modality=str(ds.get("Modality", "") or ""),
            series_number=_int(ds.get("SeriesNumber")),
            series_description=str(ds.get("SeriesDescription", "") or ""),
            study_description=str(ds.get("StudyDescription", "") or ""),
            study_date=str(ds.get("StudyDate", "") or ""),
            accession_number=str(ds.get("AccessionNumber", "") or ""),
            patient_id=str(ds.get("PatientID", "") or ""),
            patient_name=str(ds.get("PatientName", "") or ""),
            calling_ae=calling_ae,
            received_at=received_at,
        )


def _int(value: object) -> int | None:
    """An IS/US value as int, or None when absent or not a number."""
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
