"""Reading the few header attributes the node needs from a received instance, cheaply.

The node stores instances byte for byte and never decodes their pixels; for the state DB it
needs a handful of attributes from groups 0008-0028. pydicom's parser is stopped right
after (0028,0008) Number of Frames, well before Pixel Data, and runs over the first bytes
of the file kept in memory while it was written; only a header longer than those is read
back from the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial

LAST_TAG_NEEDED = 0x0028_0008  # Number of Frames


def read_header(head: bytes, path: Path) -> Dataset:
    """Parse the Part 10 file at ``path`` (any transfer syntax) up to (0028,0008).

    ``head`` is the file's start. The parse stops before the end of ``head`` when the header
    fits in it; otherwise it ran out of bytes and is repeated on the file.
    """
    stream = io.BytesIO(head)
    ds = _parse(stream)
    if stream.tell() < len(head):
        return ds
    with open(path, "rb") as fp:
        return _parse(fp)


def _parse(fp: BinaryIO) -> Dataset:
    return read_partial(fp, stop_when=lambda tag, _vr, _length: tag > LAST_TAG_NEEDED)
