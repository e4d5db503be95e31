"""Stream each C-STORE data set into the spool while it arrives.

With ``pynetdicom._config.STORE_RECV_CHUNKED_DATASET`` pynetdicom writes a received data
set, behind a Part 10 header, to a temporary file fragment by fragment as the P-DATA PDUs
come in, instead of collecting it in memory; it opens that file through
``pynetdicom.dimse_messages.NamedTemporaryFile``. :func:`install` hands it an
:class:`IncomingFile` instead, which

* lives in the spool's ``.incoming/`` folder, on the same file system as the final
  instance files, so the C-STORE handler can fsync it and rename it into place;
* starts the kernel's write-back after every fragment (Linux ``sync_file_range``), so the
  disk works while the rest of the instance is still arriving and the final fsync is short;
* never raises on a write error (a full disk): it remembers the error and drops the rest,
  so the handler can answer 0xA700 or 0xC213 instead of the association being aborted.

pynetdicom would encode the file's meta information with pydicom's general writer; the
node writes it directly (:func:`aiworker.receive.dataset.part10_header`).

Memory stays flat however large the instances are: none is held whole in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
from pathlib import Path
from typing import Any

from pynetdicom import _config as pynetdicom_config
from pynetdicom import dimse_messages

from aiworker.receive.dataset import PREAMBLE_AND_PREFIX, part10_header

SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Any:
    """libc's sync_file_range, or None where the platform lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


_sync_file_range = _load_sync_file_range()


class _Flusher:
    """What pynetdicom calls as ``file.flush()`` after each fragment."""

    def __init__(self, owner: IncomingFile):
        self._owner = owner

    def flush(self) -> None:
        self._owner.flush()


class IncomingFile:
    """A temporary file in ``.incoming/`` with the interface pynetdicom uses."""

    def __init__(self, folder: Path, writeback: bool):
        self.name = str(folder / f".{secrets.token_hex(8)}.tmp")
        self._handle = open(self.name, "wb")  # noqa: SIM115 - closed by pynetdicom
        self._writeback = writeback and _sync_file_range is not None
        self.file = _Flusher(self)
        self.error: OSError | None = None
        self.size = 0
        self.data_offset = 0  # where the data set starts, after the meta information

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self._handle.write(data)
            self.size += len(data)
        except OSError as exc:
            self.error = exc

    def flush(self) -> None:
        if self.error is not None:
            return
        try:
            self._handle.flush()
            if self._writeback:
                _sync_file_range(self._handle.fileno(), 0, 0, SYNC_FILE_RANGE_WRITE)
        except OSError as exc:
            self.error = exc

    def fsync(self) -> None:
        """Make the whole file durable; raises the first write error, if there was one."""
        if self.error is not None:
            raise self.error
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> tuple:
    """Stands in for pynetdicom's ``create_file_meta``: what :func:`_write_file_meta` needs."""
    return sop_class_uid, sop_instance_uid, transfer_syntax


def _write_file_meta(fp: IncomingFile, meta: tuple) -> None:
    """Stands in for pydicom's ``write_file_meta_info`` (pynetdicom wrote the preamble)."""
    fp.write(part10_header(*meta)[PREAMBLE_AND_PREFIX:])
    fp.data_offset = fp.size


def install(folder: Path, writeback: bool) -> None:
    """Have pynetdicom stream every received data set into ``folder`` (see module doc)."""
    folder.mkdir(parents=True, exist_ok=True)
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = (  # type: ignore[assignment]
        lambda **_options: IncomingFile(folder, writeback)
    )
    dimse_messages.create_file_meta = _file_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = _write_file_meta  # type: ignore[assignment]
