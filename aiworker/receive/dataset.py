"""Reading the few header attributes the node needs from a received instance, cheaply.

The node stores instances byte for byte and never decodes their pixels; for the state DB it
needs a handful of attributes from groups 0008-0028. pydicom's parser is stopped right
after (0028,0008) Number of Frames, well before Pixel Data.
"""

from __future__ import annotations

from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial

LAST_TAG_NEEDED = 0x0028_0008  # Number of Frames


def read_header(fp: BinaryIO) -> Dataset:
    """Parse a Part 10 file (any transfer syntax, deflated too) up to (0028,0008)."""
    return read_partial(fp, stop_when=lambda tag, _vr, _length: tag > LAST_TAG_NEEDED)
