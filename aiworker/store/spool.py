"""The spool: every received instance as a file, written so that a crash never leaves half a file.

Layout: ``<data_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A file is first written under a temporary name (``.incoming/.<random>.tmp``), fsynced, then
renamed into place and the folder fsynced, so a ``*.dcm`` name always holds a whole file.
Before the rename the temporary file is read back and compared with what was received.
Readers only ever look at ``*.dcm``; leftover ``.*.tmp`` files, in ``.incoming/`` or stray
in a series folder, are removed by the start-up reconcile.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
TEMP_SUFFIX = ".tmp"
FREE_SPACE_REFRESH_S = 0.25
INSTANCE_SUFFIX = ".dcm"


class InvalidUID(ValueError):
    """A UID that cannot name a spool path (empty, too long, not digits and dots)."""


def check_uid(uid: str, what: str) -> str:
    """Return ``uid`` if it is a well-formed DICOM UID, else raise :class:`InvalidUID`."""
    if not uid or len(uid) > 64 or not _UID.fullmatch(uid):
        raise InvalidUID(f"{what} is not a valid UID: '{printable(uid[:80])}'")
    return uid


def printable(text: str) -> str:
    """``text`` with every character but printable ASCII (and the backslash, DICOM's value
    separator) shown as ``?``: safe in a log line and in an Error Comment."""
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)


class Spool:
    """Durable, atomic file storage for received instances."""

    def __init__(self, root: Path, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._free_bytes = 0
        self._free_checked_at = -FREE_SPACE_REFRESH_S

    def free_bytes(self) -> int:
        """Free space on the spool's file system: asked of the system at most every
        :data:`FREE_SPACE_REFRESH_S`, and reduced in between by what was written here."""
        now = time.monotonic()
        if now - self._free_checked_at >= FREE_SPACE_REFRESH_S:
            self._free_bytes = shutil.disk_usage(self.root).free
            self._free_checked_at = now
        return self._free_bytes

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The final path of an instance; raises :class:`InvalidUID` for unusable UIDs."""
        return (
            self.root
            / check_uid(study_uid, "StudyInstanceUID")
            / check_uid(series_uid, "SeriesInstanceUID")
            / f"{check_uid(sop_uid, 'SOPInstanceUID')}{INSTANCE_SUFFIX}"
        )

    @property
    def incoming(self) -> Path:
        """Where instances are written while they arrive (same file system as the spool)."""
        return self.root / ".incoming"

    def write(self, path: Path, chunks: Iterable[bytes]) -> int:
        """Write ``chunks`` to ``path`` atomically and durably; return the byte count."""
        temp, size = self.write_temporary(chunks)
        try:
            self.commit(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return size

    def write_temporary(self, chunks: Iterable[bytes]) -> tuple[Path, int]:
        """Write ``chunks`` to a new temporary file in ``.incoming/`` (fsynced when fsync is
        on) and read it back; return its path and size. :meth:`commit` gives it its final
        name. Raises ``OSError`` (EIO) when the file read back is not what was written."""
        temp = self.incoming / f".{secrets.token_hex(8)}{TEMP_SUFFIX}"
        chunks = list(chunks)
        size = 0
        try:
            with self._create(temp) as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    size += len(chunk)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            self._free_bytes -= size
            if not _reads_back(temp, chunks):
                raise OSError(errno.EIO, "file read back differs", str(temp))
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp, size

    def _create(self, temp: Path) -> BinaryIO:
        """Open a new temporary file, re-creating ``.incoming/`` if someone removed it."""
        try:
            return open(temp, "xb")
        except FileNotFoundError:
            self.incoming.mkdir(exist_ok=True)
            return open(temp, "xb")

    def commit(self, temp: Path, path: Path) -> None:
        """Rename a complete (and, with fsync on, fsynced) temporary file to ``path``.

        Replaces an existing file of the same name (a resent instance) in one rename.
        """
        folder = path.parent
        self._ensure_dir(folder)
        os.replace(temp, path)
        if self.fsync:
            fsync_path(folder)

    def _ensure_dir(self, folder: Path) -> None:
        """Create the study/series folders once, fsyncing each parent so they survive a crash."""
        if folder in self._known_dirs:
            return
        missing = [p for p in (folder.parent, folder) if not p.is_dir()]
        folder.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            for created in missing:
                fsync_path(created.parent)
        self._known_dirs.add(folder)

    def instance_files(self) -> Iterator[Path]:
        """Every complete instance file in the spool."""
        yield from self.root.glob(f"*/*/*{INSTANCE_SUFFIX}")

    def temporary_files(self) -> Iterator[Path]:
        """Leftovers of writes that a crash interrupted."""
        yield from self.incoming.glob(f".*{TEMP_SUFFIX}")
        yield from self.root.glob(f"*/*/.*{TEMP_SUFFIX}")


def _reads_back(path: Path, chunks: list[bytes]) -> bool:
    """The file at ``path`` holds exactly ``chunks``, one after the other."""
    with open(path, "rb", buffering=0) as handle:
        for chunk in chunks:
            expected = bytes(chunk)  # a copy, but bytes == bytes is one memcmp (a memoryview
            if handle.read(len(expected)) != expected:  # compares byte by byte: 20x slower)
                return False
        return not handle.read(1)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data (a folder: its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
