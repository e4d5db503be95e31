"""What the SCP needs from a received data set, cheaply.

A C-STORE brings a data set (often half a megabyte of pixels) in the negotiated transfer
syntax. The node stores it byte for byte, so it never decodes the pixels; it needs only

* the Part 10 file header to write in front of the data set (:func:`part10_header`), and
* a handful of header attributes for the state DB (:func:`read_header`), read by stopping
  pydicom's parser at the last group the node uses, well before Pixel Data.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, DeflatedExplicitVRLittleEndian

from aiworker import __version__

LAST_TAG_NEEDED = 0x0028_0008  # Number of Frames
IMPLEMENTATION_VERSION = f"AIWORKER_{__version__}"[:16]


def read_header(data: bytes | memoryview, transfer_syntax: UID) -> Dataset:
    """Parse the data set's elements up to (0028,0008); values are converted on access."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
    fp = DicomBytesIO(bytes(data) if isinstance(data, memoryview) else data)
    fp.is_little_endian = transfer_syntax.is_little_endian
    fp.is_implicit_VR = transfer_syntax.is_implicit_VR
    return read_dataset(
        fp,
        transfer_syntax.is_implicit_VR,
        transfer_syntax.is_little_endian,
        stop_when=lambda tag, _vr, _length: tag > LAST_TAG_NEEDED,
    )


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
