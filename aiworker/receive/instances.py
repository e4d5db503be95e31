"""Storing one received instance: the path shared by C-STORE and STOW-RS.

:meth:`InstanceStore.store` takes what either protocol brings (the SOP class and instance
UIDs the sender names, the transfer syntax, the encoded data set) and returns only once the
instance is in the spool (written, fsynced, read back, renamed) and recorded in the state
DB; otherwise it raises :class:`StoreRefused` with the status and reason of the table in
:mod:`aiworker.receive.scp` (a C-STORE answers that status, STOW-RS puts it in the Failed
SOP Sequence as the Failure Reason). A refused instance never replaces the copy the spool
holds; :meth:`InstanceStore.record_refusal` logs and records it.
"""

from __future__ import annotations

import errno
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import UID

from aiworker.receive.dataset import IncompleteDataSet, part10_header, read_whole_data_set
from aiworker.receive.pixels import DamagedPixelData, has_pixel_data, is_image_storage
from aiworker.store.db import StateDB
from aiworker.store.records import InstanceRecord, MissingUID, instance_uids
from aiworker.store.spool import InvalidUID, Spool

log = logging.getLogger("aiworker.receive")

OUT_OF_RESOURCES = 0xA700
NOT_SOP_CLASS = 0xA900
CANNOT_DECODE = 0xC210
BAD_UIDS = 0xC211
UID_MISMATCH = 0xC212
WRITE_FAILED = 0xC213
DB_FAILED = 0xC214
INTERNAL_ERROR = 0xC215
STUDY_MISMATCH = 0xC216  # STOW-RS only: not the study of the request's target resource


class StoreRefused(Exception):
    """An instance that will not be stored: carries the DIMSE status and the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class InstanceStore:
    """Writes received instances to the spool and the state DB; ``writers`` threads write
    and fsync files while the caller's thread walks the header."""

    def __init__(self, spool: Spool, db: StateDB, min_free_mb: int, writers: int):
        self.spool = spool
        self.db = db
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self._writer = ThreadPoolExecutor(max_workers=writers,
                                          thread_name_prefix="spool-writer")

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def store(self, sop_class: str, sop_uid: str, transfer_syntax: UID, data_set: BinaryIO,
              calling: str, study_uid: str | None = None) -> InstanceRecord:
        """Write the instance to the spool and the DB, or raise :class:`StoreRefused`.

        ``data_set`` (a BytesIO) holds the encoded data set without a file meta group;
        ``sop_class`` and ``sop_uid`` are what the sender says it is (the C-STORE command,
        the STOW-RS part's file meta); ``calling`` the sender (AE title) for the record;
        ``study_uid``, when given, the study the instance must belong to (0xC216 if not).
        """
        data = data_set.getbuffer()
        if self.spool.free_bytes() - len(data) < self.min_free_bytes:
            raise StoreRefused(OUT_OF_RESOURCES, "free disk below storage.min_free_mb")
        header = part10_header(sop_class, sop_uid, transfer_syntax)
        writing = self._write_temporary([header, data])
        try:
            path, ds = self._check(data_set, sop_class, sop_uid, transfer_syntax)
            if study_uid is not None and str(ds.get("StudyInstanceUID", "")) != study_uid:
                raise StoreRefused(STUDY_MISMATCH, "StudyInstanceUID differs from the "
                                                   "request's study")
        except StoreRefused:
            _discard(writing)
            raise
        try:
            temp, size = writing.result()
            self.spool.commit(temp, path)
        except OSError as exc:
            _discard(writing)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefused(OUT_OF_RESOURCES, "disk full") from exc
            raise StoreRefused(WRITE_FAILED, f"spool write failed: {exc.strerror}") from exc
        try:
            record = InstanceRecord.from_dataset(
                ds, path=path, size=size, transfer_syntax=transfer_syntax,
                calling_ae=calling, received_at=time.time())
            recorded = self.db.record_instance(record)
        except Exception as exc:
            raise StoreRefused(DB_FAILED, f"state DB error: {type(exc).__name__}") from exc
        if recorded.superseded:  # the same SOP Instance UID was sent in another series before
            Path(recorded.superseded).unlink(missing_ok=True)
        if recorded.reopened:
            log.info("late arrival re-opens series %s", record.series_uid)
        if recorded.completed:
            log.info("series complete (expected count reached): %s", record.series_uid)
        return record

    def record_refusal(self, refused: StoreRefused, sop_uid: str, calling: str,
                       protocol: str = "C-STORE") -> None:
        """Log and record a refused instance; say so when a good copy of the instance was
        stored before (a damaged resend never replaces it)."""
        try:
            kept = self.db.stored_instance(sop_uid)
        except Exception:  # the DB itself may be what failed
            kept = None
        log.error("%s refused from %s: 0x%04X %s (SOP instance %s)%s", protocol, calling,
                  refused.status, refused.reason, sop_uid,
                  "; the copy stored before is kept" if kept else "")
        try:
            self.db.add_event("store_failed", study_uid=kept and kept["study_uid"],
                              series_uid=kept and kept["series_uid"], sop_uid=sop_uid,
                              status=f"0x{refused.status:04X}", reason=refused.reason,
                              calling_ae=calling, kept_stored_copy=kept is not None)
        except Exception as exc:  # the answer must still go out, with its own status
            log.error("cannot record the refusal in the state DB: %s", type(exc).__name__)

    def _write_temporary(self, chunks: list) -> Future:
        """Start writing the instance to a temporary file. With fsync on, a helper thread
        writes and fsyncs while this one walks the header; with it off the write is a
        memory copy, cheaper done here than handed to another thread (~0.1 ms)."""
        if self.spool.fsync:
            return self._writer.submit(self.spool.write_temporary, chunks)
        done: Future = Future()
        try:
            done.set_result(self.spool.write_temporary(chunks))
        except OSError as exc:
            done.set_exception(exc)
        return done

    def _check(self, data_set: BinaryIO, sop_class: str, sop_uid: str,
               transfer_syntax: UID) -> tuple[Path, Dataset]:
        """Walk the data set's header: the instance's spool path, and the header itself."""
        if not transfer_syntax.is_transfer_syntax:
            raise StoreRefused(CANNOT_DECODE, f"unsupported transfer syntax {transfer_syntax}")
        try:
            ds = read_whole_data_set(data_set, transfer_syntax)
        except Exception as exc:
            raise StoreRefused(CANNOT_DECODE, _why_undecodable(exc)) from exc
        try:
            study_uid, series_uid, ds_sop_uid = instance_uids(ds)
        except MissingUID as exc:
            raise StoreRefused(BAD_UIDS, str(exc)) from exc
        if ds_sop_uid != sop_uid:
            raise StoreRefused(UID_MISMATCH, "SOPInstanceUID differs from the command's")
        try:
            path = self.spool.path_for(study_uid, series_uid, ds_sop_uid)
        except InvalidUID as exc:
            raise StoreRefused(BAD_UIDS, str(exc)) from exc
        check_sop_class(ds, sop_class)
        return path, ds


def check_sop_class(ds: Dataset, command_class: str) -> None:
    """The data set is of the SOP class the command names, and an image has Pixel Data;
    else :class:`StoreRefused` with 0xA900."""
    element = ds.get_item(0x0008_0016)
    value = element.value if element is not None else None
    ds_class = (value.decode("ascii", "replace") if isinstance(value, bytes)
                else str(value or "")).strip("\x00 ")
    if not ds_class:
        raise StoreRefused(NOT_SOP_CLASS, "missing SOPClassUID")
    if ds_class != command_class:
        raise StoreRefused(NOT_SOP_CLASS, "SOPClassUID differs from the command's")
    if is_image_storage(ds_class) and not has_pixel_data(ds):
        raise StoreRefused(NOT_SOP_CLASS, "image storage instance without Pixel Data")


def _why_undecodable(exc: Exception) -> str:
    if isinstance(exc, IncompleteDataSet | DamagedPixelData):
        return str(exc)
    return f"cannot decode data set: {type(exc).__name__}"


def _discard(writing: Future) -> None:
    """Wait for a temporary file that will not be used, and remove it."""
    try:
        temp, _size = writing.result()
    except OSError:
        return
    temp.unlink(missing_ok=True)
