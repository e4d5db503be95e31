"""Is a received image's Pixel Data whole? Checked from its length and item structure,
without decoding a pixel.

* Native (uncompressed) Pixel Data must hold Rows x Columns x Samples per Pixel x Number of
  Frames pixels of Bits Allocated bits (PS3.5 8.1.1; 1-bit data is packed, so the byte
  count is rounded up); a longer value (padding to even length) is fine, a shorter one is
  damaged.
* Encapsulated Pixel Data (PS3.5 A.4) must be a Basic Offset Table item, then at least one
  fragment item per frame, each inside the data, then a Sequence Delimitation Item right
  after the last fragment. pydicom's :mod:`pydicom.encaps` parses the items; the checks on
  where they end are ours, as pydicom stops quietly at the end of the data.
* An instance of an image storage SOP class without Pixel Data is not an image
  (:func:`is_image_storage`): the Image Pixel module, Pixel Data included, is mandatory in
  every image IOD (PS3.3 C.7.6.3).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.uid import UID

PIXEL_DATA = 0x7FE0_0010
ANY_PIXEL_DATA = (PIXEL_DATA, 0x7FE0_0008, 0x7FE0_0009)  # Pixel, Float and Double Float
UNDEFINED_LENGTH = 0xFFFFFFFF
SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


class DamagedPixelData(ValueError):
    """Pixel Data that cannot be a whole image; the message says why (fits an Error Comment)."""


def is_image_storage(sop_class_uid: str) -> bool:
    """A standard image storage SOP class (its PS3.6 name says "Image Storage")."""
    return "Image Storage" in UID(sop_class_uid).name


def has_pixel_data(ds: Dataset) -> bool:
    return any(tag in ds for tag in ANY_PIXEL_DATA)


def check_pixel_data(ds: Dataset, stream: BinaryIO) -> None:
    """Raise :class:`DamagedPixelData` unless the Pixel Data in ``ds`` (read from ``stream``,
    which holds the data set) is whole; a data set without Pixel Data passes."""
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if element is None:
        return
    frames = _number(ds, "NumberOfFrames", default=1)
    if element.length == UNDEFINED_LENGTH:
        _check_encapsulated(stream, element.value_tell, frames)
    else:
        _check_native(ds, element.length, frames)


def native_length(rows: int, columns: int, samples: int, bits: int, frames: int) -> int:
    """Bytes needed by native Pixel Data (before padding to even length)."""
    return (rows * columns * samples * frames * bits + 7) // 8


def _check_native(ds: Dataset, length: int, frames: int) -> None:
    rows, columns = _number(ds, "Rows"), _number(ds, "Columns")
    bits = _number(ds, "BitsAllocated")
    samples = _number(ds, "SamplesPerPixel", default=1)
    if not (rows and columns and bits):
        raise DamagedPixelData("Pixel Data without Rows, Columns or BitsAllocated")
    needed = native_length(rows, columns, samples, bits, frames)
    if length < needed:
        raise DamagedPixelData(f"Pixel Data has {length} bytes of the {needed} needed")


def _check_encapsulated(stream: BinaryIO, start: int, frames: int) -> None:
    stream.seek(start)
    try:
        parse_basic_offsets(stream)
        count, offsets = parse_fragments(stream)
    except (ValueError, struct.error) as exc:
        raise DamagedPixelData("encapsulated Pixel Data: bad item structure") from exc
    if count < max(frames, 1):
        raise DamagedPixelData(f"encapsulated Pixel Data: {count} fragments, {frames} frames")
    stream.seek(offsets[-1] + 4)
    (length,) = struct.unpack("<I", stream.read(4))
    stream.seek(offsets[-1] + 8 + length)
    if stream.read(8) != SEQUENCE_DELIMITER:
        raise DamagedPixelData("encapsulated Pixel Data: last fragment not delimited")


def _number(ds: Dataset, keyword: str, default: int = 0) -> int:
    """An integer attribute (US or IS), ``default`` when absent or empty; read from the raw
    bytes (a pydicom conversion costs ~10 us an element, on every C-STORE)."""
    element = ds.get_item(keyword)
    if element is None or not element.value:
        return default
    value = element.value
    try:
        if not isinstance(value, bytes):  # already converted
            return int(value)
        if keyword in _US:
            return int.from_bytes(value[:2], "little" if element.is_little_endian else "big")
        return int(value.decode("ascii").strip("\x00 "))
    except (ValueError, TypeError) as exc:
        raise DamagedPixelData(f"{keyword} is not a number") from exc


_US = frozenset({"Rows", "Columns", "BitsAllocated", "SamplesPerPixel"})
