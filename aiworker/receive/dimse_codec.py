"""DIMSE command sets encoded and decoded directly, for pynetdicom, without pydicom.

Command sets hold a dozen plain elements, but pynetdicom moves each through a pydicom data
set: built, filled, walked and encoded for every response, converted element by element
for every request, some 0.3 ms a C-STORE. Responses without a data set are encoded straight
from their primitive (:func:`encode_message_without_data_set`), requests' command sets are
read straight from their bytes (:func:`_message_to_primitive`), and any other command set
is encoded directly (:func:`encode_command_set`); anything unusual falls back to pydicom.
:func:`install` (called by :func:`aiworker.receive.fastpath.install`) puts these in
pynetdicom's place.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dsutils as _dsutils
from pynetdicom import evt
from pynetdicom.dimse import _RQ_TO_MESSAGE, _RSP_TO_MESSAGE, DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA

_INTEGER_FORMATS = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<i"}
_TEXT_PADDING = {"UI": b"\x00", "AE": b" ", "LO": b" ", "SH": b" ", "CS": b" ", "ST": b" "}


def encode_command_set(ds: Dataset) -> bytes | None:
    """A DIMSE command set in implicit VR little endian (PS3.7 6.3.1), or None if ``ds`` has
    anything but group 0000 elements of the simple VRs command sets use."""
    if any(tag >> 16 for tag in ds.keys()):
        return None
    return _encode_elements((element.tag, element.VR, element.value) for element in ds)


def _encode_elements(elements: Iterable[tuple[int, str, Any]]) -> bytes | None:
    """Encode (tag, VR, value) triples, in the order given, as implicit VR little endian
    elements; None if a VR is not one command sets use."""
    parts = []
    for tag, vr, value in elements:
        values = [] if value is None or value == "" else (
            list(value) if isinstance(value, MultiValue | list) else [value])
        if vr in _INTEGER_FORMATS:
            data = b"".join(struct.pack(_INTEGER_FORMATS[vr], v) for v in values)
        elif vr in _TEXT_PADDING:
            data = "\\".join(str(v) for v in values).encode("ascii")
            if len(data) % 2:
                data += _TEXT_PADDING[vr]
        elif vr == "AT":
            data = b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in values)
        else:
            return None
        parts.append(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(data)) + data)
    return b"".join(parts)


_COMMAND_FIELDS = {name: field for field, (name, _cls) in _dimse_messages._MESSAGE_TYPES.items()}
_SET_BY_MESSAGE = ("CommandGroupLength", "CommandField", "CommandDataSetType")
NO_DATA_SET = 0x0101


@functools.cache
def _command_element(keyword: str) -> tuple[int, str]:
    """The tag and VR of a command set keyword."""
    tag = tag_for_keyword(keyword)
    return tag, dictionary_VR(tag)


def encode_message_without_data_set(primitive: Any) -> bytes | None:
    """The command set of a DIMSE message that has no data set (every response the node
    sends), encoded straight from its primitive as pynetdicom would encode it; None for
    anything else."""
    by_class = _RQ_TO_MESSAGE if primitive.MessageIDBeingRespondedTo is None else _RSP_TO_MESSAGE
    message = by_class.get(type(primitive))
    if message is None or getattr(primitive, "_dataset_path", None):
        return None
    data_set_keyword = _dimse_messages._DATASET_KEYWORDS.get(message.__name__)
    if data_set_keyword and getattr(primitive, data_set_keyword, None):
        return None
    name = message.__name__.replace("_", "-")
    elements = [(0x00000100, "US", _COMMAND_FIELDS[name]), (0x00000800, "US", NO_DATA_SET)]
    for keyword in _dimse_messages._COMMAND_SET_KEYWORDS[name]:
        value = None if keyword in _SET_BY_MESSAGE else getattr(primitive, keyword, None)
        if value is not None:
            elements.append((*_command_element(keyword), value))
    body = _encode_elements(sorted(elements))
    if body is None:
        return None
    return _encode_elements([(0x00000000, "UL", len(body))]) + body


_original_send_msg = DIMSEServiceProvider.send_msg


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``; a message without a data set that fits one PDU is
    encoded directly (pynetdicom builds, fills and walks a pydicom data set for it, a fifth
    of a millisecond per response)."""
    encoded = None
    if not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        encoded = encode_message_without_data_set(primitive)
    limit = self.maximum_pdu_size
    if encoded is None or (limit and len(encoded) > limit - 6):
        _original_send_msg(self, primitive, context_id)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
    self.dul.send_pdu(pdata)


class _Unusual(Exception):
    """A command set value the direct decoder leaves to pydicom."""


def _decode_raw(vr: str, raw: bytes) -> Any:
    """A command set element's value from its implicit VR little endian bytes."""
    if not raw:
        return None
    if vr in _INTEGER_FORMATS and len(raw) == struct.calcsize(_INTEGER_FORMATS[vr]):
        return struct.unpack(_INTEGER_FORMATS[vr], raw)[0]
    if vr in _TEXT_PADDING and b"\\" not in raw:
        try:
            return raw.decode("ascii").rstrip(" \x00")
        except UnicodeDecodeError:
            pass
    raise _Unusual(vr)


@functools.cache
def _command_keyword(tag: int) -> tuple[str, str]:
    """The keyword and VR of a command set tag."""
    return keyword_for_tag(tag), dictionary_VR(tag)


_original_message_to_primitive = DIMSEMessage.message_to_primitive


def _message_to_primitive(self: DIMSEMessage) -> Any:
    """``DIMSEMessage.message_to_primitive``, reading the command set's values straight from
    their bytes (pydicom's conversion of each element costs ~0.1 ms a message); anything
    unusual (multiple values, non-ASCII text, unknown tags) goes the original way."""
    name = type(self).__name__
    primitive = _dimse_messages._MSG_TO_PRIMITVE[name[: name.rfind("_R")]]()
    try:
        for tag, element in self.command_set._dict.items():
            keyword, vr = _command_keyword(tag)
            if not isinstance(element, RawDataElement):
                if element.VM > 1:
                    raise _Unusual(keyword)
                value = element.value
            else:
                value = _decode_raw(vr, element.value)
            if keyword and hasattr(primitive, keyword):
                setattr(primitive, keyword, value)
    except (_Unusual, KeyError):
        return _original_message_to_primitive(self)
    data_set_keyword = _dimse_messages._DATASET_KEYWORDS.get(name)
    if data_set_keyword:
        setattr(primitive, data_set_keyword, self.data_set)
    primitive._context_id = self.context_id
    primitive._dataset_path = self._data_set_path
    primitive._dataset_file = self._data_set_file
    return primitive


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
            deflated: bool = False) -> bytes | None:
    """pynetdicom's ``dsutils.encode``, with the direct path for command sets."""
    if is_implicit_vr and is_little_endian and not deflated:
        try:
            encoded = encode_command_set(ds)
        except (TypeError, ValueError, UnicodeEncodeError, struct.error):
            encoded = None
        if encoded is not None:
            return encoded
    return _dsutils.encode(ds, is_implicit_vr, is_little_endian, deflated)


def install() -> None:
    """Have pynetdicom encode command sets, send messages without a data set and read
    requests' command sets through this module."""
    _dimse_messages.encode = _encode  # type: ignore[assignment]
    DIMSEMessage.message_to_primitive = _message_to_primitive  # type: ignore[method-assign]
    DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
