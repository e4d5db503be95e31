"""The receive fast path's own encoder must write exactly what pydicom writes."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from aiworker.receive.dimse_codec import _encode, encode_command_set


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


def _pynetdicom_bytes(primitive) -> bytes:
    """The command set pynetdicom itself encodes for ``primitive``."""
    from pynetdicom.dimse import _RSP_TO_MESSAGE

    message = _RSP_TO_MESSAGE[type(primitive)]()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def _store_response(status: int, comment: str | None = None):
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345"
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    return rsp


@pytest.mark.parametrize("status, comment", [(0x0000, None), (0xC211, "missing SeriesUID"),
                                             (0xA700, "disk full")])
def test_responses_encode_as_pynetdicom_encodes_them(status: int, comment: str | None) -> None:
    from aiworker.receive.dimse_codec import encode_message_without_data_set

    rsp = _store_response(status, comment)
    assert encode_message_without_data_set(rsp) == _pynetdicom_bytes(rsp)


def test_echo_response_and_requests_with_data_sets() -> None:
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    from aiworker.receive.dimse_codec import encode_message_without_data_set

    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo.Status = 0
    assert encode_message_without_data_set(echo) == _pynetdicom_bytes(echo)
    store = C_STORE()
    store.MessageID = 3
    store.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    store.AffectedSOPInstanceUID = "1.2.3"
    store.Priority = 0
    store.DataSet = BytesIO(b"\x08\x00\x16\x00\x02\x00\x00\x001\x00")
    assert encode_message_without_data_set(store) is None  # has a data set: pynetdicom's way


def _received_store_request(command: Dataset):
    """A C-STORE-RQ message as pynetdicom's decoder leaves it after the last fragment."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dsutils import decode

    message = C_STORE_RQ()
    message.command_set = decode(BytesIO(encode(command, True, True)), True, True)
    message.context_id = 5
    message.data_set = BytesIO(b"data")
    return message


@pytest.mark.parametrize("move_originator", [None, "ORTHANC"])
def test_received_request_becomes_the_same_primitive(move_originator: str | None) -> None:

    from aiworker.receive.dimse_codec import _message_to_primitive, _original_message_to_primitive

    elements = dict(CommandGroupLength=0, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.4",
                    CommandField=0x0001, MessageID=7, Priority=2, CommandDataSetType=0,
                    AffectedSOPInstanceUID="1.2.826.0.1.3680043.8.498.1234567")
    if move_originator:
        elements.update(MoveOriginatorApplicationEntityTitle=move_originator,
                        MoveOriginatorMessageID=3)
    fast = _message_to_primitive(_received_store_request(command(**elements)))
    slow = _original_message_to_primitive(_received_store_request(command(**elements)))
    for keyword in ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
                    "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID"):
        assert getattr(fast, keyword) == getattr(slow, keyword), keyword
    assert fast.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.1234567"
    assert fast.Priority == 2 and fast.MessageID == 7
    assert fast.DataSet.getvalue() == b"data" and fast._context_id == 5
