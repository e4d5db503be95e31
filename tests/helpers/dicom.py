"""DICOM bytes for tests: Part 10 splitting, and C-STORE/C-ECHO with pynetdicom that send
a file's bytes exactly as on disk."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pydicom

from aiworker.dispatch.requestor import associate

# --- DICOM bytes -------------------------------------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def split_part10(data: bytes) -> tuple[bytes, bytes]:
    """Split a DICOM Part 10 file into (preamble + file meta group, data set bytes).

    Walks the group 0002 elements (always explicit VR little endian) one by one, so the
    split is exact whether or not a group length is present.
    """
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    pos = 132
    while pos + 8 <= len(data):
        group, _element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return data[:pos], data[pos:]


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, exactly as on disk, without the file meta."""
    return split_part10(Path(path).read_bytes())[1]


def transfer_syntax(path: Path) -> str:
    return str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)


# --- raw pynetdicom SCU ------------------------------------------------------------------


def raw_store(port: int, files: list[Path], called: str = "AIWORKER",
              calling: str = "RAWSCU") -> list[Any]:
    """C-STORE each file's bytes exactly as on disk (no decoding) on one association.

    Returns the response data set of each C-STORE (``.Status``, ``.ErrorComment``).
    """
    from pynetdicom import AE, _config

    syntaxes: dict[str, set[str]] = {}
    for path in files:
        meta = pydicom.filereader.read_file_meta_info(path)
        syntaxes.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(
            str(meta.TransferSyntaxUID))
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, ts in sorted(syntaxes.items()):
        ae.add_requested_context(sop_class, sorted(ts))
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, not a re-encoding
    assoc = associate(ae, "127.0.0.1", port, ae_title=called)
    try:
        assert assoc.is_established, f"association with 127.0.0.1:{port} failed"
        responses = [assoc.send_c_store(path) for path in files]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return responses


def raw_echo(port: int, called: str = "AIWORKER", calling: str = "RAWSCU") -> int | None:
    """C-ECHO with pynetdicom; the status, or None when no association was made."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = associate(ae, "127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return int(status.Status) if "Status" in status else None
