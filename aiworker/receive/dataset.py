"""What the SCP needs from a received data set, cheaply.

A C-STORE brings a data set (often half a megabyte of pixels) in the negotiated transfer
syntax. The node stores it byte for byte, so it never decodes the pixels; it needs only

* the Part 10 file header to write in front of the data set (:func:`part10_header`), and
* a handful of header attributes for the state DB, and the assurance that the data set is
  whole (:func:`read_whole_data_set`): pydicom walks every element but skips over large values
  (Pixel Data) without copying them, and the walk must end exactly at the last byte.

pydicom's walk stops without a word where the data ends in the middle of an element's
header, and reads a short value where it ends in a value, so "the walk ended at the last
byte" alone lets a data set cut after its UIDs through. :func:`read_whole_data_set` also holds every
element to its own length (each value as long as its length says, the last element ending
at the last byte) and the Pixel Data to the image's size (:mod:`aiworker.receive.pixels`).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, DeflatedExplicitVRLittleEndian

from aiworker import __version__
from aiworker.receive.pixels import UNDEFINED_LENGTH, check_pixel_data

IMPLEMENTATION_VERSION = f"AIWORKER_{__version__}"[:16]
SKIP_VALUES_LONGER_THAN = 256  # bytes; such values are stepped over, never read


class IncompleteDataSet(ValueError):
    """The bytes received do not form a whole data set (truncated, or not DICOM at all);
    the message says where (it fits an Error Comment)."""


def read_whole_data_set(stream: BinaryIO, transfer_syntax: UID) -> Dataset:
    """Walk the data set in ``stream`` from its start; values are converted on access.

    Raises :class:`IncompleteDataSet` when the elements do not end exactly where the
    data ends.
    """
    stream.seek(0, io.SEEK_END)
    length = stream.tell()
    stream.seek(0)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = inflater.decompress(stream.read())
        if not inflater.eof:
            raise IncompleteDataSet("deflated data set truncated")
        stream, length = io.BytesIO(inflated), len(inflated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # garbage makes pydicom warn; we raise below
        ds = read_dataset(
            stream,
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            defer_size=SKIP_VALUES_LONGER_THAN,
        )
    if stream.tell() != length:
        raise IncompleteDataSet(
            f"data set truncated: elements end at byte {stream.tell()} of {length}")
    _check_element_lengths(ds, length)
    check_pixel_data(ds, stream)
    return ds


def _check_element_lengths(ds: Dataset, length: int) -> None:
    """The last element read (when its length is defined) has all of its value and ends at
    the last byte: else the data set was cut short. Only the last can be short, as a read
    comes up short only at the end of the data."""
    if not ds:
        return
    element = ds.get_item(next(reversed(ds.keys())), keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.length == UNDEFINED_LENGTH:
        return  # an undefined length: pydicom read to its delimiter, or raised
    if element.value is not None and len(element.value) != element.length:
        raise IncompleteDataSet(f"data set truncated in {element.tag}")
    if element.value_tell + element.length != length:
        raise IncompleteDataSet(f"data set truncated after {element.tag}")


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1), encoded.

    The group is always explicit VR little endian; UIDs are padded to even length with NUL.
    """
    elements = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _uid(sop_class_uid)),
            _element(0x0003, b"UI", _uid(sop_instance_uid)),
            _element(0x0010, b"UI", _uid(transfer_syntax)),
            _element(0x0012, b"UI", _uid(PYDICOM_IMPLEMENTATION_UID)),
            _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION)),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # OB has a 2-byte reserved field and a 4-byte length
        length = b"\x00\x00" + struct.pack("<I", len(value))
        return struct.pack("<HH", 0x0002, element) + vr + length + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw
