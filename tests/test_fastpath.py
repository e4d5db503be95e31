"""The receive fast path's own encoder must write exactly what pydicom writes."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from aiworker.receive.fastpath import _encode, encode_command_set


def command(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


COMMAND_SETS = {
    "C-STORE-RQ": command(CommandGroupLength=0, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.4",
                          CommandField=0x0001, MessageID=7, Priority=0, CommandDataSetType=0,
                          AffectedSOPInstanceUID="1.2.826.0.1.3680043.8.498.1234567",
                          MoveOriginatorApplicationEntityTitle="ORTHANC",
                          MoveOriginatorMessageID=3),
    "C-STORE-RSP failure": command(CommandGroupLength=0, AffectedSOPClassUID="1.2.3",
                                   CommandField=0x8001, MessageIDBeingRespondedTo=7,
                                   CommandDataSetType=0x0101, AffectedSOPInstanceUID="1.2.34",
                                   Status=0xC211, ErrorComment="missing SeriesInstanceUID",
                                   OffendingElement=[0x0020000E, 0x0020000D]),
    "C-ECHO-RSP, empty comment": command(CommandGroupLength=0,
                                         AffectedSOPClassUID="1.2.840.10008.1.1",
                                         CommandField=0x8030, MessageIDBeingRespondedTo=1,
                                         CommandDataSetType=0x0101, Status=0, ErrorComment=""),
}


@pytest.mark.parametrize("name", COMMAND_SETS)
def test_command_set_bytes_equal_pydicoms(name: str) -> None:
    ds = COMMAND_SETS[name]
    assert encode_command_set(ds) == encode(ds, True, True)


def test_data_sets_and_other_encodings_go_to_pydicom() -> None:
    ds = command(PatientName="DOE^JANE", StudyInstanceUID="1.2.3")
    assert encode_command_set(ds) is None
    assert _encode(ds, True, True) == encode(ds, True, True)
    assert _encode(ds, False, True) == encode(ds, False, True)


def test_part10_header_reads_back_with_pydicom(tmp_path) -> None:
    from pydicom.filereader import read_file_meta_info

    from aiworker.receive.dataset import part10_header

    path = tmp_path / "x.dcm"
    path.write_bytes(part10_header("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.5", "1.2.840.10008.1.2.1"))
    meta = read_file_meta_info(path)
    assert meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.FileMetaInformationGroupLength == path.stat().st_size - 144
