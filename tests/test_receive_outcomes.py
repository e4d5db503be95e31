"""Every C-STORE outcome, through a real socket: a table of good and bad inputs, each sent by
a pynetdicom SCU (the file's bytes exactly as on disk) to one running node, with the exact
status, an Error Comment on every failure, and the spool holding the instance byte for byte
on success and nothing of it otherwise."""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from helpers.dicom import raw_store, split_part10
from helpers.node import running_node
from pydicom.filereader import read_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study

SUCCESS, CANNOT_UNDERSTAND, NOT_SOP_CLASS = 0x0000, 0xC210, 0xA900
BAD_UIDS, UID_MISMATCH = 0xC211, 0xC212
SQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """One phantom MR slice (64 x 64, explicit VR little endian)."""
    options = StudyOptions(seed=77, vendor="siemens", descriptions="vendor", rescan=False,
                           derived=False, patient_name="PHANTOM^KNEE",
                           images_in_acquisition=True, overrides=Overrides(("sag_pd_fs",), 64, 1),
                           truth=False, volume_spacing=2.0)
    return write_study(tmp_path_factory.mktemp("base"), options).files[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator:
    with running_node(tmp_path_factory.mktemp("outcomes")) as running:
        yield running


@pytest.fixture(autouse=True)
def _scu_sends_any_uid(monkeypatch) -> None:
    """Let the test's SCU put hostile UIDs in its command (the node must cope with them)."""
    from pynetdicom import _config

    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda _v: (True, ""))


# --- building inputs -----------------------------------------------------------------------


def fresh(base: Path) -> pydicom.Dataset:
    """The base slice with a new SOP Instance UID (each case its own instance)."""
    ds = pydicom.dcmread(base)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def save(ds: pydicom.Dataset, path: Path, meta_from_ds: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the hostile values we want
        ds.save_as(path, enforce_file_format=meta_from_ds)
    return path


def edit_bytes(base: Path, path: Path, change: Callable[[bytes], bytes]) -> Path:
    """A fresh instance whose data set bytes are then changed by ``change``."""
    meta, body = split_part10(save(fresh(base), path).read_bytes())
    path.write_bytes(meta + change(body))
    return path


def element_offsets(body: bytes, keyword: str) -> tuple[int, int, int]:
    """(header start, value start, value length) of a top-level element in ``body``."""
    ds = read_dataset(io.BytesIO(body), False, True)
    element = ds.get_item(keyword)
    header = 12 if element.VR in ("OB", "OW", "UN", "SQ", "UT") else 8
    return element.value_tell - header, element.value_tell, element.length


def cut_at(where: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    return lambda body: body[:where(body)]


def set_length(keyword: str, length: int) -> Callable[[bytes], bytes]:
    """Rewrite the length field of ``keyword`` (2-byte or 4-byte form) to ``length``."""

    def change(body: bytes) -> bytes:
        start, value, _ = element_offsets(body, keyword)
        field = struct.pack("<I", length) if value - start == 12 else struct.pack("<H", length)
        return body[:value - len(field)] + field + body[value:]

    return change


def with_ds(change: Callable[[pydicom.Dataset], None], meta_from_ds: bool = True):
    def build(base: Path, path: Path) -> Path:
        ds = fresh(base)
        change(ds)
        return save(ds, path, meta_from_ds)

    return build


def raw(change: Callable[[bytes], bytes]):
    return lambda base, path: edit_bytes(base, path, change)


def rle(change: Callable[[bytes], bytes] | None = None):
    """The slice RLE-compressed (encapsulated Pixel Data), optionally damaged after."""

    def build(base: Path, path: Path) -> Path:
        ds = fresh(base)
        ds.compress(RLELossless)
        save(ds, path)
        if change is not None:
            meta, body = split_part10(path.read_bytes())
            path.write_bytes(meta + change(body))
        return path

    return build


def last_fragment_longer(body: bytes) -> bytes:
    """The last fragment's item length says 100 bytes more than it has (runs past the end)."""
    end = len(body) - len(SQ_DELIMITER)
    assert body[end:] == SQ_DELIMITER
    _, value, _ = element_offsets(body, "PixelData")
    position, last = value, None
    while position < end:
        last = position
        (length,) = struct.unpack_from("<I", body, position + 4)
        position += 8 + length
    (length,) = struct.unpack_from("<I", body, last + 4)
    return body[:last + 4] + struct.pack("<I", length + 100) + body[last + 8:]


def one_bit(pixel_bytes: int):
    """A 10 x 10 1-bit image (needs ceil(100 / 8) = 13 bytes, 14 with padding)."""

    def change(ds: pydicom.Dataset) -> None:
        ds.Rows = ds.Columns = 10
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit = 0
        ds.PixelRepresentation = 0
        ds.PixelData = b"\x55" * pixel_bytes

    return change


def syntax(uid: str):
    def change(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = uid

    return change


def hostile(keyword: str, value: str):
    def change(ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value

    return change


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, Path], Path]
    status: int
    comment: str = ""  # a word the Error Comment must contain


CASES: dict[str, Case] = {
    # whole and well-formed: stored byte for byte
    "plain": Case(with_ds(lambda ds: None), SUCCESS),
    "implicit_vr": Case(with_ds(syntax(ImplicitVRLittleEndian)), SUCCESS),
    "deflated": Case(with_ds(syntax(DeflatedExplicitVRLittleEndian)), SUCCESS),
    "rle_encapsulated": Case(rle(), SUCCESS),
    "large_private_value": Case(with_ds(lambda ds: (
        ds.private_block(0x0011, "AIWTEST", create=True).add_new(0x01, "OB", b"\x01" * 300_000))),
        SUCCESS),
    "one_bit_packed_whole": Case(with_ds(one_bit(14)), SUCCESS),
    # truncated anywhere
    "cut_to_3000_bytes": Case(raw(cut_at(lambda b: 3000)), CANNOT_UNDERSTAND, "truncated"),
    "cut_in_an_element_header": Case(raw(cut_at(
        lambda b: element_offsets(b, "SeriesDescription")[0] + 5)), CANNOT_UNDERSTAND),
    "cut_after_an_element_header": Case(raw(cut_at(
        lambda b: element_offsets(b, "SeriesDescription")[1])), CANNOT_UNDERSTAND),
    "cut_in_a_short_value": Case(raw(cut_at(
        lambda b: element_offsets(b, "SeriesDescription")[1] + 3)), CANNOT_UNDERSTAND),
    "cut_in_a_value_after_the_uids": Case(raw(cut_at(
        lambda b: element_offsets(b, "ImageOrientationPatient")[1] + 3)), CANNOT_UNDERSTAND,
        "truncated"),
    "cut_in_pixel_data": Case(raw(lambda b: b[:-1000]), CANNOT_UNDERSTAND),
    "cut_last_byte": Case(raw(lambda b: b[:-1]), CANNOT_UNDERSTAND),
    "deflated_cut": Case(lambda base, path: (
        lambda p: (p.write_bytes(p.read_bytes()[:-200]), p)[1])(
            with_ds(syntax(DeflatedExplicitVRLittleEndian))(base, path)), CANNOT_UNDERSTAND),
    # malformed lengths and values
    "length_past_the_end": Case(raw(set_length("PixelData", 0x7FFFFFF0)), CANNOT_UNDERSTAND),
    "short_length_field_garbled": Case(raw(set_length("SeriesDescription", 0xFFF1)),
                                       CANNOT_UNDERSTAND),
    "pixel_data_short_of_rows_x_columns": Case(with_ds(lambda ds: setattr(ds, "Rows", 128)),
                                               CANNOT_UNDERSTAND, "Pixel Data"),
    "one_bit_packed_short": Case(with_ds(one_bit(12)), CANNOT_UNDERSTAND, "Pixel Data"),
    "rle_no_sequence_delimiter": Case(rle(lambda b: b[:-8]), CANNOT_UNDERSTAND),
    "rle_last_fragment_past_end": Case(rle(last_fragment_longer), CANNOT_UNDERSTAND),
    "rle_garbage_item_tag": Case(rle(lambda b: b[:-8] + b"\x10\x00\x10\x00\x00\x00\x00\x00"),
                                 CANNOT_UNDERSTAND),
    # not the object the command says
    "image_without_pixel_data": Case(with_ds(lambda ds: delattr(ds, "PixelData")),
                                     NOT_SOP_CLASS, "Pixel Data"),
    "sop_class_differs_from_command": Case(with_ds(
        lambda ds: setattr(ds, "SOPClassUID", CTImageStorage), meta_from_ds=False),
        NOT_SOP_CLASS, "SOPClassUID"),
    "sop_instance_differs_from_command": Case(with_ds(
        lambda ds: setattr(ds.file_meta, "MediaStorageSOPInstanceUID", generate_uid()),
        meta_from_ds=False), UID_MISMATCH, "SOPInstanceUID"),
    "no_study_uid": Case(with_ds(lambda ds: delattr(ds, "StudyInstanceUID")), BAD_UIDS,
                         "StudyInstanceUID"),
}

HOSTILE_UIDS = {
    "slash": "1.2.840/10008.1",
    "dotdot": "../../../../aiw-escape",
    "dotdot_in_digits": "1.2.3/../../4",
    "nul_inside": "1.2.3\x004.5",
    "200_chars": "1." + "2" * 198,
    "letters": "1.2.abc.4",
    "space": "1.2 3.4",
    "empty_components": "1..2.3",
}
for _keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
    for _name, _value in HOSTILE_UIDS.items():
        CASES[f"{_keyword}_{_name}"] = Case(
            with_ds(hostile(_keyword, _value)), BAD_UIDS,
            f"{_keyword} is not a valid UID: '1.2.3?4.5'" if _name == "nul_inside" else _keyword)


def spool_snapshot(node) -> set[Path]:
    return {p.relative_to(node.data_dir) for p in node.data_dir.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_c_store_outcome(node, base_file: Path, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    sent = case.build(base_file, tmp_path / f"{name}.dcm")
    sent_body = split_part10(sent.read_bytes())[1]
    before = spool_snapshot(node)

    [response] = raw_store(node.port, [sent])

    status = int(response.Status)
    comment = str(response.get("ErrorComment", ""))
    assert status == case.status, f"{name}: got 0x{status:04X} ({comment!r})"
    created = spool_snapshot(node) - before
    if status == SUCCESS:
        ds = pydicom.dcmread(sent, stop_before_pixels=True)
        stored = (node.spool / ds.StudyInstanceUID / ds.SeriesInstanceUID
                  / f"{ds.SOPInstanceUID}.dcm")
        assert split_part10(stored.read_bytes())[1] == sent_body, "not stored byte for byte"
        assert {p.name for p in created} <= {ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                             stored.name}
        assert "ErrorComment" not in response
    else:
        assert comment.strip(), f"{name}: failure 0x{status:04X} without an Error Comment"
        assert case.comment in comment, f"{name}: Error Comment {comment!r}"
        assert len(comment) <= 64  # LO
        assert isinstance(response.ErrorComment, str), "the Error Comment has several values"
        assert all(" " <= c <= "~" for c in comment), f"{name}: {comment!r}"
        assert not [p for p in created if p.suffix == ".dcm"], f"{name}: stored {created}"
        assert node.spool_temporaries() == []
    # nothing ever lands outside the spool's UID folders
    for path in spool_snapshot(node):
        assert ".." not in path.parts
    assert not (node.data_dir.parent / "aiw-escape.dcm").exists()
    assert not list(node.data_dir.parent.parent.rglob("aiw-escape*"))
