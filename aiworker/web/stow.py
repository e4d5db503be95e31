"""Receiving over DICOMweb: STOW-RS (PS3.18 10.5) at ``POST /dicomweb/studies[/{study}]``.

For sites whose router speaks only DICOMweb (``web.stow_enabled``; off by default). The
request is ``multipart/related; type="application/dicom"``, each part one DICOM Part 10
file; it needs ``Authorization: Bearer <web.token>`` like the API's other POSTs. The body
is parsed as it arrives (python-multipart), and each part goes through the same store
path as a C-STORE (:class:`~aiworker.receive.instances.InstanceStore`): the file meta's
SOP Class and Instance UIDs stand for the command's, the same checks for damaged data,
spool write (fsync, read back, rename) and state DB record before the instance counts as
stored. The answer is sent once every part is stored or refused, so a 200 means on disk
and recorded. Stored instances complete and are selected exactly as received ones.

The answer is DICOM JSON (``application/dicom+json``): the Referenced SOP Sequence
(0008,1199) names each stored instance, the Failed SOP Sequence (0008,1198) each refused
one with its Failure Reason (0008,1197), the C-STORE status the node would have answered
(0xA700, 0xA900, 0xC210-0xC215), or 0xC216 for an instance of another study than the
``/studies/{study}`` it was posted to. A part that is not DICOM, or cut short, is listed
with the UIDs its file meta gives (none when it has no file meta). HTTP status: 200 all
stored; 202 some stored; 409 none stored; 503 none stored, each for lack of disk
(0xA7xx: try again later); 400 no part at all; 415 another media type.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from aiworker.receive.instances import (
    BAD_UIDS,
    CANNOT_DECODE,
    INTERNAL_ERROR,
    InstanceStore,
    StoreRefused,
)
from aiworker.store.spool import printable
from aiworker.web.auth import require_token

log = logging.getLogger("aiworker.receive")

SENDER = "STOW-RS"  # the calling AE title the state DB records for these instances
DICOM_JSON = "application/dicom+json"

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"],
                   dependencies=[Depends(require_token)])


@dataclass
class Part:
    """One part of the body: its headers (lower-case names) and bytes."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class PartResult:
    """What became of one part: stored, or refused with a DIMSE status."""

    sop_class: str
    sop_uid: str
    status: int | None = None  # None: stored
    reason: str = ""


@router.post("/studies", summary="STOW-RS: store instances", response_class=JSONResponse,
             responses={202: {"description": "some stored"}, 409: {"description": "none"},
                        415: {"description": "not multipart/related application/dicom"}})
async def store_instances(request: Request) -> JSONResponse:
    """Store each ``application/dicom`` part (see the module's rules)."""
    return await _store(request, None)


@router.post("/studies/{study_uid}", summary="STOW-RS: store instances of one study",
             response_class=JSONResponse)
async def store_study_instances(study_uid: str, request: Request) -> JSONResponse:
    """As ``POST /dicomweb/studies``; an instance of another study is refused (0xC216)."""
    return await _store(request, study_uid)


async def _store(request: Request, study_uid: str | None) -> JSONResponse:
    boundary = _boundary(request.headers.get("content-type", ""))
    if boundary is None:
        return JSONResponse({"detail": "STOW-RS takes multipart/related; "
                                       "type=\"application/dicom\" with a boundary"}, 415)
    instances: InstanceStore = request.app.state.stow
    sender = request.client.host if request.client else "unknown"
    collector = Collector()
    results: list[PartResult] = []
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            while collector.finished:
                results.append(await run_in_threadpool(
                    store_part, instances, collector.finished.pop(0), study_uid, sender))
        parser.finalize()
    except MultipartParseError:
        results.append(PartResult("", "", CANNOT_DECODE, "malformed multipart body"))
    if collector.open is not None:  # the body ended inside a part: no closing boundary
        results.append(PartResult("", "", CANNOT_DECODE, "part cut short"))
    if not results:
        return JSONResponse({"detail": "no application/dicom part in the body"}, 400)
    stored = sum(r.status is None for r in results)
    log.info("STOW-RS from %s: %d stored, %d refused", sender, stored, len(results) - stored)
    return JSONResponse(response_dataset(results).to_json_dict(), _http_status(results),
                        media_type=DICOM_JSON)


def _boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/related; type=application/dicom`` body, else None."""
    media, params = parse_options_header(content_type)
    kind = params.get(b"type", b"application/dicom").strip(b'"').lower()
    if media.lower() != b"multipart/related" or kind != b"application/dicom":
        return None
    return params.get(b"boundary") or None


class Collector:
    """python-multipart callbacks that gather each part; a part is in ``finished`` once its
    closing boundary is read, ``open`` is the one being read (if any)."""

    def __init__(self) -> None:
        self.finished: list[Part] = []
        self.open: Part | None = None
        self._field = self._value = b""

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_part_data": self._data,
                "on_part_end": self._end, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end}

    def _begin(self) -> None:
        self.open = Part()

    def _data(self, buffer: bytes, start: int, end: int) -> None:
        self.open.body += buffer[start:end]

    def _header_field(self, buffer: bytes, start: int, end: int) -> None:
        self._field += buffer[start:end]

    def _header_value(self, buffer: bytes, start: int, end: int) -> None:
        self._value += buffer[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.open.headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _end(self) -> None:
        self.finished.append(self.open)
        self.open = None


def store_part(instances: InstanceStore, part: Part, study_uid: str | None,
               sender: str) -> PartResult:
    """Store one part through the C-STORE path; never raises."""
    media = part.headers.get("content-type", "application/dicom")
    if parse_options_header(media)[0].lower() != b"application/dicom":
        return PartResult("", "", CANNOT_DECODE, f"part is {printable(media[:40])}, "
                                                 "not application/dicom")
    sop_class = sop_uid = ""
    try:
        sop_class, sop_uid, syntax, data_set = split_file(bytes(part.body))
        instances.store(sop_class, sop_uid, syntax, data_set, SENDER, study_uid=study_uid)
    except Exception as exc:
        refused = exc if isinstance(exc, StoreRefused) else StoreRefused(
            INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
        if refused is not exc:
            log.exception("STOW-RS part failed unexpectedly")
        instances.record_refusal(refused, sop_uid, sender, protocol="STOW-RS")
        return PartResult(sop_class, sop_uid, refused.status, refused.reason)
    return PartResult(sop_class, sop_uid)


def split_file(data: bytes) -> tuple[str, str, UID, io.BytesIO]:
    """A Part 10 file's SOP Class UID, SOP Instance UID and transfer syntax (from its file
    meta) and its data set; :class:`StoreRefused` when there is no usable file meta."""
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise StoreRefused(CANNOT_DECODE, "not a DICOM Part 10 file (no file meta)") from exc
    uids = [str(meta.get(k, "")).strip("\x00 ") for k in
            ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")]
    if not all(uids):
        raise StoreRefused(BAD_UIDS, "file meta without SOP class, instance or transfer "
                                     "syntax UID")
    return uids[0], uids[1], UID(uids[2]), io.BytesIO(data[stream.tell():])


def response_dataset(results: list[PartResult]) -> Dataset:
    """The STOW-RS response: Referenced SOP Sequence and Failed SOP Sequence."""
    ds = Dataset()
    referenced, failed = [], []
    for result in results:
        item = Dataset()
        item.ReferencedSOPClassUID = result.sop_class
        item.ReferencedSOPInstanceUID = result.sop_uid
        if result.status is None:
            referenced.append(item)
        else:
            item.FailureReason = result.status
            failed.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def _http_status(results: list[PartResult]) -> int:
    """200 all stored, 202 some, 503 none for lack of disk, else 409."""
    refused = [r.status for r in results if r.status is not None]
    if not refused:
        return 200
    if len(refused) < len(results):
        return 202
    return 503 if all(s & 0xFF00 == 0xA700 for s in refused) else 409
